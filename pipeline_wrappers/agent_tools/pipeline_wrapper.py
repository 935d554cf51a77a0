"""A Haystack Agent with real tools (a calculator and a clock), streaming its answer.

The agent's own tool calls are run inside the pipeline and are never sent to the client as `tool_calls` (a client
such as Open WebUI would try to execute them); people see the activity as status lines instead.
"""

import ast
import operator
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from hayhooks import BasePipelineWrapper
from haystack.components.agents import Agent
from haystack.tools import tool

import haystream
from haystream import openwebui
from haystream.local import chat_generator_from_env

_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ValueError("only numbers and + - * / ** are allowed")


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '2 * (3 + 4)'."""
    value = _evaluate(ast.parse(expression, mode="eval"))
    return str(int(value) if float(value).is_integer() else value)


@tool
def clock(timezone_name: str = "UTC") -> str:
    """The current date and time in UTC (ISO 8601)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class PipelineWrapper(BasePipelineWrapper):
    def setup(self) -> None:
        self.agent = Agent(
            chat_generator=chat_generator_from_env("AGENT_TOOLS_MODEL"),
            tools=[calculator, clock],
            system_prompt="Use the calculator for arithmetic and the clock for the date or time. Answer briefly.",
        )
        self.agent.warm_up()

    async def run_chat_completion_async(self, model: str, messages: list[dict], body: dict) -> AsyncIterator:
        return self._answer(haystream.chat_messages(messages))

    async def _answer(self, history: list) -> AsyncIterator[Any]:
        async with haystream.astream(self.agent, messages=history) as chunks:
            async for chunk in chunks:
                for delta in chunk.tool_calls or ():
                    if delta.tool_name:
                        yield openwebui.status(f"Using the {delta.tool_name} tool…")
                if chunk.tool_call_result is not None:
                    result = chunk.tool_call_result
                    yield openwebui.status(f"{result.origin.tool_name} answered", done=True)
                yield chunk
