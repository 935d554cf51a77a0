"""Bearer-key checks and the lock-down of hayhooks' deploy routes."""

from __future__ import annotations

import hmac
import posixpath
import re
from typing import Any

from haystream.openai import OpenAIError

PIPELINE_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")


class KeyCheck:
    """Constant-time comparison of `Authorization: Bearer <key>` against the configured keys."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [key.encode() for key in keys]

    @property
    def enabled(self) -> bool:
        """Whether any key is configured."""
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """:raises OpenAIError: 401 unless the header carries a configured key (or no key is configured)."""
        if not self._keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        presented = token.strip().encode()
        # Compare against every key so the time taken does not tell which one (or whether any) matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        if scheme.lower() != "bearer" or not matched:
            raise OpenAIError(
                401, "Invalid or missing API key (send 'Authorization: Bearer <key>').", code="invalid_api_key"
            )


def check_deploy_request(path: str, body: Any) -> None:
    """Reject a deploy request whose pipeline name or file names could escape the pipelines folder.

    :raises OpenAIError: 400 with what is wrong; nothing has been written yet.
    """
    name = path.rstrip("/").rsplit("/", 1)[-1] if path.startswith("/undeploy/") else None
    if isinstance(body, dict):
        name = body.get("name", name)
        files = body.get("files")
        if files is not None:
            if not isinstance(files, dict):
                raise OpenAIError(400, "'files' must be an object of file name to content.", param="files")
            for file_name in files:
                if not _safe_relative_path(file_name):
                    raise OpenAIError(
                        400, f"Unsafe file name {file_name!r}: use relative paths without '..'.", param="files"
                    )
    if name is not None and not (isinstance(name, str) and PIPELINE_NAME.fullmatch(name)):
        raise OpenAIError(400, f"Invalid pipeline name {name!r}: use letters, digits, '_' and '-'.", param="name")


def _safe_relative_path(file_name: Any) -> bool:
    if not isinstance(file_name, str) or not file_name or "\x00" in file_name or "\\" in file_name:
        return False
    if file_name.startswith("/") or re.match(r"^[A-Za-z]:", file_name):
        return False
    return ".." not in file_name.split("/") and not posixpath.normpath(file_name).startswith("..")
