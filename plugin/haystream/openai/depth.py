"""How deeply nested the JSON a request carries may be."""

from __future__ import annotations

from typing import Any

# orjson reads 1,024 levels but writes 254 (a request's fields are written back a level or two deeper), and a Haystack
# `Pipeline` deep-copies its inputs with two Python frames a level.
MAX_JSON_DEPTH = 251


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` (lists and dicts, as JSON parses them) nests more than `limit` levels. Iterative, and each
    container is visited once: the walk costs what parsing did, whatever the depth."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
