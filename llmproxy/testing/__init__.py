"""Test helpers shipped with llmproxy: a mock OpenAI upstream (see :mod:`.mock`)."""

from llmproxy.testing.mock import MockUpstream

__all__ = ["MockUpstream"]
