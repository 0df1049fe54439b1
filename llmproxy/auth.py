"""
Client keys: who is calling, and which models they may use.

With no keys configured the proxy is open (its default listen is loopback);
every caller is then the principal ``anonymous``.  Keys are compared by their
sha256 digest, so ``key_sha256`` entries never need the clear key on disk.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

import attrs

from llmproxy import errors
from llmproxy.config import ApiKey, Auth


@attrs.frozen
class Principal:
    """The authenticated caller of one request."""

    name: str
    key: ApiKey | None = None

    def allows(self, model: str) -> bool:
        return self.key is None or self.key.models is None or model in self.key.models


ANONYMOUS = Principal("anonymous")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The client key from ``Authorization: Bearer`` (or Azure's ``api-key``)."""
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("api-key") or None


class Authenticator:
    def __init__(self, auth: Auth) -> None:
        self._by_digest = {(k.key_sha256 or _digest(k.key or "")): k for k in auth.keys}
        self._admin = tuple(_digest(a) for a in auth.admin_keys)

    @property
    def open(self) -> bool:
        return not self._by_digest

    def authenticate(self, token: str | None) -> Principal:
        if self.open:
            return ANONYMOUS
        if not token:
            raise errors.unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            )
        key = self._by_digest.get(_digest(token))
        if key is None:
            raise errors.unauthorized("Incorrect API key provided.")
        return Principal(key.name, key)

    def authorize(self, principal: Principal, model: str) -> None:
        if not principal.allows(model):
            raise errors.forbidden(f"The key '{principal.name}' may not use the model '{model}'.")

    def check_admin(self, token: str | None) -> None:
        """Guard /stats, /metrics and DELETE /cache when admin keys are configured."""
        if not self._admin:
            return
        digest = _digest(token) if token else ""
        if not any(hmac.compare_digest(digest, a) for a in self._admin):
            raise errors.unauthorized("This endpoint needs an admin key.")
