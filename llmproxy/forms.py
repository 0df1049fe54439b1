"""
multipart/form-data request bodies (audio transcriptions, image edits, file
uploads): read as they stream in, forwarded without being held in memory.

twisted.web spools every request body as it arrives: up to 100 KB in memory,
anything larger to a temporary file.  A :class:`FormReader` is fed the same
chunks as they arrive (``python-multipart``'s streaming parser), and keeps
only the small text fields (``model``, ``stream``, ``response_format``...)
and where the ``model`` value lies in the body; file parts are only counted.
Once the body is in, :class:`Upload` forwards it from the spool: byte for
byte, or with the ``model`` value alone replaced when the target's model
name differs from the public one, every other part (the file included)
unchanged.  Each attempt of a failover reads the spool afresh, as a file the
forwarder sends with a FileBodyProducer (paced by the upstream connection).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import IO, Any, cast

import attrs
from python_multipart.multipart import MultipartParser, parse_options_header

from llmproxy import errors

#: The largest text field kept (a prompt may be long; a model name is short).
MAX_FIELD = 64 * 1024
#: Text fields whose values are booleans in the API (``stream=true``).
_BOOLEANS = frozenset({"stream"})


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/form-data`` content type (None: not one)."""
    kind, options = parse_options_header(content_type)
    if kind.lower() != b"multipart/form-data":
        return None
    return options.get(b"boundary") or None


def reader_for(content_type: Sequence[bytes] | None) -> FormReader | None:
    """A reader for a body of this ``Content-Type`` (its raw values), if it is a form."""
    boundary = boundary_of(content_type[0].decode("latin-1")) if content_type else None
    return FormReader(boundary) if boundary is not None else None


class FormReader:
    """
    Parses a multipart body fed chunk by chunk, as it arrives.  After the last
    chunk, :meth:`form` gives the text fields and the ``model`` value's span
    (or raises the 400 the body deserves).
    """

    def __init__(self, boundary: bytes) -> None:
        self._offset = 0  # body bytes fed so far
        self._chunk = b""
        self._fields: dict[str, bytes] = {}
        self._spans: dict[str, tuple[int, int]] = {}
        self._name: str | None = None
        self._is_file = False
        self._value: bytearray | None = None
        self._header = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._error: str | None = None
        self._ended = False
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda d, s, e: self._header.extend(d[s:e]),
                "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._chunk = data
        try:
            self._parser.write(data)
        except Exception as e:  # noqa: BLE001 - python-multipart raises its own kinds
            self._error = f"The multipart body is malformed ({type(e).__name__})."
        self._offset += len(data)

    def form(self, content: IO[bytes], length: int, content_type: str) -> Upload:
        """The whole body is in (spooled to ``content``): what it holds."""
        if self._error is None and not self._ended:
            self._error = "The multipart body ends before its closing boundary."
        if self._error is not None:
            raise errors.bad_request(self._error)
        span = self._spans.get("model")
        if span is not None and not _holds(content, span, self._fields["model"]):
            # The parser gave part of the value from its look-behind buffer:
            # where it lies is not known, so it cannot be rewritten in place.
            raise errors.bad_request("The multipart 'model' field could not be located.")
        fields = {k: v.decode("utf-8", "replace") for k, v in self._fields.items()}
        return Upload(content, length, content_type, fields, span)

    # -- python-multipart callbacks ------------------------------------------------

    def _part_begin(self) -> None:
        self._name, self._is_file, self._disposition = None, False, b""
        self._value = None

    def _header_end(self) -> None:
        if bytes(self._header).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        self._name = name.decode("utf-8", "replace") if name is not None else None
        self._is_file = b"filename" in options
        if self._name is not None and not self._is_file and self._name not in self._fields:
            self._value = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._value is None:
            return  # a file, or a field seen before: not kept
        if self._name == "model" and "model" not in self._spans and not self._value:
            # Where the value begins in the body, when this piece is of this chunk.
            where = self._offset + start if data is self._chunk else -1
            self._spans["model"] = (where, where)
        self._value.extend(data[start:end])
        if len(self._value) > MAX_FIELD:
            self._error = f"The multipart field '{self._name}' is larger than {MAX_FIELD} bytes."
            self._value = None

    def _part_end(self) -> None:
        if self._value is not None and self._name is not None:
            self._fields[self._name] = bytes(self._value)
            if self._name == "model" and "model" in self._spans:
                start = self._spans["model"][0]
                self._spans["model"] = (start, start + len(self._value))
        self._value = None

    def _end(self) -> None:
        self._ended = True


def _holds(content: IO[bytes], span: tuple[int, int], value: bytes) -> bool:
    """Does the spooled body hold ``value`` at ``span``?"""
    start, end = span
    if start < 0:
        return False
    content.seek(start)
    return content.read(end - start) == value


@attrs.frozen
class Upload:
    """A multipart body, spooled, and the text fields it carries."""

    content: IO[bytes] = attrs.field(repr=False)
    length: int
    content_type: str
    #: The text fields (no file parts), as sent.
    fields: Mapping[str, str]
    #: Where the ``model`` value lies in the body, when there is one.
    model_span: tuple[int, int] | None = None

    def payload(self) -> dict[str, Any]:
        """The fields as a JSON body would have them (``stream=true`` is a boolean)."""
        found: dict[str, Any] = dict(self.fields)
        for name in _BOOLEANS & found.keys():
            found[name] = found[name].strip().lower() == "true"
        return found

    def body(self, model: str | None = None) -> IO[bytes]:
        """
        The body to send, as a file read from the spool: as it came, or with
        ``model`` as the value of its model field.
        """
        segments: list[tuple[IO[bytes], int, int]] = []
        if model is None or self.model_span is None or model == self.fields.get("model"):
            segments.append((self.content, 0, self.length))
        else:
            start, end = self.model_span
            value = model.encode("utf-8")
            segments += [
                (self.content, 0, start),
                (io.BytesIO(value), 0, len(value)),
                (self.content, end, self.length),
            ]
        return cast(IO[bytes], _Segments(segments))  # a file, as FileBodyProducer reads one


class _Segments(io.RawIOBase):
    """Byte ranges of files, read in turn as one seekable file (what FileBodyProducer reads)."""

    def __init__(self, segments: list[tuple[IO[bytes], int, int]]) -> None:
        self._segments = segments
        self._size = sum(end - start for _, start, end in segments)
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, min(self._size, base + offset))
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        wanted = self._size - self._position if size is None or size < 0 else size
        out = bytearray()
        skip = self._position
        for source, start, end in self._segments:
            span = end - start
            if skip >= span:
                skip -= span
                continue
            take = min(span - skip, wanted - len(out))
            # The spool is shared by every attempt: always seek before reading.
            source.seek(start + skip)
            out += source.read(take)
            skip = 0
            if len(out) >= wanted:
                break
        self._position += len(out)
        return bytes(out)
