"""
Real processes for system tests: ``twistd -n llmproxy``, ``twistd -n
llmproxy-mock``, and (where a test needs them) ``redis-server`` and nginx, each
on a free port, waited for by polling with a deadline, and stopped at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - polling: the thing may not be up yet
            last = e
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last})")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def require_binary(name: str, package: str) -> str:
    found = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if found is None:
        raise AssertionError(
            f"this test needs the `{name}` binary, which is not installed: "
            f"run `apt-get install -y {package}` (Debian/Ubuntu) and try again"
        )
    return found


class Process:
    """A child process with its log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(
        self, args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.args = args
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env or os.environ.copy(),
            cwd=cwd,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def twistd(*args: str) -> list[str]:
    return [str(BIN / "twistd"), "--pidfile=", "-n", *args]


class Mock:
    """A ``twistd -n llmproxy-mock`` process and its HTTP control surface."""

    def __init__(self, tmp: Path, name: str, api_key: str | None = None) -> None:
        self.name = name
        self.port = free_port()
        args = twistd(
            "llmproxy-mock", "--listen", f"tcp:{self.port}:interface=127.0.0.1", "--name", name
        )
        if api_key:
            args += ["--api-key", api_key]
        self.process = Process(args, tmp / f"mock-{name}.log")
        wait_for(lambda: port_open(self.port), what=f"mock {name} on port {self.port}")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read() or b"null")

    def reset(self) -> None:
        self._call("POST", "/_mock/reset", {})

    def configure(self, **knobs: Any) -> None:
        self._call("POST", "/_mock/config", knobs)

    def stats(self) -> dict[str, int]:
        return self._call("GET", "/_mock/stats")  # type: ignore[no-any-return]

    def requests(self) -> list[dict[str, Any]]:
        return self._call("GET", "/_mock/requests")  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.process.stop()


class Proxy:
    """A ``twistd -n llmproxy`` process on a free port with a given config."""

    def __init__(
        self, tmp: Path, config: str, name: str = "proxy", env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.config_path = tmp / f"{name}.yaml"
        self.config_path.write_text(config)
        args = twistd(
            "llmproxy",
            "--config",
            str(self.config_path),
            "--listen",
            f"tcp:{self.port}:interface=127.0.0.1",
        )
        self.process = Process(args, tmp / f"{name}.log", env=env)
        wait_for(lambda: self._ready(), what=f"llmproxy on port {self.port}")

    def _ready(self) -> bool:
        if self.process.proc.poll() is not None:
            raise AssertionError(f"llmproxy exited early:\n{self.process.log()}")
        return port_open(self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> int | None:
        return self.process.stop()


def upstream_block(mocks: list[Mock], api_key: str | None = None, extra: str = "") -> str:
    lines = ["upstreams:"]
    for mock in mocks:
        lines.append(f"  {mock.name}:\n    base_url: {mock.base_url}")
        if api_key:
            lines.append(f"    api_key: {api_key}")
        if extra:
            lines.append(extra)
    return "\n".join(lines) + "\n"


class RedisServer:
    """A private ``redis-server`` on a free port, never the machine's own."""

    def __init__(self, tmp: Path) -> None:
        self.binary = require_binary("redis-server", "redis-server")
        self.cli = require_binary("redis-cli", "redis-tools")
        self.tmp = tmp
        self.port = free_port()
        self.process: Process | None = None
        self.start()

    def start(self) -> None:
        self.process = Process(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            self.tmp / f"redis-{self.port}.log",
        )
        wait_for(lambda: self.ping(), what=f"redis-server on port {self.port}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        return self.cli_call("PING") == "PONG"

    def cli_call(self, *args: str) -> str:
        done = subprocess.run(
            [self.cli, "-p", str(self.port), "--raw", *args],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout.strip()

    def pause(self) -> None:
        assert self.process is not None
        self.process.signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.resume()
            self.process.stop()
            self.process = None


class Nginx:
    """nginx in front of a proxy, with the shipped site config (etc/nginx/llmproxy.conf)."""

    SITE = Path(__file__).resolve().parents[2] / "etc" / "nginx" / "llmproxy.conf"

    def __init__(self, tmp: Path, proxy_port: int) -> None:
        binary = require_binary("nginx", "nginx")
        self.port = free_port()
        root = tmp / "nginx"
        (root / "logs").mkdir(parents=True, exist_ok=True)
        site = self.SITE.read_text()
        site = site.replace("server 127.0.0.1:8080", f"server 127.0.0.1:{proxy_port}")
        site = site.replace("listen 80;", f"listen 127.0.0.1:{self.port};")
        site = site.replace("listen [::]:80;", "")
        site = site.replace("/var/log/nginx/", f"{root}/logs/")
        (root / "site.conf").write_text(site)
        temp = "".join(
            f"    {name}_temp_path {root}/{name};\n"
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (root / "nginx.conf").write_text(
            f"daemon off;\nworker_processes 1;\npid {root}/nginx.pid;\n"
            f"error_log {root}/logs/error.log;\nevents {{ worker_connections 256; }}\n"
            f"http {{\n{temp}    access_log off;\n    include {root}/site.conf;\n}}\n"
        )
        self.process = Process(
            [binary, "-p", str(root), "-c", str(root / "nginx.conf")], root / "logs" / "stdout.log"
        )
        wait_for(lambda: self._ready(), what=f"nginx on port {self.port}")

    def _ready(self) -> bool:
        if self.process.proc.poll() is not None:
            raise AssertionError(f"nginx exited early:\n{self.process.log()}")
        return port_open(self.port)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.process.stop()


def raw_post(
    port: int,
    body: dict[str, Any],
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
) -> socket.socket:
    """Send a POST over a bare socket (to watch the bytes arrive) and return the socket."""
    data = json.dumps(body).encode()
    head = "".join(
        f"{k}: {v}\r\n"
        for k, v in {
            "Host": "llm.example.com",
            "Content-Type": "application/json",
            "Content-Length": str(len(data)),
            **(headers or {}),
        }.items()
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + data)
    return sock


def read_until(
    sock: socket.socket,
    done: Callable[[bytes], bool],
    what: str,
    timeout: float = 15.0,
    received: bytes = b"",
) -> bytes:
    """
    Read from ``sock`` until ``done(received)`` (``received`` may carry what an
    earlier read got); fail if the socket closes or the deadline passes.
    """
    deadline = time.monotonic() + timeout
    while not done(received):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for {what}; received {received[-500:]!r}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            raise AssertionError(f"connection closed before {what}; received {received[-500:]!r}")
        received += chunk
    return received


def events_arrived(count: int) -> Callable[[bytes], bool]:
    return lambda received: received.count(b"\n\n") >= count


def response_ended(received: bytes) -> bool:
    """The terminating chunk of a chunked response has arrived."""
    return received.endswith(b"0\r\n\r\n")
