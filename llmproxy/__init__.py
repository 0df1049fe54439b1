"""llmproxy: an OpenAI-compatible gateway for LLM APIs, on Twisted."""

__version__ = "0.1.0"
