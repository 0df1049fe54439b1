"""
``twistd llmproxy``'s operator surface: the start-up summary, --check-config,
config errors on one line, and a Ctrl-C before the reactor runs.
"""

from __future__ import annotations

import io
import signal
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from llmproxy import tap
from llmproxy.config import parse_yaml
from llmproxy.summary import config_origin, summary, without_secrets

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
listen: ["tcp:8080:interface=127.0.0.1", "unix:/run/llmproxy.sock"]
upstreams:
  openai: {base_url: "https://api.openai.com/v1", api_key: sk-secret-1}
  local: {base_url: "http://user:pw@10.0.0.2:8000/v1", api_key: sk-secret-2}
models:
  gpt-4o:
    strategy: priority
    targets:
      - {upstream: openai}
      - {upstream: local, model: llama, weight: 0}
cache: {backend: "off"}
auth:
  keys:
    - {name: team-a, key: key-aaaaaaaa}
    - {name: team-b, key: key-bbbbbbbb}
  admin_keys: [admin-secret]
"""


def test_the_summary_says_what_the_config_defines_and_no_secret() -> None:
    config = parse_yaml(CONFIG, "/etc/llmproxy/llmproxy.yaml", {})
    lines = summary(config, "/etc/llmproxy/llmproxy.yaml (--config)")
    assert lines == [
        "config: /etc/llmproxy/llmproxy.yaml (--config)",
        "listen: tcp:8080:interface=127.0.0.1, unix:/run/llmproxy.sock (from the config)",
        "upstreams (2): openai → https://api.openai.com/v1, local → http://***@10.0.0.2:8000/v1",
        "models (1): gpt-4o → openai/gpt-4o | local/llama weight 0 (priority)",
        "cache: off",
        "auth: closed: 2 client keys (team-a, team-b); 1 admin keys",
    ]
    text = "\n".join(lines)
    for secret in ("sk-secret", "key-aaaa", "admin-secret", "pw@"):
        assert secret not in text


def test_the_summary_of_the_built_in_default() -> None:
    config = parse_yaml((ROOT / "llmproxy" / "default.yaml").read_text(), "<built-in>", {})
    lines = summary(config, "x", ("tcp:0",), workers=4)
    assert lines[1] == "listen: tcp:0 (4 workers)"
    assert lines[4] == "cache: memory, ttl 3600s, scope key, at most 268435456 bytes"
    assert lines[5] == "auth: open: no client keys, any client is let in; no admin keys"


def test_a_long_list_is_capped() -> None:
    text = "upstreams:\n  u: {base_url: 'http://u/v1'}\nmodels:\n" + "".join(
        f"  m{i}: {{targets: [{{upstream: u}}]}}\n" for i in range(25)
    )
    line = summary(parse_yaml(text, "x.yaml", {}), "x")[3]
    assert line.startswith("models (25): m0 → u/m0 (round_robin); ")
    assert line.endswith("m19 → u/m19 (round_robin) and 5 more")


def test_the_config_origin_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert config_origin("a.yaml", {}) == "a.yaml (--config)"
    assert config_origin(None, {"LLMPROXY_CONFIG": "b.yaml"}) == "b.yaml ($LLMPROXY_CONFIG)"
    assert config_origin(None, {}).startswith("the built-in default (no --config")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "llmproxy.yaml").write_text("{}\n")
    found = config_origin(None, {})
    assert found == f"{tmp_path / 'etc' / 'llmproxy.yaml'} (./etc/llmproxy.yaml, no --config)"


def test_without_secrets_keeps_a_plain_url() -> None:
    assert without_secrets("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert without_secrets("redis://:hunter2@r:6379/0") == "redis://***@r:6379/0"


def test_check_config_prints_the_summary_and_exits_0() -> None:
    out = io.StringIO()
    shipped = str(ROOT / "etc" / "llmproxy.yaml")
    with redirect_stdout(out), pytest.raises(SystemExit) as info:
        tap.Options().parseOptions(["--check-config", "--config", shipped])
    assert info.value.code == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == f"config: {shipped} (--config)"
    assert [line.split(":")[0] for line in lines[1:6]] == [
        "listen",
        "upstreams (1)",
        "models (3)",
        "cache",
        "auth",
    ]
    assert lines[-1] == f"llmproxy: config {shipped} is valid"


def test_check_config_of_a_broken_file_exits_1_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {m: {targets: [{upstream: nowhere}]}}\n")
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as info:
        tap.Options().parseOptions(["--check-config", "--config", str(bad)])
    message = str(info.value.code)
    assert message.startswith(f"llmproxy: {bad}: ") and "\n" not in message
    assert out.getvalue() == ""


def test_a_ctrl_c_before_the_reactor_runs_stops_it_once_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tap, "_early", [])
    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tap.hold_early_interrupts()
        assert signal.getsignal(signal.SIGINT) is tap._hold
        signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt: remembered
        assert tap._early == [signal.SIGINT]
        stopped: list[int] = []

        class Reactor:
            def sigInt(self, number: int, frame: object) -> None:  # noqa: N802 - Twisted's name
                stopped.append(number)

        reactor = Reactor()
        tap.stop_if_interrupted(reactor)
        assert stopped == [signal.SIGINT]
        # From now on a Ctrl-C is the reactor's.
        assert signal.getsignal(signal.SIGINT) == reactor.sigInt
    finally:
        signal.signal(signal.SIGINT, previous)


def test_no_ctrl_c_no_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tap, "_early", [])
    stopped: list[int] = []

    class Reactor:
        def sigInt(self, number: int, frame: object) -> None:  # noqa: N802 - Twisted's name
            stopped.append(number)

    tap.stop_if_interrupted(Reactor())
    assert stopped == []


def test_a_handler_already_there_is_left_alone() -> None:
    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        tap.hold_early_interrupts()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_workers_run_on_the_parent_s_reactor() -> None:
    from twisted.internet import epollreactor

    from llmproxy.workers import reactor_name, worker_command

    assert reactor_name(epollreactor.EPollReactor.__new__(epollreactor.EPollReactor)) == "epoll"
    assert reactor_name(Clock()) is None
    args = worker_command("/etc/llmproxy.yaml", 1, (), "asyncio")
    assert args[3:7] == ["--pidfile=", "--reactor=asyncio", "-n", "llmproxy"]
    assert "--reactor=asyncio" not in worker_command(None, 1, ())


class Triggers:
    """A reactor that records its system event triggers."""

    def __init__(self) -> None:
        self.triggers: list[tuple[str, str, object]] = []
        self.called: list[object] = []

    def addSystemEventTrigger(self, phase: str, event: str, f: object, *a: object) -> None:  # noqa: N802 - Twisted's name
        self.triggers.append((phase, event, f))

    def callWhenRunning(self, f: object, *a: object) -> None:  # noqa: N802 - Twisted's name
        self.triggers.append(("after", "startup", f))

    def callFromThread(self, f: object, *a: object, **kw: object) -> None:  # noqa: N802 - Twisted's name
        self.called.append(f)


def test_a_second_stop_signal_is_ignored_while_stopping() -> None:
    reactor = Triggers()
    tap.ignore_further_stops(reactor)
    [(phase, event, install)] = reactor.triggers
    assert (phase, event) == ("before", "shutdown")
    term, interrupt = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        install()  # type: ignore[operator]
        signal.raise_signal(signal.SIGTERM)  # would end this process, were it not ignored
        assert reactor.called == [tap.log.info]
    finally:
        signal.signal(signal.SIGTERM, term)
        signal.signal(signal.SIGINT, interrupt)


def test_the_coverage_data_is_saved_as_the_reactor_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    saved: list[bool] = []

    class Coverage:
        @staticmethod
        def current() -> object:
            return types.SimpleNamespace(save=lambda: saved.append(True))

    monkeypatch.setitem(sys.modules, "coverage", types.SimpleNamespace(Coverage=Coverage))
    reactor = Triggers()
    tap.save_coverage_at_shutdown(reactor)
    [(phase, event, save)] = reactor.triggers
    assert (phase, event) == ("after", "shutdown")
    save()  # type: ignore[operator]
    assert saved == [True]
    monkeypatch.setitem(sys.modules, "coverage", None)
    tap.save_coverage_at_shutdown(reactor)
    assert len(reactor.triggers) == 1
