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

#: Why an operator's endpoint refuses a caller when no admin keys are configured.
ADMIN_ONLY = (
    "No admin keys are configured, so this endpoint answers only requests sent "
    "straight to the proxy from its own host (loopback, not through a proxy). "
    "Configure auth.admin_keys to call it from elsewhere with one of them, or "
    "call the proxy's own address from its host."
)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """
    The client key, from ``Authorization: Bearer`` (OpenAI's SDK, and Claude
    Code's ``ANTHROPIC_AUTH_TOKEN``), ``x-api-key`` (the Anthropic SDK's) or
    Azure's ``api-key``.  Two of them with different keys is a 401: which one
    was meant is not the proxy's guess.
    """
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    given = {token.strip()} if scheme.lower() == "bearer" and token.strip() else set()
    given.update(v.strip() for name in ("x-api-key", "api-key") if (v := headers.get(name, "")))
    given.discard("")
    if len(given) > 1:
        raise errors.unauthorized(
            "The request carries two different API keys (in Authorization and x-api-key "
            "or api-key); send one."
        )
    return given.pop() if given else None


class Authenticator:
    def __init__(self, auth: Auth) -> None:
        self._by_digest = {(k.key_sha256 or _digest(k.key or "")): k for k in auth.keys}
        self._admin = tuple(_digest(a) for a in auth.admin_keys)

    @property
    def keys(self) -> list[ApiKey]:
        """The configured client keys, in config order."""
        return list(self._by_digest.values())

    @property
    def open(self) -> bool:
        return not self._by_digest

    def authenticate(self, token: str | None) -> Principal:
        if self.open:
            return ANONYMOUS
        if not token:
            raise errors.unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'"
                " (or as x-api-key)."
            )
        key = self._by_digest.get(_digest(token))
        if key is None:
            raise errors.unauthorized("Incorrect API key provided.")
        return Principal(key.name, key)

    def authorize(self, principal: Principal, model: str) -> None:
        if not principal.allows(model):
            raise errors.forbidden(f"The key '{principal.name}' may not use the model '{model}'.")

    def check_admin(self, token: str | None, *, local: bool) -> None:
        """
        Guard the operator's endpoints: /stats, /metrics, DELETE /cache and
        /admin/reload (the probes, /health, /health/live and /health/ready,
        are never guarded).

        * With ``auth.admin_keys``: one of them, as the bearer ``token``, from
          anywhere; without one, or with another, 401.
        * With client keys (``auth.keys``) but no admin keys: only a caller
          on the proxy's own host (``local``: straight from a loopback peer
          and not forwarded, see
          :meth:`~llmproxy.site.GatewayRequest.direct_from_loopback`); anyone
          else, a request through nginx on this host included, 403
          ``admin_key_required``.
        * With neither: open, as the model endpoints are then (an open
          proxy, whose default listen is loopback).
        """
        if self._admin:
            digest = _digest(token) if token else ""
            if not any(hmac.compare_digest(digest, a) for a in self._admin):
                raise errors.unauthorized("This endpoint needs an admin key.")
            return
        if self.open or local:
            return
        raise errors.forbidden(ADMIN_ONLY, code="admin_key_required")
