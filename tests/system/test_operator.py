"""
What an operator sees of ``twistd -n llmproxy``: the start-up summary,
``--check-config`` (like ``nginx -t``), a config error on one line, and a
Ctrl-C right after start that ends it cleanly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

from llmproxy.testing.processes import Mock, Process, Proxy, twistd, upstream_block, wait_for
from tests.system.harness import CORE_MODELS, ROOT, UPSTREAM_KEY, StartProxy

SHIPPED = ROOT / "etc" / "llmproxy.yaml"


def check(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = twistd("llmproxy", "--check-config", *args)
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=cwd)


def test_check_config_on_the_shipped_config_binds_nothing(tmp_path: Path) -> None:
    # A port this test listens on: a twistd that tried to bind it would fail.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        listen = f"tcp:{port}:interface=127.0.0.1"
        done = check("--config", str(SHIPPED), "--listen", listen, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == [
        f"config: {SHIPPED} (--config)",
        f"listen: {listen}",
        "upstreams (1): default → http://127.0.0.1:8001/v1",
        "models (3): gpt-4o-mini → default/gpt-4o-mini (round_robin); "
        "gpt-4o → default/gpt-4o (round_robin); "
        "text-embedding-3-small → default/text-embedding-3-small (round_robin)",
        "cache: memory, ttl 3600s, scope key, at most 268435456 bytes",
        "auth: open: no client keys, any client is let in; no admin keys",
        f"llmproxy: config {SHIPPED} is valid",
    ]
    assert done.stderr == ""


def test_check_config_on_a_broken_config_is_one_line_naming_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(SHIPPED.read_text().replace("ttl: 3600", "ttl: -5"))
    for args in (["--check-config"], []):
        command = twistd("llmproxy", *args, "--config", str(broken))
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 1
        assert done.stdout == ""
        assert done.stderr == f"llmproxy: {broken}: cache.ttl: must be > 0, got -5\n"


def test_help_keeps_the_usage(tmp_path: Path) -> None:
    done = subprocess.run(
        twistd("llmproxy", "--help"), capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0
    assert "--check-config" in done.stdout and "--config=" in done.stdout


def test_the_start_up_summary_is_logged(start: StartProxy, mock: Mock) -> None:
    proxy = start(upstream_block([mock], api_key=UPSTREAM_KEY) + CORE_MODELS, "summary")
    log = proxy.process.log()
    assert f"config: {proxy.config_path} (--config)" in log
    assert "listen: tcp:0:interface=127.0.0.1\n" in log
    assert f"upstreams (1): main → {mock.base_url}\n" in log
    assert "models (3): gpt-4o-mini → main/mock-model (round_robin); " in log
    assert "cache: off\n" in log
    assert "auth: open: no client keys" in log
    assert f"llmproxy listening on 127.0.0.1:{proxy.port} (tcp:0:interface=127.0.0.1)" in log
    assert UPSTREAM_KEY not in log


def test_ctrl_c_right_after_start_exits_cleanly(tmp_path: Path, mock: Mock) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text(upstream_block([mock]) + CORE_MODELS)
    command = twistd("llmproxy", "--config", str(config), "--listen", "tcp:0:interface=127.0.0.1")
    process = Process(command, tmp_path / "interrupted.log", cwd=tmp_path)
    try:
        # As soon as llmproxy's own code runs (it logs the summary before binding).
        wait_for(lambda: "config: " in process.log(), what="the start-up summary")
        process.signal(signal.SIGINT)
        status = process.proc.wait(timeout=30)
    finally:
        process.stop()
    log = process.log()
    assert status in (0, -signal.SIGINT), log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    assert "Server Shut Down." in log


def test_the_mock_and_the_proxy_say_the_port_they_got(proxy: Proxy, mock: Mock) -> None:
    assert f"llmproxy-mock listening on 127.0.0.1:{mock.port}" in mock.process.log()
    assert proxy.port != mock.port


def test_twistd_runs_on_the_reactor_the_matrix_asks_for(proxy: Proxy, mock: Mock) -> None:
    wanted = os.environ.get("LLMPROXY_TEST_REACTOR") or "epoll"
    name = {"asyncio": "AsyncioSelectorReactor", "epoll": "EPollReactor"}.get(wanted, wanted)
    for log in (proxy.process.log(), mock.process.log()):
        assert f"reactor class: twisted.internet.{wanted}reactor.{name}" in log
