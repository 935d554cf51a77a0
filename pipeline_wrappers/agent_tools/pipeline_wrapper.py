"""A Haystack Agent with real tools (a calculator and a clock), streaming its answer.

The agent's own tool calls run inside the pipeline; haystream never sends them to the client as `tool_calls` (a client
such as Open WebUI would try to execute them) and shows them to people instead: status lines and a collapsed tool
block in Open WebUI, status lines in `haystream chat`, optionally a text line for other clients.

The embedded 135M model cannot call tools: without OPENAI_BASE_URL / OPENAI_API_KEY this answers like a plain chat
(see README.md for the one-line switch to a real model).
"""

import ast
import operator
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from hayhooks import BasePipelineWrapper
from haystack.components.agents import Agent
from haystack.tools import tool

import haystream
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
        # haystream shows the agent's tool calls to people (Open WebUI: a status line and a tool block) and never
        # sends them to the client as tool_calls.
        return haystream.astream(self.agent, messages=haystream.chat_messages(messages))
