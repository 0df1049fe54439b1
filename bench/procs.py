"""
Child processes for the benchmark: started under ``taskset`` on chosen CPUs,
logging to a file, stopped with SIGTERM then SIGKILL, and measured from /proc:
CPU time (user + system, from ``/proc/PID/task/*/schedstat``, else
``/proc/PID/stat``) and resident memory (``VmRSS`` from ``/proc/PID/status``),
each summed over the process and all its descendants (the workers of
``--workers 2``, nginx's worker, uvicorn's server).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_count() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def free_port() -> int:
    """A loopback port free now (the kernel's choice); a server is told it next."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit(wanted: int = 16384) -> int:
    """Raise this process's open-file limit (inherited by its children); the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def _die_with_parent() -> None:
    """In the child: SIGTERM when the benchmark dies (Linux's PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc/PID/task/TID/children."""
    found = [pid]
    i = 0
    while i < len(found):
        current = found[i]
        i += 1
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children", encoding="ascii") as f:
                    found.extend(int(c) for c in f.read().split())
            except OSError:
                continue
    return found


def _schedstat_seconds(pid: int) -> float | None:
    """CPU seconds of all threads of ``pid`` from schedstat (nanoseconds); None without it."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
    return total / 1e9


def _stat_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # After "pid (comm)": fields[11] is utime and fields[12] is stime, in clock ticks.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_seconds(pids: Sequence[int]) -> float:
    """
    User + system CPU seconds so far of ``pids`` (a process that is gone counts
    0): from ``/proc/PID/task/*/schedstat``, in nanoseconds, where the kernel
    has it, since ``/proc/PID/stat`` counts in clock ticks (10 ms), too coarse
    for a few seconds of a single stream; from ``/proc/PID/stat`` otherwise.
    """
    total = 0.0
    for pid in pids:
        precise = _schedstat_seconds(pid)
        total += precise if precise is not None else _stat_seconds(pid)
    return total


def rss_kib(pids: Sequence[int]) -> int:
    """The sum of ``VmRSS`` of ``pids``, in KiB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def pinned(args: Sequence[str], cpus: str | None) -> list[str]:
    """``args`` under ``taskset -c cpus`` when there is a taskset and CPUs are given."""
    taskset = shutil.which("taskset")
    if cpus is None or taskset is None:
        return list(args)
    return [taskset, "-c", cpus, *args]


class Child:
    """A process of the benchmark, with its log file."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log: Path,
        cpus: str | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.args = pinned(args, cpus)
        self.cpus = cpus
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env if env is not None else os.environ.copy(),
            cwd=cwd,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tree(self) -> list[int]:
        return descendants(self.proc.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.tree())

    def rss_kib(self) -> int:
        return rss_kib(self.tree())

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in reversed(self.tree()):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                self.proc.wait()
        self._log.close()


def wait_until(check: Callable[[], bool], timeout: float, what: str, child: Child) -> None:
    """Poll ``check`` until it is true; fail with the child's log when it exits or times out."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{what} exited early:\n{child.log_tail()}")
        try:
            if check():
                return
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {timeout}s ({last}):\n{child.log_tail()}")
