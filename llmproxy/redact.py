"""
Secret redaction: configured secrets (upstream keys, secret-looking upstream
headers, client and admin keys) that an upstream echoes back are masked before
a client sees them.  The upstream exchange applies it to every byte it hands
on; nothing else needs to.
"""

from __future__ import annotations


class Redactor:
    """Replaces configured secrets in bytes with ``[REDACTED]``."""

    MASK = b"[REDACTED]"

    def __init__(self, secrets: tuple[str, ...]) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = tuple(sorted({s.encode() for s in secrets}, key=len, reverse=True))

    def __call__(self, data: bytes) -> bytes:
        """``data`` with every secret masked (the same object when there is none)."""
        for secret in self._secrets:
            if secret in data:
                data = data.replace(secret, self.MASK)
        return data
