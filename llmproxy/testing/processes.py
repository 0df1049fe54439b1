"""
Real processes on loopback ports, for system tests and benchmarks:
``twistd -n llmproxy``, ``twistd -n llmproxy-mock`` and a private
``redis-server``.  Each is waited for by polling with a deadline, writes its
output to a log file, and is stopped with SIGTERM (then SIGKILL).  On Linux a
child also gets SIGTERM if the process that started it dies without cleaning up.

The proxy and the mock listen on port 0 and say which port they got in their
log (``llmproxy listening on 127.0.0.1:PORT``), which is read from there: no
port is probed and released for them, so parallel test runs cannot collide.
``redis-server`` (and its sentinel) cannot listen on port 0 (``--port 0``
turns TCP off), so they take a :func:`free_port` and start again on another
when another process took it first.

The environment variable ``LLMPROXY_TEST_REACTOR`` (e.g. ``asyncio``) makes
every ``twistd`` here run with ``--reactor=...``.

Nothing here imports the reactor: it runs from plain pytest tests and scripts.
"""

from __future__ import annotations

import ctypes
import http.client
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

#: Where this interpreter's console scripts (``twistd``) are.
BIN = Path(sys.executable).parent

T = TypeVar("T")


#: free_port's ports: below the kernel's ephemeral range (32768 and up on
#: Linux), where every port-0 bind lands, in a block of 400 per pytest-xdist
#: worker, from a point of its own in the block.
_BLOCK = 400
_worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
_base = 20000 + (int(_worker) % 30 if _worker.isdigit() else 0) * _BLOCK
_offsets = itertools.count(random.randrange(_BLOCK))


def free_port() -> int:
    """
    A port free now, for a server that must be told its port before it starts
    (redis-server, its sentinel, nginx).  It is released here, so another
    process could take it first: :func:`start_on_a_free_port` tries again.
    """
    for _ in range(_BLOCK):
        port = _base + next(_offsets) % _BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {_base}..{_base + _BLOCK - 1}")


_closed: list[socket.socket] = []


def closed_port() -> int:
    """
    A loopback port that refuses every connection for as long as this process
    lives: bound here but never listening, so no other process can take it.
    """
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _closed.append(s)
    return int(s.getsockname()[1])


class PortTaken(AssertionError):
    """
    The server could not bind the port it was given: another process has it.
    (An AssertionError, so that :func:`wait_for` stops polling at once.)
    """


def start_on_a_free_port(start: Callable[[int], None], attempts: int = 5) -> int:
    """``start(port)`` on a :func:`free_port`, again on another while it raises PortTaken."""
    for _ in range(attempts - 1):
        port = free_port()
        try:
            start(port)
            return port
        except PortTaken:
            continue
    port = free_port()
    start(port)
    return port


#: How a proxy and a mock say where they listen (see llmproxy.workers.address).
LISTENING = {
    "llmproxy": re.compile(r"llmproxy listening on 127\.0\.0\.1:(\d+)"),
    "llmproxy-mock": re.compile(r"llmproxy-mock listening on 127\.0\.0\.1:(\d+)"),
}


def wait_for(
    check: Callable[[], T], timeout: float = 15.0, what: str = "condition", interval: float = 0.01
) -> T:
    """
    Poll ``check`` every ``interval`` seconds until it returns something
    truthy, or fail after ``timeout``.  A check that costs much (one that
    sends a request or runs ``redis-cli``) and waits on something slow takes a
    longer ``interval``, so the wait does not burn a core.
    """
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
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last})")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def require_binary(name: str, package: str) -> str:
    """The path of ``name``, or an AssertionError that says how to install it."""
    found = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if found is None:
        raise AssertionError(
            f"this needs the `{name}` binary, which is not installed: "
            f"run `apt-get install -y {package}` (Debian/Ubuntu) and try again"
        )
    return found


def twistd(*args: str) -> list[str]:
    """
    A foreground ``twistd`` command line without a pid file (with
    ``--reactor=$LLMPROXY_TEST_REACTOR`` when that is set).
    """
    reactor = os.environ.get("LLMPROXY_TEST_REACTOR")
    chosen = [f"--reactor={reactor}"] if reactor else []
    return [str(BIN / "twistd"), "--pidfile=", *chosen, "-n", *args]


def _die_with_parent() -> None:
    """
    In the child: get SIGTERM when the parent dies (Linux's PR_SET_PDEATHSIG),
    and SIGINT as from a terminal (a test run started in the background by a
    shell ignores it, and every child would inherit that).
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


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
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env or os.environ.copy(),
            cwd=cwd,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait_listening(self, port: int, what: str, timeout: float = 15.0) -> None:
        """Wait until ``port`` accepts connections; fail at once if the process exits."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{what} exited early:\n{self.log()}")
            return port_open(port)

        wait_for(ready, timeout, what=f"{what} on port {port}")

    def wait_port(self, pattern: re.Pattern[str], what: str, timeout: float = 15.0) -> int:
        """The port the process says in its log (``pattern``'s group) it listens on."""

        def said() -> int | None:
            found = pattern.search(self.log())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                raise AssertionError(f"{what} exited early:\n{self.log()}")
            return None

        port = wait_for(said, timeout, what=f"{what} to say its port")
        assert port is not None
        return port

    def taken(self) -> bool:
        """It exited because its port was in use."""
        return self.proc.poll() is not None and "in use" in self.log()

    def wait_line(
        self,
        text: str,
        port: int,
        what: str,
        timeout: float = 15.0,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        """
        Wait for a server told to listen on ``port`` to write ``text`` in its
        log, or for ``ready()``: its own word that it listens (a connection
        could reach another process on a taken port); PortTaken if it could not
        have the port.
        """

        def done() -> bool:
            if self.taken():
                raise PortTaken(f"{what}: port {port} is taken")
            if self.proc.poll() is not None:
                raise AssertionError(f"{what} exited early:\n{self.log()}")
            return ready() if ready is not None else text in self.log()

        try:
            wait_for(done, timeout, what=f"{what} on port {port}")
        except PortTaken:
            self.stop()
            raise

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


class Server:
    """A process serving HTTP on a loopback port."""

    port: int
    process: Process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def stop(self) -> int | None:
        return self.process.stop()


class Mock(Server):
    """A ``twistd -n llmproxy-mock`` process and its HTTP control surface."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        api_key: str | None = None,
        port: int | None = None,
        timeout: float = 15.0,
    ) -> None:
        self.name = name
        args = twistd(
            "llmproxy-mock", "--listen", f"tcp:{port or 0}:interface=127.0.0.1", "--name", name
        )
        if api_key:
            args += ["--api-key", api_key]
        self.process = Process(args, workdir / f"mock-{name}.log", cwd=workdir)
        self.port = self.process.wait_port(LISTENING["llmproxy-mock"], f"mock {name}", timeout)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read() or b"null")

    def reset(self) -> None:
        self.call("POST", "/_mock/reset", {})

    def configure(self, **knobs: Any) -> None:
        self.call("POST", "/_mock/config", knobs)

    def release(self) -> None:
        """Let the requests held by the ``gate`` knob go."""
        self.call("POST", "/_mock/release", {})

    def stats(self) -> dict[str, int]:
        found: dict[str, int] = self.call("GET", "/_mock/stats")
        return found

    def requests(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call("GET", "/_mock/requests")
        return found


class Proxy(Server):
    """A ``twistd -n llmproxy`` process on a port of its own (port 0) with a given config."""

    def __init__(
        self,
        workdir: Path,
        config: str,
        name: str = "proxy",
        env: dict[str, str] | None = None,
        timeout: float = 15.0,
        workers: int = 1,
    ) -> None:
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(config)
        args = twistd(
            "llmproxy", "--config", str(self.config_path), "--listen", "tcp:0:interface=127.0.0.1"
        )
        if workers != 1:
            args += ["--workers", str(workers)]
        self.process = Process(args, workdir / f"{name}.log", env=env, cwd=workdir)
        self.port = self.process.wait_port(LISTENING["llmproxy"], "llmproxy", timeout)

    def rss_kib(self) -> int:
        return proc_status(self.process.pid)["VmRSS"]


def upstream_block(mocks: list[Mock], api_key: str | None = None, extra: str = "") -> str:
    """The ``upstreams:`` section of a config naming each mock after itself."""
    lines = ["upstreams:"]
    for mock in mocks:
        lines.append(f"  {mock.name}:\n    base_url: {mock.base_url}")
        if api_key:
            lines.append(f"    api_key: {api_key}")
        if extra:
            lines.append(extra)
    return "\n".join(lines) + "\n"


def redis_cli(cli: str, port: int, *args: str) -> str:
    """One ``redis-cli`` command against the server (or sentinel) on ``port``; its raw reply."""
    done = subprocess.run(
        [cli, "-p", str(port), "--raw", *args], capture_output=True, text=True, timeout=10
    )
    return done.stdout.strip()


class RedisServer:
    """
    A private ``redis-server`` on a free port, never the machine's own; with
    ``replicaof``, a replica of that other one (``--replicaof``); ``options``
    go on its command line.
    """

    def __init__(
        self, workdir: Path, replicaof: RedisServer | None = None, options: Sequence[str] = ()
    ) -> None:
        self.binary = require_binary("redis-server", "redis-server")
        self.cli = require_binary("redis-cli", "redis-tools")
        self.workdir = workdir
        self.port = 0
        self.replicaof = replicaof
        self.options = list(options)
        self.process: Process | None = None
        start_on_a_free_port(self._start_on)

    def _start_on(self, port: int) -> None:
        self.port = port
        self.start()

    def start(self) -> None:
        """Start it (again) on its port; PortTaken if another process has that port."""
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        # A replica writes the master's snapshot to disk: one file per server.
        # A master sends it at once (Redis waits 5 s for more replicas to come).
        args += ["--dbfilename", f"redis-{self.port}.rdb", "--repl-diskless-sync-delay", "0"]
        if self.replicaof is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replicaof.port)]
        args += self.options
        process = self.process = Process(args, self.workdir / f"redis-{self.port}.log")
        try:
            process.wait_line("Ready to accept connections", self.port, "redis-server")
        except PortTaken:
            self.process = None
            raise
        wait_for(self.ping, what=f"redis-server on port {self.port}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        return self.cli_call("PING") == "PONG"

    def cli_call(self, *args: str) -> str:
        return redis_cli(self.cli, self.port, *args)

    def pause(self) -> None:
        assert self.process is not None
        self.process.signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.signal(signal.SIGCONT)

    def role(self) -> str:
        """``master`` or ``slave``, as the server itself says (``ROLE``)."""
        return self.cli_call("ROLE").split("\n", 1)[0]

    def synced(self) -> bool:
        """A replica that has finished its first sync with its master."""
        return "master_link_status:up" in self.cli_call("INFO", "replication")

    def kill(self) -> None:
        """Crash it (SIGKILL): no shutdown, no goodbye to its clients or replicas."""
        if self.process is not None:
            self.resume()
            self.process.signal(signal.SIGKILL)
            self.process.stop()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.resume()
            self.process.stop()
            self.process = None


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB (empty when /proc is not there)."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0])
    except OSError:
        pass
    return found


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (the workers of a ``--workers`` parent), on Linux."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 when /proc is not there)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # After "pid (comm)": fields[11] is utime and fields[12] is stime, in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sentinel_command(config: Path) -> list[str]:
    """
    The command line of a sentinel reading ``config``: ``redis-sentinel``, or
    ``redis-server --sentinel`` (the same program); an AssertionError that says
    how to install it when neither is there.
    """
    sentinel = shutil.which("redis-sentinel")
    if sentinel is not None:
        return [sentinel, str(config)]
    server = shutil.which("redis-server") or (
        "/usr/sbin/redis-server" if Path("/usr/sbin/redis-server").exists() else None
    )
    if server is None:
        raise AssertionError(
            "this needs Redis Sentinel (`redis-sentinel`, or `redis-server --sentinel`), "
            "which is not installed: run `apt-get install -y redis-server redis-sentinel` "
            "(Debian/Ubuntu) and try again"
        )
    return [server, str(config), "--sentinel"]


def _records(text: str) -> list[dict[str, str]]:
    """The maps of a ``redis-cli --raw`` list of maps (each one starts with ``name``)."""
    lines = text.split("\n")
    found: list[dict[str, str]] = []
    for key, value in zip(lines[::2], lines[1::2], strict=False):
        if key == "name":
            found.append({})
        if found:
            found[-1][key] = value
    return found


class RedisSentinel:
    """
    A private Redis Sentinel on a free port, watching ``master`` under the name
    ``name``.  Its config file (which Sentinel rewrites as it learns) is in
    ``workdir``.  ``down_after`` and ``failover_timeout`` are in milliseconds,
    short so that a test's failover takes a second or two.
    """

    def __init__(
        self,
        workdir: Path,
        master: RedisServer,
        name: str = "llmproxy",
        quorum: int = 1,
        down_after: int = 500,
        failover_timeout: int = 2000,
    ) -> None:
        self.cli = require_binary("redis-cli", "redis-tools")
        self.workdir = workdir
        self.name = name
        self.port = 0
        self.config_path = workdir / "sentinel.conf"
        self.process: Process

        def start(port: int) -> None:
            self.port = port
            self.config_path = workdir / f"sentinel-{port}.conf"
            self.config_path.write_text(
                f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {workdir}\n"
                f"sentinel monitor {name} 127.0.0.1 {master.port} {quorum}\n"
                f"sentinel down-after-milliseconds {name} {down_after}\n"
                f"sentinel failover-timeout {name} {failover_timeout}\n"
                f"sentinel parallel-syncs {name} 1\n"
            )
            self.process = Process(
                sentinel_command(self.config_path), workdir / f"sentinel-{port}.log"
            )
            self.process.wait_line("Running mode=sentinel", port, "redis sentinel")
            self.process.wait_listening(port, f"sentinel on port {port}")

        start_on_a_free_port(start)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cli_call(self, *args: str) -> str:
        return redis_cli(self.cli, self.port, *args)

    def master_port(self) -> int | None:
        """The port of the server this sentinel names as the master now."""
        reply = self.cli_call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name).split()
        return int(reply[1]) if len(reply) == 2 and reply[1].isdigit() else None

    def replicas(self) -> list[dict[str, str]]:
        """What this sentinel knows of the master's replicas (``SENTINEL REPLICAS``)."""
        return _records(self.cli_call("SENTINEL", "REPLICAS", self.name))

    def sentinels(self) -> list[dict[str, str]]:
        """The other sentinels this one knows of (``SENTINEL SENTINELS``)."""
        return _records(self.cli_call("SENTINEL", "SENTINELS", self.name))

    def ready(self, replicas: int, others: int = 0) -> bool:
        """It sees ``replicas`` healthy, synced replicas and ``others`` other sentinels."""
        healthy = [
            r
            for r in self.replicas()
            if r.get("flags") == "slave" and r.get("master-link-status") == "ok"
        ]
        return len(healthy) >= replicas and len(self.sentinels()) >= others

    def failover(self) -> bool:
        """Ask for a failover now (``SENTINEL FAILOVER``); False while it cannot start one."""
        return self.cli_call("SENTINEL", "FAILOVER", self.name) == "OK"

    def stop(self) -> None:
        self.process.stop()


@dataclass(frozen=True)
class Reply:
    """An HTTP answer as a test reads it: status, lower-cased headers, body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def exchange(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """
    One request on ``conn``, whatever its status: ``body`` sent as JSON, or as
    it is when it is bytes (a malformed body, a form).
    """
    sent = dict(headers or {})
    data = None
    if isinstance(body, bytes):
        data = body
    elif body is not None:
        data = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    conn.request(method, path, data, sent)
    response = conn.getresponse()
    found = response.read()
    return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, found)


def http_call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Reply:
    """One request on a connection of its own (with ``--workers``, any worker may take it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        return exchange(conn, method, path, body, headers)
    finally:
        conn.close()


def workers_answering(port: int, count: int, timeout: float = 15.0) -> dict[int, int]:
    """
    The pid and index of each worker that answers ``GET /health`` on ``port``,
    asked on fresh connections until ``count`` different ones have answered.
    """
    seen: dict[int, int] = {}

    def all_answered() -> bool:
        worker = http_call(port, "GET", "/health").json()["worker"]
        seen[worker["pid"]] = worker["index"]
        return len(seen) >= count

    wait_for(all_answered, timeout, what=f"{count} workers answering on port {port}")
    return seen
