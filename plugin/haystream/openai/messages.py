"""OpenAI request messages as Haystack `ChatMessage`s."""

from __future__ import annotations

from typing import Any

from haystack.dataclasses import ChatMessage

from haystream.openai.depth import MAX_JSON_DEPTH, nested_deeper_than
from haystream.openai.errors import OpenAIError


def chat_messages(messages: list[dict[str, Any]], *, images: bool = True) -> list[ChatMessage]:
    """Convert a request's `messages` (string or parts content, tool turns) to Haystack `ChatMessage`s.

    Image parts become `ImageContent` when they are base64 data URLs (what Open WebUI sends). Image URLs that
    Haystack cannot carry, and every image when `images=False` (for text-only models), become a short text
    placeholder instead of failing the request.

    :raises OpenAIError: 400 for a message Haystack cannot represent.
    """
    converted = []
    for position, message in enumerate(messages):
        if not images or _has_remote_image(message):
            message = _images_as_text(message, keep_data_urls=images)
        try:
            chat_message = ChatMessage.from_openai_dict_format(message)
        except (ValueError, TypeError, KeyError, AttributeError) as error:  # e.g. `"function": "f"`: not an object
            raise OpenAIError(400, f"messages.{position}: {error}", param=f"messages.{position}") from None
        except RecursionError:  # Python's json, parsing a tool call's arguments: ~1,000 levels (was a 500)
            raise _arguments_too_deep(position) from None
        if any(nested_deeper_than(call.arguments, MAX_JSON_DEPTH) for call in chat_message.tool_calls):
            raise _arguments_too_deep(position)  # a Pipeline's deep copy of them raised it from ~500 levels
        converted.append(chat_message)
    return converted


def _arguments_too_deep(position: int) -> OpenAIError:
    return OpenAIError(
        400,
        f"messages.{position}: a tool call's arguments are nested more than {MAX_JSON_DEPTH} levels deep.",
        param=f"messages.{position}",
        code="invalid_json",
    )


def _has_remote_image(message: dict[str, Any]) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(
        part.get("type") == "image_url" and not _image_url(part).startswith("data:") for part in content
    )


def _images_as_text(message: dict[str, Any], *, keep_data_urls: bool) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        if part.get("type") == "image_url" and not (keep_data_urls and _image_url(part).startswith("data:")):
            url = _image_url(part)
            parts.append({"type": "text", "text": "[image]" if url.startswith("data:") else f"[image: {url}]"})
        else:
            parts.append(part)
    return {**message, "content": parts}


def _image_url(part: dict[str, Any]) -> str:
    image = part.get("image_url")
    return (image.get("url") if isinstance(image, dict) else None) or ""
