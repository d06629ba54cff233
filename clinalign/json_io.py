"""JSON files in and out: the one strict JSONL reader (every line of a file is an object or a bad line
with its number) and the one JSON writer (atomic: temp file + rename).

    from clinalign.json_io import BadLine, read_jsonl
    for number, value in read_jsonl(path, "pairs file"):
        if isinstance(value, BadLine):  # counted and reported by the caller, never raised
            print(f"{path}:{number}: skipped ({value})")

Lines are split on "\\n" only (a trailing "\\r" is dropped), never with `str.splitlines()`: an
unescaped U+2028 inside a JSON string is legal and must not split a line, and line numbers are
those an editor shows. A UTF-8 byte-order mark is stripped. Each line is decoded on its own, so a
non-UTF-8 byte spoils only its line. `loads` is also the parser for whole JSON documents
(`clinalign.data.sources`): NaN/Infinity are refused (they are not JSON, and output must stay strict
JSON), and a lone surrogate (`"\\ud800"`, which no UTF-8 file can hold) is replaced by U+FFFD so
that the record survives and can be written.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clinalign.errors import ClinalignError

BOM = b"\xef\xbb\xbf"


class BadLine(str):
    """A line that is not one JSON value: the string is the reason, `text` the line (when decodable)."""

    text: str = ""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_refuse_constant)


def _fix_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(value, list):
        return [_fix_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_fix_surrogates(k): _fix_surrogates(v) for k, v in value.items()}
    return value


def loads(text: str, **kwargs: Any) -> Any:
    """`json.loads` without NaN/Infinity and with lone surrogates replaced (U+FFFD).

    Raises ValueError for bad JSON and RecursionError for nesting deeper than the interpreter allows.
    """
    decoder = json.JSONDecoder(parse_constant=_refuse_constant, **kwargs) if kwargs else _decoder
    value = decoder.decode(text)
    if "\\u" in text and ("\\ud" in text.lower()):  # an escaped surrogate: paired ones are already joined
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            value = _fix_surrogates(value)
    return value


def parse_line(raw: bytes) -> Any:
    """One line (bytes, without its "\\n"): its JSON value, or a `BadLine` saying why not."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadLine(f"not UTF-8 ({e.reason} at byte {e.start})")
    try:
        return loads(line)
    except RecursionError:
        bad = BadLine("JSON nested too deeply")
    except ValueError as e:
        bad = BadLine(f"not valid JSON ({str(e).splitlines()[0]})")
    bad.text = line
    return bad


def split_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(line number, line) for each non-blank line; a leading BOM is dropped."""
    if data.startswith(BOM):
        data = data[len(BOM) :]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if raw.strip():
            yield number, raw


def read_jsonl(path: str | Path, what: str = "JSONL file", objects: bool = True) -> Iterator[tuple[int, Any]]:
    """(line number, value) per non-blank line of `path`; a bad line's value is a `BadLine`.

    With `objects` a value that is not a JSON object is a `BadLine` too. A missing file is a
    one-line `ClinalignError` naming `what`.
    """
    path = Path(path)
    if not path.is_file():
        raise ClinalignError(f"{what} not found: {path}")
    for number, raw in split_lines(path.read_bytes()):
        value = parse_line(raw)
        if objects and not isinstance(value, dict) and not isinstance(value, BadLine):
            value = BadLine(f"expected a JSON object, got {type(value).__name__}")
        yield number, value


def read_jsonl_strict(path: str | Path, what: str = "JSONL file") -> Iterator[tuple[int, dict]]:
    """`read_jsonl` for files the toolkit owns (safety prompts, pairs): a bad line is a one-line error naming it."""
    for number, item in read_jsonl(path, what):
        if isinstance(item, BadLine):
            raise ClinalignError(f"{path}:{number}: {item}")
        yield number, item


def to_plain(value: Any) -> Any:
    """A config value as plain YAML/JSON data (enums to their values, dataclasses to dicts)."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (temp file + rename), so a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(to_plain(data), indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
