"""Written exactly as hayhooks' documentation shows — haystream serves it unchanged, only better."""

from collections.abc import Generator

from hayhooks import BasePipelineWrapper, get_last_user_message, streaming_generator
from haystack import Pipeline
from haystack.components.builders import ChatPromptBuilder
from haystack.dataclasses import ChatMessage

from haystream.local import chat_generator_from_env


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        self.pipeline = Pipeline()
        self.pipeline.add_component(
            "prompt_builder",
            ChatPromptBuilder(
                template=[ChatMessage.from_user("Answer briefly: {{ question }}")], required_variables="*"
            ),
        )
        self.pipeline.add_component("llm", chat_generator_from_env("HAYHOOKS_STYLE_MODEL"))
        self.pipeline.connect("prompt_builder.prompt", "llm.messages")

    def run_api(self, question: str) -> str:
        result = self.pipeline.run({"prompt_builder": {"question": question}})
        return result["llm"]["replies"][0].text

    def run_chat_completion(self, model: str, messages: list[dict], body: dict) -> Generator:
        question = get_last_user_message(messages)
        return streaming_generator(
            pipeline=self.pipeline,
            pipeline_run_args={"prompt_builder": {"question": question}},
        )
