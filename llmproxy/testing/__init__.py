"""Test helpers shipped with llmproxy: a mock OpenAI upstream (:mod:`.mock`), and
real processes on free ports for system tests and benchmarks (:mod:`.processes`)."""

from llmproxy.testing.mock import MockUpstream

__all__ = ["MockUpstream"]
