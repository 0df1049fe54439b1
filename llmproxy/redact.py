"""
Secret redaction: configured secrets (upstream keys, secret-looking upstream
headers, client and admin keys) that an upstream echoes back are masked before
a client sees them.  The upstream exchange applies it to every byte it hands
on; nothing else needs to.

An upstream's error body gets more: any run of :data:`FRAGMENT` or more
characters of a secret is masked too, since a 401 may quote the first dozen
characters of the key it refused.  (Only error bodies: they are small, while
the check costs a scan per secret window.)
"""

from __future__ import annotations

import re

#: The shortest run of a secret's characters that is masked in an error body.
FRAGMENT = 8


class Redactor:
    """Replaces configured secrets in bytes with ``[REDACTED]``."""

    MASK = b"[REDACTED]"

    def __init__(self, secrets: tuple[str, ...]) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = tuple(sorted({s.encode() for s in secrets}, key=len, reverse=True))
        windows = {
            secret[i : i + FRAGMENT]
            for secret in self._secrets
            for i in range(len(secret) - FRAGMENT + 1)
        }
        self._windows = (
            re.compile(b"|".join(re.escape(w) for w in sorted(windows))) if windows else None
        )

    def __call__(self, data: bytes) -> bytes:
        """``data`` with every secret masked (the same object when there is none)."""
        for secret in self._secrets:
            if secret in data:
                data = data.replace(secret, self.MASK)
        return data

    def fragments(self, data: bytes) -> bytes:
        """``data`` with every secret, and every run of ``FRAGMENT``+ of its characters, masked."""
        data = self(data)
        if self._windows is None or self._windows.search(data) is None:
            return data
        masked = bytearray(len(data))
        start = 0
        while (found := self._windows.search(data, start)) is not None:
            begin, end = self._widest(data, found.start())
            masked[begin:end] = b"\x01" * (end - begin)
            start = found.start() + 1
        out = bytearray()
        i = 0
        while i < len(data):
            if masked[i]:
                while i < len(data) and masked[i]:
                    i += 1
                out += self.MASK
            else:
                out.append(data[i])
                i += 1
        return bytes(out)

    def _widest(self, data: bytes, at: int) -> tuple[int, int]:
        """The longest run of some secret's characters in ``data`` through ``at``."""
        best = (at, at + FRAGMENT)
        window = data[at : at + FRAGMENT]
        for secret in self._secrets:
            offset = secret.find(window)
            while offset != -1:
                begin, end, k = at, at + FRAGMENT, offset + FRAGMENT
                while end < len(data) and k < len(secret) and data[end] == secret[k]:
                    end, k = end + 1, k + 1
                k = offset - 1
                while begin > 0 and k >= 0 and data[begin - 1] == secret[k]:
                    begin, k = begin - 1, k - 1
                if end - begin > best[1] - best[0]:
                    best = (begin, end)
                offset = secret.find(window, offset + 1)
        return best
