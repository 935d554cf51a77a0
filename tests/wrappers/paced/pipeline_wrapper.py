"""An answer that stops after its first token and holds until the client leaves, whatever the request says: for
tests of clients that stream (they must show the first token while the upstream is still going). The last user
message becomes the ``run`` key of the upstream's model string, so a test that sends a unique message finds its own
request on the shared fake upstream."""

from functools import cache
from urllib.parse import quote

from hayhooks import BasePipelineWrapper

import haystream
from haystream.testing import fake_chat_generator

SCENARIO = "fake?tokens=5&hold_after=1"


@cache
def llm(run: str):
    return fake_chat_generator(f"{SCENARIO}&run={quote(run, safe='')}")


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        pass

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict):
        return haystream.astream(llm(messages[-1]["content"]), messages=haystream.chat_messages(messages))
