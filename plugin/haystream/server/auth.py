"""Who a request comes from (API and deploy keys), and the lock-down of hayhooks' deploy routes."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from haystream.openai import OpenAIError

PIPELINE_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")
_DRIVE = re.compile(r"[A-Za-z]:")
_MAX_CREDENTIAL = 4096
_KEY_ID_SALT = b"haystream key id"
_KEY_ID_ROUNDS = 10_000  # at start-up only, once per configured key: ~5 ms each


@dataclass(frozen=True)
class Caller:
    """The key a request presented: `key_id` names it without revealing it (per-key limits, and the owner of stored
    Responses, in Redis too)."""

    key_id: str
    can_deploy: bool


ANONYMOUS = Caller(key_id="anonymous", can_deploy=True)


class KeyCheck:
    """Constant-time matching of a presented credential against the configured API and deploy keys.

    Deploy keys may do everything; API keys everything but deploy when deploy keys are configured.
    """

    def __init__(self, api_keys: Iterable[str], deploy_keys: Iterable[str] = ()) -> None:
        self._keys = [(key.encode(), key_id(key), False) for key in api_keys]
        deploy = list(deploy_keys)
        self._keys += [(key.encode(), key_id(key), True) for key in deploy]
        self._separate_deploy_keys = bool(deploy)

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (then every request but the probes needs one)."""
        return bool(self._keys)

    def identify(self, authorization: bytes | None) -> Caller | None:
        """The caller an `Authorization` header identifies, or None for a missing, malformed or unknown key."""
        if not self._keys:
            return ANONYMOUS
        presented = _presented_key(authorization)
        if presented is None:
            return None
        # Compare against every key, so the time taken does not tell which one (or whether any) matched.
        found: Caller | None = None
        for key, key_id, is_deploy_key in self._keys:
            if hmac.compare_digest(presented, key) and found is None:
                found = Caller(key_id, can_deploy=is_deploy_key or not self._separate_deploy_keys)
        return found


def key_id(key: str) -> str:
    """A name for `key` that stays the same wherever the key is listed, in any process, and does not reveal it.

    Not the key's place in the list: stored Responses (in Redis, shared by replicas and kept across restarts) belong
    to a key id, and with ids by place a replica with another list, or the list after a rotation retired its first
    key, gave the first key's responses to whichever key then held its place. Salted and stretched, so that a read of
    the store does not make guessing a weak key cheap.
    """
    digest = hashlib.pbkdf2_hmac("sha256", key.encode(), _KEY_ID_SALT, _KEY_ID_ROUNDS)
    return "key-" + digest[:12].hex()


def _presented_key(authorization: bytes | None) -> bytes | None:
    """The key in `Bearer <key>`, or the password of `Basic` credentials (what hayhooks' CLI sends from ~/.netrc)."""
    if not authorization or len(authorization) > _MAX_CREDENTIAL:
        return None
    scheme, _, credential = authorization.strip().partition(b" ")
    credential = credential.strip()
    if not credential:
        return None
    if scheme.lower() == b"bearer":
        return credential
    if scheme.lower() == b"basic":
        try:
            decoded = base64.b64decode(credential, validate=True)
        except (binascii.Error, ValueError):
            return None
        return decoded.partition(b":")[2] or None
    return None


def unauthorized() -> OpenAIError:
    """The 401 for a request without a valid key."""
    return OpenAIError(
        401,
        "Invalid or missing API key (send 'Authorization: Bearer <key>').",
        code="invalid_api_key",
        headers={"www-authenticate": 'Bearer realm="haystream"'},
    )


def check_deploy_request(route_path: str, body: Any) -> None:
    """Reject a deploy request whose pipeline name or file names could escape the pipelines folder.

    :raises OpenAIError: 400 with what is wrong; nothing has been written yet.
    """
    # Both names: hayhooks undeploys the path's, and a valid name in the body must not vouch for it.
    names = [route_path.rstrip("/").rsplit("/", 1)[-1]] if route_path.startswith("/undeploy/") else []
    if isinstance(body, dict):
        if "name" in body:
            names.append(body["name"])
        files = body.get("files")
        if files is not None:
            if not isinstance(files, dict):
                raise OpenAIError(400, "'files' must be an object of file name to content.", param="files")
            for file_name in files:
                if not _safe_relative_path(file_name):
                    raise OpenAIError(
                        400, f"Unsafe file name {file_name!r}: use relative paths without '..'.", param="files"
                    )
    for name in names:
        if name is not None and not (isinstance(name, str) and PIPELINE_NAME.fullmatch(name)):
            raise OpenAIError(400, f"Invalid pipeline name {name!r}: use letters, digits, '_' and '-'.", param="name")


def _safe_relative_path(file_name: Any) -> bool:
    if not isinstance(file_name, str) or not file_name or "\x00" in file_name or "\\" in file_name:
        return False
    if file_name.startswith("/") or _DRIVE.match(file_name):
        return False
    return ".." not in file_name.split("/") and not posixpath.normpath(file_name).startswith("..")
