"""
Lazy twistd dropin for llmproxy: nothing here imports the reactor or reads config.
"""

from twisted.application.service import ServiceMaker

llmproxy = ServiceMaker(
    "llmproxy",
    "llmproxy.tap",
    "An OpenAI-compatible gateway for LLM APIs.",
    "llmproxy",
)

llmproxy_mock = ServiceMaker(
    "llmproxy-mock",
    "llmproxy.testing.tap",
    "A mock OpenAI-compatible upstream, for trying llmproxy without an API key.",
    "llmproxy-mock",
)
