"""Streaming readers with bounded memory: line chunks, and JSON arrays item by item (ijson).

A malformed file stops the stage with an `InputDataError` naming the file and the position
(line, column, byte) of the problem.

Shared by ingest (the annotation files) and dedup (the evaluation sets' files).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import ijson

from contract.errors import InputDataError

_BLOCK = 1 << 20
# A UTF-8 byte order mark (Windows editors and Excel write one): not part of the first line or value.
BOM = b"\xef\xbb\xbf"


def read_line_chunks(path: str, n: int) -> Iterator[tuple[int, list[bytes], int]]:
    """Yield ``(first line number, raw lines, bytes)`` for consecutive chunks of ``n`` lines."""
    with open(path, "rb") as f:
        line_no = 1
        while lines := list(itertools.islice(f, n)):
            nbytes = sum(map(len, lines))
            if line_no == 1 and lines[0].startswith(BOM):
                lines[0] = lines[0][len(BOM) :]
            yield line_no, lines, nbytes
            line_no += len(lines)


def count_lines(path: str) -> int:
    """Number of lines (a last line without a newline counts)."""
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


class CountingReader:
    """File wrapper that remembers how far the JSON parser has read, and the last block it got
    (to pinpoint the byte of a syntax error that yajl reports only with a text snippet)."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.pos = 0
        self.last = b""
        self.last_start = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        start = self.pos
        self.pos += len(data)
        if start == 0 and data.startswith(BOM):
            data, start = data[len(BOM) :], len(BOM)  # not JSON: the parser would stop at it
        self.last_start, self.last = start, data
        return data


def line_col(path: str, offset: int) -> tuple[int, int]:
    line, consumed = 1, 0
    col_start = 0
    with open(path, "rb") as f:
        while consumed < offset and (block := f.read(min(_BLOCK, offset - consumed))):
            nl = block.count(b"\n")
            if nl:
                line += nl
                col_start = consumed + block.rfind(b"\n") + 1
            consumed += len(block)
    return line, offset - col_start + 1


def _error_offset(exc: Exception, reader: CountingReader) -> int | None:
    """Byte offset of a yajl syntax error. yajl prints ~30 characters either side of the error,
    newlines shown as spaces, with a caret under the bad byte: find that text in the block."""
    lines = str(exc).splitlines()
    if "premature EOF" in (lines[0] if lines else ""):
        return reader.pos
    if len(lines) >= 3 and "^" in lines[2]:
        caret = lines[2].index("^")
        before, after = lines[1][:caret].lstrip(" "), lines[1][caret:]
        needle = (before + after).encode("utf-8", "replace")
        for block in (reader.last.replace(b"\n", b" ").replace(b"\r", b" "), reader.last):
            idx = block.find(needle) if needle else -1
            if idx >= 0 and block.find(needle, idx + 1) < 0:
                return reader.last_start + idx + len(before.encode("utf-8", "replace"))
    return None


def json_error(path: str, exc: Exception, reader: CountingReader) -> InputDataError:
    lines = str(exc).splitlines()
    reason = lines[0].removeprefix("parse error: ").strip() if lines else type(exc).__name__
    offset = _error_offset(exc, reader)
    if offset is None:
        start, end = reader.last_start, reader.pos
        l1, _ = line_col(path, start)
        where = f"between bytes {start} and {end} (from line {l1})"
    else:
        line, col = line_col(path, offset)
        where = f"at line {line}, column {col} (byte {offset})"
    return InputDataError(f"{path}: invalid JSON {where}: {reason}")


def _first_event(path: str) -> tuple[str, Any]:
    with open(path, "rb") as f:
        reader = CountingReader(f)
        try:
            for _prefix, event, value in ijson.parse(reader):
                return event, value
        except ijson.JSONError as exc:
            raise json_error(path, exc, reader) from None
    raise InputDataError(f"{path}: empty file, expected JSON")


def _find_container(path: str, key: str) -> str | None:
    """Event type that opens the top-level ``key`` (``start_array``, …), or None if absent."""
    with open(path, "rb") as f:
        reader = CountingReader(f)
        try:
            for prefix, event, _value in ijson.parse(reader):
                if prefix == key and event != "map_key":
                    return event
        except ijson.JSONError as exc:
            raise json_error(path, exc, reader) from None
    return None


class JsonArrayStream:
    """Items of one array in a JSON file, streamed: the top-level array (``key=None``) or the array
    under a top-level key; ``sub`` streams nested arrays (``item.regions.item`` for VG).

    ``pos`` is the number of bytes parsed so far (for progress bars)."""

    def __init__(self, path: str, key: str | None = None, sub: str | None = None):
        self.path, self.key, self.sub = path, key, sub
        self.pos = 0

    def __iter__(self) -> Iterator[Any]:
        if file_size(self.path) == 0:
            raise InputDataError(f"{self.path}: empty file, expected JSON")
        expected = "start_map" if self.key else "start_array"
        event, _ = _first_event(self.path)
        if event != expected:
            shape = "an object" if expected == "start_map" else "an array"
            raise InputDataError(f"{self.path}: expected {shape} at the top level, found {_describe(event)}")
        prefix = ".".join(p for p in (self.key, "item", self.sub) if p)
        n = 0
        with open(self.path, "rb") as f:
            reader = CountingReader(f)
            try:
                for item in ijson.items(reader, prefix, use_float=True):
                    n += 1
                    self.pos = reader.pos
                    yield item
            except ijson.JSONError as exc:
                raise json_error(self.path, exc, reader) from None
            self.pos = reader.pos
        if n == 0 and self.key:
            found = _find_container(self.path, self.key)
            if found is None:
                raise InputDataError(
                    f"{self.path}: expected a top-level key {self.key!r} holding an array; it is missing"
                )
            if found != "start_array":
                raise InputDataError(f"{self.path}: expected {self.key!r} to be an array, found {_describe(found)}")


def _describe(event: str) -> str:
    return {
        "start_map": "an object",
        "start_array": "an array",
        "string": "a string",
        "number": "a number",
        "boolean": "a boolean",
        "null": "null",
    }.get(event, event)


def file_size(path: str) -> int:
    return Path(path).stat().st_size
