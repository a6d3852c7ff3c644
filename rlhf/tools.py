"""Named tools for the `tools` environment: plain Python functions with type hints and a Google-style docstring,
from which transformers builds the JSON schema a chat template shows the model (`get_json_schema`).

Register one with `@tool`; a job lists the names it offers in `ppo.environment.tools`. A tool runs in a sandboxed
process of its own (rlhf/sandbox.py), so it must be importable by its module's name and return something JSON can
write (its text is what the model reads).
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable

from tuneyard.training.errors import UserError

TOOLS: dict[str, Callable] = {}


def tool(function: Callable) -> Callable:
    """Register `function` under its name (its schema is built when a job offers it: this module stays light, for
    the sandbox's child process imports it)."""
    TOOLS[function.__name__] = function
    return function


def lookup_tool(name: str) -> Callable:
    """The registered tool, or an error that lists the registered names."""
    if name not in TOOLS:
        raise UserError(f"ppo.environment.tools: unknown tool '{name}'; registered: {', '.join(sorted(TOOLS))}")
    return TOOLS[name]


def tool_schemas(names: list[str]) -> list[dict]:
    """The JSON schemas of the named tools, as chat templates take them (`tools=`)."""
    from transformers.utils import get_json_schema

    schemas = []
    for name in names:
        try:
            schemas.append(get_json_schema(lookup_tool(name)))
        except Exception as exc:  # transformers' TypeHintParsingException / DocstringParsingException
            raise UserError(
                f"ppo.environment.tools: tool '{name}' has no JSON schema: {' '.join(str(exc).split())[:200]}; give "
                "it type hints and a docstring with an Args section naming every argument"
            ) from None
    return schemas


OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


@tool
def calculate(expression: str) -> str:
    """Evaluate an integer arithmetic expression exactly.

    Args:
        expression: the expression, with integers, + - * // % and parentheses, e.g. "(12 + 30) * 7"
    """

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"not integer arithmetic: {ast.unparse(node)[:60]}")

    return str(value(ast.parse(expression, mode="eval").body))
