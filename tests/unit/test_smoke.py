from tests.harness import Harness, chat, events
from tests.trial import trial_case


def test_chat_roundtrip() -> None:
    h = Harness()
    answer = h.request("POST", "/v1/chat/completions", chat("hi"))
    assert answer.code == 200, answer.body
    assert answer.json()["choices"][0]["message"]["content"] == "Hello from a! You said: hi"


def test_stream_roundtrip() -> None:
    h = Harness()
    answer = h.request("POST", "/v1/chat/completions", chat("hi", stream=True))
    assert answer.code == 200, answer.body
    assert events(answer.body)[-1] == "data: [DONE]"


TrialTests = trial_case(globals())
