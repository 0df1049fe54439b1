"""
The access log: both line formats, the buffer on a Clock, the writer thread
(logrotate, retarget, write errors, standard output in whole-line pieces) and
several processes appending to one file.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from llmproxy import accesslog
from llmproxy.accesslog import (
    FIELDS,
    AccessLog,
    AccessLogError,
    format_json,
    format_text,
    pieces,
    write_all,
)

WAIT = 10.0  # seconds the writer thread gets before a test gives up on it


def record(**fields: object) -> dict[str, object]:
    """A typical record of a finished chat completion, with ``fields`` changed."""
    base: dict[str, object] = {
        "time": "2024-05-01T12:00:00.123Z",
        "request_id": "req-1",
        "client": "10.0.0.1",
        "key": "team-a",
        "method": "POST",
        "path": "/v1/chat/completions",
        "endpoint": "chat",
        "model": "gpt-4o",
        "upstream": "openai",
        "upstream_model": "gpt-4o-2024-05-13",
        "attempts": 1,
        "status": 200,
        "error_code": None,
        "cache": "miss",
        "coalesced": False,
        "stream": True,
        "ttfb_ms": 120.5,
        "duration_ms": 900.25,
        "upstream_ttfb_ms": 110.0,
        "overhead_ms": 3.5,
        "input_tokens": 12,
        "cached_input_tokens": 4,
        "output_tokens": 30,
        "reasoning_tokens": 6,
        "tokens_estimated": False,
        "cost_usd": 0.000123,
        "saved_usd": None,
        "bytes_in": 345,
        "bytes_out": 6789,
    }
    base.update(fields)
    return base


_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^ "]*)(?: |$)')


def parse_text(line: bytes) -> list[tuple[str, str]]:
    """A logfmt line's (name, raw value) pairs; fails the test if the line is not all pairs."""
    text = line.decode("utf-8")
    assert text.endswith("\n") and "\n" not in text[:-1], text
    pairs = [(m.group(1), m.group(2)) for m in _PAIR.finditer(text[:-1])]
    assert " ".join(f"{k}={v}" for k, v in pairs) == text[:-1], f"not logfmt: {text!r}"
    return pairs


def unquote(raw: str) -> str:
    """A logfmt value as the text it stands for."""
    if not raw.startswith('"'):
        return raw
    return raw[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")

    def __repr__(self) -> str:
        raise RuntimeError("nor a repr")


class JSONFormatTests(SynchronousTestCase):
    def test_every_field_in_order_missing_as_null_unknown_dropped(self) -> None:
        line = format_json({"status": 200, "time": "t", "secret": "sk-123"})
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        parsed = json.loads(line)
        assert list(parsed) == list(FIELDS)
        assert parsed["time"] == "t" and parsed["status"] == 200 and parsed["model"] is None
        assert b"sk-123" not in line and b" " not in line  # compact

    def test_a_full_record_round_trips(self) -> None:
        assert json.loads(format_json(record())) == record()

    def test_non_ascii_and_newlines_are_escaped(self) -> None:
        value = 'caf\u00e9 "x"\nstatus=500\u2028\ud800'
        line = format_json(record(path=value))
        assert line.count(b"\n") == 1 and line.isascii()
        assert b"\\u00e9" in line and b"\\u2028" in line and b"\\n" in line
        assert json.loads(line)["path"] == value

    def test_what_json_cannot_hold_is_written_as_text(self) -> None:
        line = format_json(
            record(
                model=object(),
                cache={("tuple", "key"): 1},
                ttfb_ms=float("nan"),
                upstream=b"bytes",
                key=Unprintable(),
                bytes_in=10**5000,  # past Python's int-to-text limit
            )
        )
        parsed = json.loads(line)
        assert list(parsed) == list(FIELDS)
        assert parsed["model"].startswith("<object object at")
        assert parsed["cache"] == "{('tuple', 'key'): 1}"
        assert parsed["ttfb_ms"] == "nan" and parsed["upstream"] == "b'bytes'"
        assert parsed["key"] == "<unprintable Unprintable>"
        assert parsed["bytes_in"] == "<unprintable int>"
        assert parsed["status"] == 200  # the others keep their types


class TextFormatTests(SynchronousTestCase):
    def test_every_field_in_order_missing_as_dash(self) -> None:
        line = format_text({"method": "POST", "path": "/v1/chat/completions", "status": 200})
        pairs = parse_text(line)
        assert [k for k, _ in pairs] == list(FIELDS)
        values = dict(pairs)
        assert values["method"] == "POST" and values["path"] == "/v1/chat/completions"
        assert values["status"] == "200" and values["time"] == "-" and values["model"] == "-"

    def test_plain_values_are_bare(self) -> None:
        line = format_text(record())
        assert line.startswith(b"time=2024-05-01T12:00:00.123Z request_id=req-1 client=10.0.0.1 ")
        assert b" error_code=- cache=miss coalesced=false stream=true ttfb_ms=120.5 " in line
        assert line.endswith(b" bytes_in=345 bytes_out=6789\n")

    def test_spaces_quotes_and_equals_are_quoted(self) -> None:
        values = dict(
            parse_text(format_text(record(model="a b", key='say "hi"', path="/x?a=b", cache="")))
        )
        assert values["model"] == '"a b"'
        assert values["key"] == '"say \\"hi\\""'
        assert values["path"] == '"/x?a=b"'
        assert values["cache"] == '""'  # empty, not missing

    def test_a_dash_is_not_taken_for_a_missing_value(self) -> None:
        values = dict(parse_text(format_text(record(model="-", key=None))))
        assert values["model"] == '"-"' and values["key"] == "-"

    def test_a_value_cannot_split_the_line_nor_forge_a_field(self) -> None:
        forged = 'x" status=500 key="admin\nrequest_id=evil status=200\r\t\x00\u2028\\'
        line = format_text(record(model=forged, upstream="caf\u00e9"))
        pairs = parse_text(line)  # still one line of exactly the FIELDS
        assert [k for k, _ in pairs] == list(FIELDS)
        values = dict(pairs)
        assert values["status"] == "200" and values["key"] == "team-a"
        assert unquote(values["model"]) == forged
        assert values["upstream"] == "caf\u00e9"  # printable non-ASCII stays, in UTF-8
        assert b"\r" not in line and b"\x00" not in line

    def test_what_has_no_text_still_makes_a_line(self) -> None:
        values = dict(parse_text(format_text(record(model=Unprintable(), cache=object()))))
        assert values["model"] == '"<unprintable Unprintable>"'
        assert values["cache"].startswith('"<object object at')


class Files:
    """A temporary directory for a test, and access logs that stop when it ends."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.case = case
        self.dir = Path(tempfile.mkdtemp(prefix="accesslog-"))
        case.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = Clock()

    def log(
        self, format: str = "json", flush_interval: float = 1.0, max_buffer: int = 1 << 16
    ) -> AccessLog:
        access = AccessLog(
            self.clock, str(self.dir / "access.log"), format, flush_interval, max_buffer
        )
        access.startService()
        self.case.addCleanup(stopped, access)
        return access

    def lines(self, name: str = "access.log") -> list[bytes]:
        path = self.dir / name
        return path.read_bytes().splitlines(keepends=True) if path.exists() else []


def stopped(access: AccessLog) -> None:
    """Stop ``access`` if a test left it running (its thread must not outlive the test)."""
    if access.running:
        access.stopService()


def written(access: AccessLog) -> None:
    """Wait until the writer thread has written all it was handed."""
    assert access.wait(WAIT), "the writer thread did not finish in time"


def ids(lines: list[bytes]) -> list[str]:
    return [json.loads(line)["request_id"] for line in lines]


class BufferTests(SynchronousTestCase):
    def test_nothing_is_written_before_the_timer_fires(self) -> None:
        files = Files(self)
        access = files.log(flush_interval=1.0)
        access.write(record(request_id="a"))
        access.write(record(request_id="b"))
        written(access)
        assert files.lines() == []
        files.clock.advance(0.99)
        written(access)
        assert files.lines() == []
        files.clock.advance(0.01)
        written(access)
        assert ids(files.lines()) == ["a", "b"]
        access.write(record(request_id="c"))
        files.clock.advance(1.0)  # and again at the next tick
        written(access)
        assert ids(files.lines()) == ["a", "b", "c"]

    def test_a_full_buffer_is_written_at_once(self) -> None:
        files = Files(self)
        size = len(format_json(record()))
        access = files.log(max_buffer=2 * size)
        access.write(record(request_id="a"))
        access.write(record(request_id="b"))  # exactly full: it waits
        written(access)
        assert files.lines() == []
        access.write(record(request_id="c"))  # past full: written without the timer
        written(access)
        assert ids(files.lines()) == ["a", "b", "c"]
        assert files.clock.seconds() == 0

    def test_stopping_writes_what_waits_and_leaves_no_timer(self) -> None:
        files = Files(self)
        access = files.log()
        access.write(record(request_id="a"))
        access.stopService()
        assert ids(files.lines()) == ["a"]  # stopService waited for the thread
        assert files.clock.getDelayedCalls() == []
        assert not access.running

    def test_records_before_the_start_are_written_once_started(self) -> None:
        files = Files(self)
        access = AccessLog(files.clock, str(files.dir / "access.log"), max_buffer=1)
        access.write(record(request_id="early"))
        access.write(record(request_id="dropped"))  # a buffer's worth is kept, no more
        access.startService()
        with capturedLogs() as events:
            access.stopService()
        assert ids(files.lines()) == ["early"]
        assert [e["count"] for e in events if "count" in e] == [1]

    def test_the_file_is_created_for_the_owner_and_group_only(self) -> None:
        files = Files(self)
        files.log().stopService()
        mode = stat.S_IMODE(os.stat(files.dir / "access.log").st_mode)
        assert mode & 0o137 == 0, oct(mode)  # at most 0o640, whatever the umask

    def test_text_lines_are_written_as_text(self) -> None:
        files = Files(self)
        access = files.log(format="text")
        access.write(record())
        access.stopService()
        assert files.lines() == [format_text(record())]


class WriterTests(SynchronousTestCase):
    def test_reopen_after_logrotate_writes_to_a_new_file(self) -> None:
        files = Files(self)
        access = files.log()
        access.write(record(request_id="before"))
        access.flush()
        written(access)
        os.rename(files.dir / "access.log", files.dir / "access.log.1")
        access.write(record(request_id="buffered"))  # logged before the reopen
        access.reopen()
        access.write(record(request_id="after"))
        access.stopService()
        assert ids(files.lines("access.log.1")) == ["before", "buffered"]
        assert ids(files.lines()) == ["after"]

    def test_a_flush_of_zero_hands_each_record_over_at_once(self) -> None:
        files = Files(self)
        access = files.log(flush_interval=0)
        access.write(record(request_id="a"))
        written(access)
        assert ids(files.lines()) == ["a"]
        assert files.clock.getDelayedCalls() == []  # no timer to fire

    def test_retarget_changes_the_flush_interval(self) -> None:
        files = Files(self)
        access = files.log(flush_interval=1.0)
        access.retarget(str(files.dir / "access.log"), "json", 0.25)
        access.write(record(request_id="a"))
        files.clock.advance(0.25)
        written(access)
        assert ids(files.lines()) == ["a"]
        access.retarget(str(files.dir / "access.log"), "json", 0)
        access.write(record(request_id="b"))
        written(access)
        assert ids(files.lines()) == ["a", "b"]
        assert files.clock.getDelayedCalls() == []
        access.retarget(str(files.dir / "access.log"), "json", 2.0)
        access.write(record(request_id="c"))
        files.clock.advance(1.99)
        written(access)
        assert ids(files.lines()) == ["a", "b"]
        files.clock.advance(0.01)
        written(access)
        assert ids(files.lines()) == ["a", "b", "c"]

    def test_retarget_moves_path_and_format_in_order(self) -> None:
        files = Files(self)
        access = files.log()
        access.write(record(request_id="first"))
        access.retarget(str(files.dir / "other.log"), "text")
        access.write(record(request_id="second"))
        access.stopService()
        assert ids(files.lines()) == ["first"]
        assert files.lines("other.log") == [format_text(record(request_id="second"))]

    def test_an_unknown_format_changes_nothing(self) -> None:
        files = Files(self)
        access = files.log()
        self.assertRaises(ValueError, access.retarget, str(files.dir / "x.log"), "xml")
        access.write(record())
        access.stopService()
        assert len(files.lines()) == 1 and not (files.dir / "x.log").exists()
        self.assertRaises(ValueError, AccessLog, files.clock, "-", "xml")

    def test_an_unopenable_path_fails_at_start_naming_it(self) -> None:
        files = Files(self)
        for path in (files.dir / "no" / "such" / "dir.log", files.dir):
            access = AccessLog(files.clock, str(path))
            error = self.assertRaises(AccessLogError, access.startService)
            assert str(path) in str(error), str(error)
            assert not access.running and files.clock.getDelayedCalls() == []
            access.stopService()  # a tree that failed to start still stops it, quietly

    def test_write_errors_are_logged_once_and_the_recovery_too(self) -> None:
        if not os.path.exists("/dev/full"):
            self.skipTest("needs /dev/full")
        files = Files(self)
        access = files.log()
        with capturedLogs() as events:
            access.retarget("/dev/full", "json")  # every write fails: ENOSPC
            for i in range(3):
                access.write(record(request_id=f"lost-{i}"))
                access.flush()
            written(access)
            access.retarget(str(files.dir / "access.log"), "json")
            access.write(record(request_id="kept"))
            access.flush()
            written(access)
            access.flush()  # the reports reach the log at the next flush
        errors = [e for e in events if e["log_level"] is LogLevel.error]
        assert len(errors) == 1 and errors[0]["path"] == "/dev/full", errors
        assert [e["lost"] for e in events if "lost" in e] == [3]
        assert ids(files.lines()) == ["kept"]

    def hang_the_writer(self) -> threading.Event:
        """The writer thread waits in its first write until the event is set."""
        release = threading.Event()
        self.addCleanup(release.set)

        def hanging(fd: int, data: bytes) -> None:
            assert release.wait(WAIT), "the test never released the writer"
            write_all(fd, data)

        self.patch(accesslog, "write_all", hanging)
        return release

    def test_a_writer_that_hangs_does_not_take_all_the_memory(self) -> None:
        files = Files(self)
        release = self.hang_the_writer()
        self.patch(AccessLog, "max_queued", 3 * len(format_json(record())))
        access = files.log()
        for name in ("a", "b", "c"):  # "a" hangs, "b" and "c" wait: the limit
            access.write(record(request_id=name))
            access.flush()
        access.write(record(request_id="d"))
        access.write(record(request_id="e"))
        with capturedLogs() as events:
            access.flush()
        release.set()
        access.stopService()
        assert ids(files.lines()) == ["a", "b", "c"]
        assert [e["count"] for e in events if "count" in e] == [2]

    def test_drops_are_said_once_a_second_even_when_each_record_is_flushed(self) -> None:
        files = Files(self)
        release = self.hang_the_writer()
        self.patch(AccessLog, "max_queued", len(format_json(record())))
        access = files.log(flush_interval=0)
        with capturedLogs() as events:
            for name in "abcdef":  # "a" hangs, every later record is dropped
                access.write(record(request_id=name))
            files.clock.advance(0.5)
            access.write(record(request_id="g"))
            files.clock.advance(0.5)
            access.write(record(request_id="h"))
        release.set()
        access.stopService()
        assert ids(files.lines()) == ["a"]
        assert [e["count"] for e in events if "count" in e] == [1, 6]

    def test_a_reopen_that_fails_keeps_the_old_file(self) -> None:
        files = Files(self)
        access = files.log()
        access.retarget(str(files.dir / "gone" / "x.log"), "json")
        access.write(record(request_id="still"))
        with capturedLogs() as events:
            access.stopService()
        assert ids(files.lines()) == ["still"]
        assert any(e.get("new") == str(files.dir / "gone" / "x.log") for e in events)


class StandardOutputTests(SynchronousTestCase):
    def pipe(self) -> tuple[int, int]:
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        return read, write

    def test_writes_are_whole_lines_of_at_most_pipe_buf(self) -> None:
        read, write = self.pipe()
        calls: list[bytes] = []

        def recording(fd: int, data: bytes) -> None:
            calls.append(bytes(data))
            write_all(fd, data)

        self.patch(accesslog, "write_all", recording)
        access = AccessLog(Clock(), "-", max_buffer=1 << 20)
        access.stdout = write
        access.startService()
        sent = [format_json(record(request_id=str(i), path="/" + "p" * i * 40)) for i in range(40)]
        for i in range(40):
            access.write(record(request_id=str(i), path="/" + "p" * i * 40))
        access.reopen()  # nothing to reopen on standard output
        access.stopService()
        assert os.fstat(write)  # standard output stays open
        assert b"".join(calls) == b"".join(sent) and len(calls) > 1
        assert all(len(c) <= select.PIPE_BUF and c.endswith(b"\n") for c in calls)
        assert os.read(read, 1 << 20) == b"".join(sent)

    def test_pieces_cut_at_line_ends(self) -> None:
        assert list(pieces(b"", 10)) == []
        assert list(pieces(b"aaa\nbbb\nccc\n", 8)) == [b"aaa\nbbb\n", b"ccc\n"]
        assert list(pieces(b"aaa\n" + b"x" * 20 + b"\nb\n", 8)) == [
            b"aaa\n",
            b"x" * 20 + b"\n",  # too long for a piece: alone, and whole
            b"b\n",
        ]
        assert list(pieces(b"aaaaaaa\n", 8)) == [b"aaaaaaa\n"]

    def test_partial_writes_are_completed(self) -> None:
        read, write = self.pipe()
        real = os.write
        self.patch(accesslog.os, "write", lambda fd, data: real(fd, bytes(data[:3])))
        write_all(write, b"0123456789\n")
        assert os.read(read, 100) == b"0123456789\n"

    def test_a_full_nonblocking_pipe_is_waited_for(self) -> None:
        read, write = self.pipe()
        os.set_blocking(write, False)
        filled = 0
        try:
            while True:
                filled += os.write(write, b"f" * 4096)
        except BlockingIOError:
            pass
        data = b"line\n" * 1000
        writer = threading.Thread(target=write_all, args=(write, data), daemon=True)
        writer.start()
        received = bytearray()
        deadline = time.monotonic() + WAIT
        while len(received) < filled + len(data):
            assert time.monotonic() < deadline, "the blocked write never finished"
            if select.select([read], [], [], 0.1)[0]:
                received += os.read(read, 65536)
        writer.join(WAIT)
        assert not writer.is_alive() and bytes(received[filled:]) == data


WORKER = """
import sys
from twisted.internet.task import Clock
from llmproxy.accesslog import AccessLog

path, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
access = AccessLog(Clock(), path, max_buffer=4096)
access.startService()
print("ready", flush=True)
sys.stdin.readline()
for i in range(count):
    access.write({"request_id": f"{name}-{i}", "path": "/v1/" + "x" * (i * 37 % 900)})
access.stopService()
"""


def stop(worker: subprocess.Popen[str]) -> None:
    """Make sure a worker is gone and its pipes closed."""
    worker.kill()
    worker.wait()
    for pipe in (worker.stdin, worker.stdout):
        if pipe is not None:
            pipe.close()


class ProcessesTests(SynchronousTestCase):
    def test_processes_appending_to_one_file_write_whole_lines(self) -> None:
        files = Files(self)
        path, count = str(files.dir / "access.log"), 5000
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, path, f"w{n}", str(count)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for n in range(4)
        ]
        for worker in workers:
            self.addCleanup(stop, worker)
            assert worker.stdout is not None and worker.stdout.readline() == "ready\n"
        for worker in workers:  # all at once, so that their writes meet
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        assert [worker.wait(60) for worker in workers] == [0, 0, 0, 0]
        seen: dict[str, list[int]] = {}
        for line in files.lines():
            parsed = json.loads(line)  # a cut or merged line fails here
            assert list(parsed) == list(FIELDS)
            name, number = parsed["request_id"].split("-")
            seen.setdefault(name, []).append(int(number))
        assert seen == {f"w{n}": list(range(count)) for n in range(4)}
