"""Where raw records come from: local files (.json, .jsonl, .csv, .parquet) and hub ids.

A source is read into `Batch`es: the raw records of one split (or of the whole file), with the ids
that a dict-keyed-by-id layout gives them. Wrappers are unwrapped here:

- a JSON list; a dict keyed by id (`{"21645374": {...}}`, MIRAGE, PubMedQA's ori_pqal.json);
- split wrappers (`{"name": "medmcqa", "dev": [...], "test": [...]}`) and nested ones
  (`{"medqa": {"test": [...]}}`); a single record, bare or as `{"id": ..., "data": {...}}`;
- a .jsonl file that holds one pretty-printed JSON object, and a .json file that is JSON lines.

The names a wrapper carries (`"name": "medmcqa"`, the `"medqa"` key) and the file name are kept as
hints for family detection. A line of a JSON-lines file that does not parse stays in its batch as an
`InvalidJson` row, so the report counts it.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path
from typing import Any

from clinalign.errors import ClinalignError
from clinalign.json_io import BadLine, loads, parse_line, split_lines

SPLIT_NAMES = frozenset({"train", "dev", "validation", "valid", "val", "test", "eval"})
# Wrapper fields whose value names the dataset ("name": "medmcqa", "dataset_name": "medqa_test.csv").
NAME_FIELDS = ("name", "dataset", "dataset_name", "source_dataset", "task")
# Keys that make a dict a record rather than a container of records.
RECORD_KEYS = frozenset(
    {
        "question", "Question", "QUESTION", "sent1", "instruction", "input", "instances", "conversations",
        "messages", "prompt", "chosen", "rejected", "options", "Options", "choices", "opa", "answer",
        "final_decision", "context", "contexts", "CONTEXTS",
    }
)  # fmt: skip
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


InvalidJson = BadLine  # a line of a JSON-lines file that is not JSON (kept so that the report counts it)


@dataclasses.dataclass
class Batch:
    """The raw records of one split (or of a whole file), in file order."""

    rows: list[Any]
    ids: list[str] | None = None  # the keys of a dict-keyed-by-id layout, one per row
    split: str | None = None


@dataclasses.dataclass
class Source:
    """A file or hub dataset, read: its batches and the names that hint at its dataset family."""

    name: str
    batches: list[Batch]
    hints: list[str]  # dataset names seen in wrappers, then the file name, lower-cased


def is_record(value: Any) -> bool:
    """Whether a dict is one record (possibly wrapped as `{"id": ..., "data": {...}}`)."""
    if not isinstance(value, dict):
        return False
    if not RECORD_KEYS.isdisjoint(value):
        return True
    inner = value.get("data")
    return isinstance(inner, dict) and not RECORD_KEYS.isdisjoint(inner)


def open_source(source: str, split: str | None = None, config_name: str | None = None) -> Source:
    """Read a local file or a hub id into batches of raw records (`split` picks a wrapper's split)."""
    path = Path(source).expanduser()
    if path.is_file():
        return _with_split(_read_file(path), split)
    if path.exists():
        raise ClinalignError(f"{source} is not a file")
    if path.suffix.lower() in FILE_SUFFIXES or not _HUB_ID.fullmatch(source):
        raise ClinalignError(f"input file not found: {source}")
    return read_hub(source, config_name, split)


def read_hub(source: str, config_name: str | None, split: str | None) -> Source:
    """A hub dataset through `datasets.load_dataset` (all splits when `split` is None)."""
    import datasets

    try:
        loaded = datasets.load_dataset(source, config_name, split=split)
    except Exception as e:  # offline, unknown id, unknown config: one line, not a traceback
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClinalignError(f"no local file {source!r}, and could not load it from the hub: {first_line}") from None
    return Source(source, dataset_batches(loaded, split), [source.lower()])


def dataset_batches(loaded: Any, split: str | None = None) -> list[Batch]:
    """Batches from a `datasets.Dataset` (one split) or `DatasetDict` (one batch per split)."""
    if isinstance(loaded, dict):  # a DatasetDict (a dict of splits)
        return [b for name in loaded for b in dataset_batches(loaded[name], name)]
    if not hasattr(loaded, "to_list"):  # an IterableDataset
        return [Batch(list(loaded), split=split)]
    return [Batch(loaded.to_list(), split=split)]


def _with_split(source: Source, split: str | None) -> Source:
    if split is None:
        return source
    named = [b for b in source.batches if b.split is not None]
    if not named:
        for batch in source.batches:
            batch.split = split
        return source
    chosen = [b for b in named if b.split == split]
    if not chosen:
        available = ", ".join(sorted({b.split for b in named}))
        raise ClinalignError(f"{source.name} has no split {split!r} (it has: {available})")
    source.batches = chosen
    return source


def _read_file(path: Path) -> Source:
    suffix = path.suffix.lower()
    hints = [path.name.lower()]
    if suffix == ".parquet":
        return Source(str(path), [Batch(_read_parquet(path))], hints)
    if suffix == ".csv":
        return Source(str(path), [Batch(_read_csv(path))], hints)
    raw = path.read_bytes()
    if suffix == ".jsonl":
        data = _parse_json_lines(raw)
        if data is None:  # a .jsonl file holding one JSON document
            data = _parse_json(_text(raw, path), path)
    else:
        data = _parse_json_text(raw, path)
    batches: list[Batch] = []
    wrapper_names: list[str] = []
    _collect(data, batches, wrapper_names, split=None, top=True)
    return Source(str(path), batches, wrapper_names + hints)


def _text(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ClinalignError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _parse_json_lines(raw: bytes) -> list[Any] | None:
    """JSON lines (`clinalign.json_io`: a bad line stays as a `BadLine` row, counted as invalid_json);
    None when the first line is not JSON but the whole file is one document."""
    rows = []
    for _number, line in split_lines(raw):
        row = parse_line(line)
        if not rows and isinstance(row, BadLine) and _is_json(raw):
            return None
        rows.append(row)
    return rows


def _is_json(raw: bytes) -> bool:
    try:
        loads(raw.decode("utf-8-sig"))
        return True
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False


def _parse_json(text: str, path: Path) -> Any:
    try:
        return loads(text, object_pairs_hook=_pairs)
    except RecursionError:
        raise ClinalignError(f"{path}: JSON nested too deeply to read") from None
    except ValueError as e:
        raise ClinalignError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None


def _parse_json_text(raw: bytes, path: Path) -> Any:
    """A .json file: one JSON document, or JSON lines saved under a .json name."""
    text = _text(raw, path)
    try:
        return loads(text, object_pairs_hook=_pairs)
    except (ValueError, RecursionError):
        first = next((line for _, line in split_lines(raw)), b"")
        if first and not isinstance(parse_line(first), BadLine):
            return _parse_json_lines(raw)
        return _parse_json(text, path)  # raises the one-line error


class _Keyed(dict):
    """A JSON object that repeated a key: `repeated` holds the values the later ones replaced."""

    repeated: list[tuple[str, Any]]


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    """`object_pairs_hook`: a dict, keeping what a repeated key would silently drop (see `_collect`)."""
    value = dict(pairs)
    if len(value) == len(pairs):
        return value
    keyed = _Keyed(value)
    seen: dict[str, int] = {}
    keyed.repeated = []
    for key, item in reversed(pairs):  # the last occurrence wins, as in json.loads
        if key in seen:
            keyed.repeated.append((key, item))
        seen[key] = 1
    return keyed


class DuplicateId(BadLine):
    """A row of an id-keyed file whose id repeats an earlier one (counted as `duplicate_id`)."""


def _read_csv(path: Path) -> list[dict[str, Any]]:
    # The csv module on the file object (newline=""), so a newline inside a quoted cell survives
    # and an unterminated quote is an error rather than a row swallowing the rest of the file.
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f, strict=True))
    except UnicodeDecodeError as e:
        raise ClinalignError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise ClinalignError(f"{path}: not readable as CSV ({e})") from None
    for row in rows:
        row.pop("", None)  # the unnamed index column pandas writes
        if None in row:  # more cells than the header names
            raise ClinalignError(f"{path}: a row has more cells than the header ({len(row) - 1} columns)")
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a bad file
        raise ClinalignError(f"{path}: not readable as parquet ({e})") from None


def _collect(data: Any, batches: list[Batch], hints: list[str], split: str | None, top: bool = False) -> None:
    """Find the records inside `data` (see the module docstring) and append them as batches."""
    if isinstance(data, list):
        batches.append(Batch(data, split=split))
        return
    if not isinstance(data, dict) or is_record(data):
        batches.append(Batch([data], split=split))
        return
    values = list(data.values())
    containers = [v for v in values if isinstance(v, (list, dict))]
    if not containers:  # only scalars: a map of ids to values at the top level, else one record
        if top and len(data) > 1 and all(_looks_like_id(k) for k in data):
            batches.append(Batch(values, ids=[str(k) for k in data], split=split))
        else:
            batches.append(Batch([data], split=split))
        return
    keyed = [v for v in values if is_record(v)]
    if len(keyed) * 2 >= len(values):  # a dict keyed by id: every value is a row, even a malformed one
        ids = [str(k) for k in data]
        for key, _ in getattr(data, "repeated", ()):  # a repeated id: counted, never silently dropped
            values.append(DuplicateId(f"duplicate id {key}"))
            ids.append(str(key))
        batches.append(Batch(values, ids=ids, split=split))
        return
    for key, value in data.items():
        if isinstance(value, list):
            name = key.lower()
            if name in SPLIT_NAMES:
                batches.append(Batch(value, split=name))
            else:
                hints.append(name)
                batches.append(Batch(value, split=split))
        elif isinstance(value, dict) and (is_record(value) or any(isinstance(v, (list, dict)) for v in value.values())):
            name = key.lower()
            if name not in SPLIT_NAMES:
                hints.append(name)
            _collect(value, batches, hints, split=name if name in SPLIT_NAMES else split)
        elif isinstance(value, dict):  # a metadata block ({"info": {"name": ...}}), not records
            hints.extend(v.lower() for k, v in value.items() if k in NAME_FIELDS and isinstance(v, str))
        elif key in NAME_FIELDS and isinstance(value, str):
            hints.append(value.lower())


def _looks_like_id(key: str) -> bool:
    return key.isdigit() or bool(re.fullmatch(r"[0-9a-fA-F-]{8,}", key))
