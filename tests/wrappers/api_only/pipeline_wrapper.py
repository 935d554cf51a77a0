"""A wrapper with only run_api: it is not a chat model."""

from hayhooks import BasePipelineWrapper


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        pass

    def run_api(self, text: str) -> str:
        return text.upper()
