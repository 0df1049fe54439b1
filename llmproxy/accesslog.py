"""
The structured access log: one line per finished request, to a file or to
standard output, as compact JSON or as logfmt text.

:class:`AccessLog` formats each record at once on the reactor thread and keeps
the line in memory; a timer (and a full buffer) hands what is kept to one
writer thread, which does the ``os.write`` calls, so a slow disk never stalls
the reactor and the lines keep their order.  Several worker processes may
append to one file: it is opened with ``O_APPEND`` and every ``write()`` holds
only whole lines, so one process's record is never cut by another's.  The
writer thread also reopens the file for logrotate (:meth:`AccessLog.reopen`)
and moves to another path or format on a config reload
(:meth:`AccessLog.retarget`), both in order with the writes queued before.
"""

from __future__ import annotations

import json
import os
import queue
import re
import select
import threading
from collections.abc import Callable, Iterator, Mapping
from functools import partial

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel

#: The fields of a record, in the order every line carries them.
FIELDS = (
    "time",
    "request_id",
    "client",
    "key",
    "method",
    "path",
    "endpoint",
    "model",
    "upstream",
    "upstream_model",
    "attempts",
    "status",
    "error_code",
    "cache",
    "coalesced",
    "stream",
    "ttfb_ms",
    "duration_ms",
    "upstream_ttfb_ms",
    "overhead_ms",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "tokens_estimated",
    "cost_usd",
    "saved_usd",
    "bytes_in",
    "bytes_out",
)

#: The formats a log can be written in.
FORMATS = ("json", "text")

#: The path that stands for standard output.
STDOUT = "-"

Record = Mapping[str, object]
#: What the writer thread tells the reactor thread to log: level, format, fields.
Report = tuple[LogLevel, str, dict[str, object]]


class AccessLogError(Exception):
    """The access log cannot be opened (raised by ``startService``)."""


def format_json(record: Record) -> bytes:
    """
    ``record`` as one compact JSON object and a newline: the :data:`FIELDS` in
    order (a missing one as ``null``, unknown keys dropped).  Non-ASCII text is
    escaped (``\\u00e9``), so a line is pure ASCII: no encoding can fail and no
    Unicode line separator can split it.  A value JSON cannot hold is written
    as its ``str()``.
    """
    values = {name: record.get(name) for name in FIELDS}
    try:
        text = _dumps(values)
    except Exception:  # noqa: BLE001 - NaN, cycles, odd keys: fall back field by field
        text = _dumps({name: _json_safe(value) for name, value in values.items()})
    return text.encode("ascii") + b"\n"


def format_text(record: Record) -> bytes:
    """
    ``record`` as one logfmt line: ``name=value`` for each of the :data:`FIELDS`
    in order, ``-`` for a missing one.  A value is quoted when it is empty, is
    ``-`` itself, or holds a space, ``"``, ``=`` or anything unprintable;
    inside quotes ``\\``, ``"`` and unprintable characters (newlines too) are
    backslash-escaped, so no value can end the line or forge a field.
    Printable non-ASCII text is kept, in UTF-8.
    """
    line = " ".join(f"{name}={_logfmt(record.get(name))}" for name in FIELDS)
    return (line + "\n").encode("utf-8", "backslashreplace")


def _dumps(value: object) -> str:
    return _ENCODER.encode(value)


def _json_safe(value: object) -> object:
    """``value`` if JSON can hold it, else its text."""
    try:
        _dumps(value)
    except Exception:  # noqa: BLE001 - anything JSON refuses becomes text
        return _text(value)
    return value


def _text(value: object) -> str:
    """``str(value)``, or something close when even that fails."""
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - a log line must not fail over one value
        try:
            return repr(value)
        except Exception:  # noqa: BLE001
            return f"<unprintable {type(value).__name__}>"


#: One encoder for every record (``json.dumps`` with options builds one per call).
_ENCODER = json.JSONEncoder(
    ensure_ascii=True, separators=(",", ":"), allow_nan=False, default=_text
)


_PLAIN = re.compile(r'[^ "=]+')
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _logfmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = value if isinstance(value, str) else _text(value)
    if text != "-" and _PLAIN.fullmatch(text) and text.isprintable():
        return text
    if text.isprintable():  # the common case: a space, a quote or an "="
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return '"' + "".join(map(_escape, text)) + '"'


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable():
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


_FORMATTERS: dict[str, Callable[[Record], bytes]] = {"json": format_json, "text": format_text}


def formatter(format: str) -> Callable[[Record], bytes]:
    """The formatting function of ``format`` (one of :data:`FORMATS`)."""
    try:
        return _FORMATTERS[format]
    except KeyError:
        raise ValueError(f"unknown access log format {format!r} (one of {FORMATS})") from None


def open_log(path: str) -> int:
    """A descriptor that appends to ``path``, created (mode 0o640) if need be."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    return os.open(path, flags, 0o640)


def pieces(chunk: bytes, limit: int) -> Iterator[bytes]:
    """
    ``chunk`` (whole lines) cut at line ends into pieces of at most ``limit``
    bytes; a line longer than ``limit`` is a piece of its own.
    """
    start = 0
    while len(chunk) - start > limit:
        cut = chunk.rfind(b"\n", start, start + limit) + 1  # after the last line that fits
        if cut <= start:  # the first line alone is too long: all of it, in one piece
            cut = chunk.find(b"\n", start + limit) + 1 or len(chunk)
        yield chunk[start:cut]
        start = cut
    if start < len(chunk):
        yield chunk[start:]


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``, after partial writes and a full pipe too."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:  # a non-blocking pipe that is full: wait until it drains
            select.select([], [fd], [], 1.0)
            continue
        if written <= 0:
            raise OSError(f"write() to descriptor {fd} wrote nothing")
        view = view[written:]


class Writer:
    """
    The one thread that writes an access log, doing what it is handed in the
    order it was handed.  It reports its troubles in :attr:`reports` instead of
    logging them (the reactor thread logs them), once per stretch of failures.
    """

    def __init__(self, path: str, fd: int, stdout: int = 1, limit: int = 1 << 24) -> None:
        self.path = path
        self.fd = fd
        self.stdout = stdout
        self.limit = limit
        self._queued = 0  # bytes handed over and not yet written
        self._lock = threading.Lock()
        self.reports: queue.SimpleQueue[Report] = queue.SimpleQueue()
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lost: int | None = None  # records lost since writes began to fail
        self._thread = threading.Thread(target=self._run, name="llmproxy access log", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def write(self, chunk: bytes) -> bool:
        """Append ``chunk`` (whole lines) to the log; ``False``: refused, ``limit`` bytes wait."""
        with self._lock:
            if self._queued and self._queued + len(chunk) > self.limit:
                return False
            self._queued += len(chunk)
        self._tasks.put(partial(self._write, chunk))
        return True

    def switch(self, path: str) -> None:
        """Close the file and open ``path`` (the same one, for logrotate) in its place."""
        self._tasks.put(partial(self._switch, path))

    def wait(self, timeout: float) -> bool:
        """Block until what was handed over so far is done (``False``: not in time)."""
        done = threading.Event()
        self._tasks.put(done.set)
        return done.wait(timeout)

    def stop(self, timeout: float) -> bool:
        """Do what was handed over, close the file and end the thread (``False``: not in time)."""
        self._tasks.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            try:
                task()
            except Exception as e:  # noqa: BLE001 - the thread must outlive any mishap
                self._report(LogLevel.error, "access log writer: {error!r}", error=e)
        self._close()

    def _write(self, chunk: bytes) -> None:
        try:
            self._write_out(chunk)
        finally:
            with self._lock:
                self._queued -= len(chunk)

    def _write_out(self, chunk: bytes) -> None:
        parts = pieces(chunk, select.PIPE_BUF) if self.path == STDOUT else [chunk]
        done = 0
        try:
            for part in parts:
                write_all(self.fd, part)
                done += len(part)
        except OSError as e:
            if self._lost is None:
                self._report(
                    LogLevel.error,
                    "cannot write the access log {path}: {error}; records are lost until it works",
                    path=self.path,
                    error=e,
                )
                self._lost = 0
            self._lost += chunk.count(b"\n", done)
            return
        if self._lost is not None:
            self._report(
                LogLevel.info,
                "access log {path} written again, {lost} records were lost",
                path=self.path,
                lost=self._lost,
            )
            self._lost = None

    def _switch(self, path: str) -> None:
        try:
            fd = self.stdout if path == STDOUT else open_log(path)
        except OSError as e:
            self._report(
                LogLevel.error,
                "cannot open the access log {new}: {error}; still writing to {path}",
                new=path,
                error=e,
                path=self.path,
            )
            return
        self._close()
        self.path, self.fd = path, fd

    def _close(self) -> None:
        if self.path == STDOUT:
            return
        try:
            os.close(self.fd)
        except OSError as e:
            self._report(
                LogLevel.warn, "closing the access log {path}: {error}", path=self.path, error=e
            )

    def _report(self, level: LogLevel, format: str, **fields: object) -> None:
        self.reports.put((level, format, fields))


class AccessLog(Service):
    """
    The access log of a process, as a service: :meth:`write` one record per
    finished request; the lines reach ``path`` (``-``: standard output) every
    ``flush_interval`` seconds (0: each at once), or as soon as more than
    ``max_buffer`` bytes wait.  Stopping writes everything that waits, for up to
    :attr:`stop_timeout` seconds.  Records are dropped (and the drop logged)
    rather than kept without bound while the log is not running or while the
    writer thread is :attr:`max_queued` bytes behind.
    """

    log = Logger()
    #: Seconds ``stopService`` waits for the writer thread to finish.
    stop_timeout = 5.0
    #: Bytes handed to the writer thread and not yet written past which records are
    #: dropped (a disk that hangs must not take the memory of the process with it).
    max_queued = 16 * 1024 * 1024
    #: The descriptor ``-`` stands for.
    stdout = 1

    def __init__(
        self,
        reactor: IReactorTime,
        path: str,
        format: str = "json",
        flush_interval: float = 1.0,
        max_buffer: int = 64 * 1024,
    ) -> None:
        self.reactor = reactor
        self.path = path
        self.format = format
        self._format = formatter(format)
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self._lines: list[bytes] = []
        self._size = 0
        self._dropped = 0  # records refused: not running, or the writer too far behind
        self._dropped_said = float("-inf")  # when the last drop was logged
        self._writer: Writer | None = None
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        """Open the log (:class:`AccessLogError` if it cannot be) and start writing."""
        try:
            fd = self.stdout if self.path == STDOUT else open_log(self.path)
        except OSError as e:
            raise AccessLogError(f"cannot open the access log {self.path!r}: {e}") from e
        self._writer = Writer(self.path, fd, self.stdout, self.max_queued)
        self._writer.start()
        self._start_loop()
        super().startService()

    def _start_loop(self) -> None:
        """Flush every ``flush_interval`` seconds (with 0, :meth:`write` flushes)."""
        self._stop_loop()
        if self.flush_interval > 0:
            self._loop = LoopingCall(self.flush)
            self._loop.clock = self.reactor
            self._loop.start(self.flush_interval, now=False)

    def _stop_loop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def stopService(self) -> None:
        """Write what waits, close the file; this blocks, for up to :attr:`stop_timeout`."""
        super().stopService()
        self._stop_loop()
        self._dropped_said = float("-inf")  # the last word on drops, whenever the one before
        self.flush()
        writer, self._writer = self._writer, None
        if writer is None:
            return
        if not writer.stop(self.stop_timeout):
            self.log.warn(
                "the access log {path} was not written out in {timeout}s",
                path=writer.path,
                timeout=self.stop_timeout,
            )
        self._log_reports(writer)

    def write(self, record: Record) -> None:
        """Log ``record`` (a mapping of :data:`FIELDS`); this never blocks nor raises."""
        try:
            line = self._format(record)
        except Exception:  # noqa: BLE001 - e.g. a mapping that fails to look up
            self.log.failure("cannot format an access log record")
            return
        if self._writer is None and self._size >= self.max_buffer:
            self._dropped += 1  # not running: keep no more than a buffer's worth
            return
        self._lines.append(line)
        self._size += len(line)
        if self._size > self.max_buffer or not self.flush_interval:
            self.flush()

    def flush(self) -> None:
        """Hand what is buffered to the writer thread now (this does not wait for it)."""
        writer = self._writer
        if writer is None:
            return
        if self._lines:
            if not writer.write(b"".join(self._lines)):
                self._dropped += len(self._lines)
            self._lines, self._size = [], 0
        # Said at most once a second, however often the log is flushed (flush: 0).
        if self._dropped and self.reactor.seconds() >= self._dropped_said + 1.0:
            self._dropped_said = self.reactor.seconds()
            self.log.warn(
                "{count} access log records were dropped: the log was not running, or"
                " {path} fell more than {limit} bytes behind",
                count=self._dropped,
                path=self.path,
                limit=self.max_queued,
            )
            self._dropped = 0
        self._log_reports(writer)

    def wait(self, timeout: float) -> bool:
        """
        Block until the writer thread has written all it was handed so far (not
        what is still buffered: :meth:`flush` first); ``False`` if it has not in
        ``timeout`` seconds.  For tests and tools: the reactor never waits.
        """
        return self._writer is None or self._writer.wait(timeout)

    def reopen(self) -> None:
        """Reopen the file at the path, after what was logged so far (for logrotate)."""
        self.flush()
        if self._writer is not None and self.path != STDOUT:
            self._writer.switch(self.path)

    def retarget(self, path: str, format: str, flush_interval: float | None = None) -> None:
        """
        Write what comes from now on to ``path`` in ``format`` (and flush every
        ``flush_interval`` seconds, when given), after what came so far.
        """
        make = formatter(format)  # ValueError before anything changes
        self.flush()
        self.path, self.format, self._format = path, format, make
        if self._writer is not None:
            self._writer.switch(path)
        if flush_interval is not None and flush_interval != self.flush_interval:
            self.flush_interval = flush_interval
            if self._writer is not None:
                self._start_loop()

    def _log_reports(self, writer: Writer) -> None:
        while True:
            try:
                level, format, fields = writer.reports.get_nowait()
            except queue.Empty:
                return
            self.log.emit(level, format, **fields)
