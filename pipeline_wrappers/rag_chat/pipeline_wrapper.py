"""Retrieval-augmented chat over a few bundled markdown files: BM25 retrieval, a prompt, a streamed answer.

Only the final generator streams; the retrieved documents are sent first as Open WebUI source events (citations),
which plain OpenAI clients never receive. The embedded 135M model often ignores the documents: set OPENAI_BASE_URL /
OPENAI_API_KEY for answers worth judging (README.md).
"""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from hayhooks import BasePipelineWrapper
from haystack import Document, Pipeline
from haystack.components.builders import ChatPromptBuilder
from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
from haystack.dataclasses import ChatMessage, ChatRole
from haystack.document_stores.in_memory import InMemoryDocumentStore

import haystream
from haystream import openwebui
from haystream.local import chat_generator_from_env
from haystream.openai import OpenAIError

DOCS = Path(__file__).parent / "docs"

TEMPLATE = [
    ChatMessage.from_system(
        "Answer the question using only these documents. Say so if they do not contain the answer.\n"
        "{% for document in documents %}\n[{{ document.meta.name }}]\n{{ document.content }}\n{% endfor %}"
    ),
    ChatMessage.from_user("{{ question }}"),
]


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        store = InMemoryDocumentStore()
        store.write_documents(
            [Document(content=path.read_text(), meta={"name": path.name}) for path in sorted(DOCS.glob("*.md"))]
        )
        self.pipeline = Pipeline()
        self.pipeline.add_component("retriever", InMemoryBM25Retriever(document_store=store, top_k=2))
        self.pipeline.add_component("prompt", ChatPromptBuilder(template=TEMPLATE, required_variables="*"))
        self.pipeline.add_component("llm", chat_generator_from_env("RAG_CHAT_MODEL"))
        self.pipeline.connect("retriever.documents", "prompt.documents")
        self.pipeline.connect("prompt.prompt", "llm.messages")

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict) -> AsyncIterator:
        # The user's latest text: a last turn without any (an image, a tool result) searches for the question before.
        asked = [m.text for m in haystream.chat_messages(messages) if m.is_from(ChatRole.USER) and m.text]
        if not asked:  # BM25 needs a query: without one the retriever failed the run (a 500 for the client's turn)
            raise OpenAIError(400, "rag_chat answers a question in text; the messages have none.", param="messages")
        return self._answer(asked[-1])

    async def _answer(self, question: str) -> AsyncIterator[Any]:
        yield openwebui.status("Searching the documents…")
        chunks = haystream.astream(
            self.pipeline,
            {"retriever": {"query": question}, "prompt": {"question": question}},
            include_outputs_from={"retriever"},
        )
        async with chunks:
            async for chunk in chunks:
                yield chunk
        for document in chunks.result["retriever"]["documents"]:
            yield openwebui.source(document)
        yield openwebui.status("Answered from the documents", done=True)
