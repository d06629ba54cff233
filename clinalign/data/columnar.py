"""The columnar path: a JSON-lines file of rows with options in columns (MedMCQA's layout) straight
to canonical JSONL, whole columns at a time with pyarrow, several times faster than record by record.

`clinalign.data.convert_file` tries it for a .jsonl file in canonical format. It writes the same
lines and report as the per-record path (`load_records` + `write_records`, the reference), because
it takes only what it can show converts the same, and hands everything else to that path:

- the file: one JSON object per line (checked on the bytes, and by pyarrow's reader, which rejects
  duplicate keys and the malformed JSON that Python's parser rejects), every line with the same
  keys, flat values, UTF-8; otherwise the whole file goes the per-record way, before a line is
  written;
- detection (family, layout, index base): the per-record path's own code on the first lines,
  parsed by Python, and `medmcqa.decide_index_base` on whole columns;
- text: a value that is plainly clean (no whitespace but single inner spaces, no quote, backslash
  or control character: `PLAIN_TEXT_BREAKERS` finds the others) is written as it is, in quotes;
  any other value is cleaned by `choices.clean` and escaped as json's own string encoder does;
- duplicate options: compared lower-cased by pyarrow, where its lower-casing is str.lower()
  (`LOWER_DIFFERS` finds the characters where it may not be), by `choices.has_duplicates` otherwise;
- a row that is not a plain labeled record (a question or option missing, an answer absent or
  naming no option, duplicate options) goes through the per-record converter, from its own line
  parsed by Python, so its record or skip reason is the reference's.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from json.encoder import encode_basestring  # the string encoder of json.dumps(ensure_ascii=False)
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from clinalign.data import SAMPLE_SIZE, _convert_one, _file_context, _index_keys, _json_encoder, _report, _schema_for
from clinalign.data.choices import MISSING_TEXT, Context, Schema, clean, has_duplicates, record_id
from clinalign.data.medmcqa import ColumnLayout, decide_index_base
from clinalign.data.records import LETTERS, Record
from clinalign.data.sources import parse_row

# What makes a text value not plainly clean: any character str.split() splits on or json escapes
# (and a few neighbours: a superset only sends more values through clean()), two spaces in a row,
# a space at either end. tests/test_data_columnar.py checks it against every code point.
PLAIN_TEXT_BREAKERS = (
    r'[\x00-\x1f"\\\x7f-\xa0\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]|  |^ | $'
)
JSON_ESCAPED = r'["\\\x00-\x1f]'  # the characters json's string encoder escapes (ensure_ascii=False)
BLOCK_SIZE = 4 << 20  # bytes pyarrow parses at a time (a longer line sends the file record by record)
RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(Record))
FLAT_TYPES = (pa.string(), pa.int64(), pa.bool_(), pa.null())  # the value types of a file this path reads
_NULL_TEXT = pa.scalar(None, pa.string())


@dataclasses.dataclass
class Converted:
    report: dict[str, Any]
    columnar_rows: int  # rows converted whole-column; the others went record by record


def convert_jsonl(
    path: Path, out: str | Path, dataset: str, keep_unlabeled: bool, split: str | None
) -> Converted | None:
    """Convert a JSON-lines file to canonical JSONL at `out`; None, with nothing written, when this
    path does not apply (the caller then takes the per-record path)."""
    lines = _Lines.of(path.read_bytes())
    if lines is None:
        return None
    sample = [parse_row(lines.text(i)) for i in range(min(SAMPLE_SIZE, len(lines)))]
    if not all(row.__class__ is dict for row in sample) or "data" in sample[0] or "instances" in sample[0]:
        return None
    schema = _schema_for(sample[0])
    layout = schema.layout
    if not _fits(layout) or not _index_keys(sample) <= {layout.answers[0]}:
        return None
    table = _read_table(lines, sample[0], layout)
    if table is None:
        return None

    ctx, evidence = _file_context(sample, [path.name.lower()], dataset, keep_unlabeled)
    ctx.split = split
    batches, offset = [], 0
    for batch in table.to_batches():
        batches.append(_columns_of(batch, layout, offset))
        offset += batch.num_rows
    answer_key = layout.answers[0]
    if answer_key in _index_keys(sample):
        ctx.index_base[answer_key] = _index_base(batches, answer_key, sample[0])
    tally = _Tally(lines, ctx)
    written = [_lines_of(columns, ctx, schema, tally) for columns in batches]

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        for part in written:
            f.write(_text_bytes(part))
    report = _report(len(lines), tally.kept, tally.skipped, tally.sources, ctx, evidence, tally.layouts)
    return Converted(report, tally.columnar_rows)


@dataclasses.dataclass
class _Lines:
    """A JSON-lines file whose every line starts with '{' and ends with '}', and where each line is.

    With pyarrow's row count equal to the line count, that makes one object per line: a newline
    between '}' and '{' is never inside a JSON value.
    """

    data: bytes  # the whole file
    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def of(cls, data: bytes) -> _Lines | None:
        end = len(data) - 1 if data.endswith(b"\n") else len(data)  # past the last line's '}'
        if end <= 0 or data[:1] != b"{" or data[end - 1 : end] != b"}" or not (data.isascii() or _is_utf8(data)):
            return None
        chars = np.frombuffer(data, np.uint8, end)
        newlines = np.flatnonzero(chars == ord("\n"))
        if not ((chars[newlines - 1] == ord("}")).all() and (chars[newlines + 1] == ord("{")).all()):
            return None
        return cls(data, np.append(0, newlines + 1), np.append(newlines, end))

    def __len__(self) -> int:
        return len(self.starts)

    def text(self, i: int) -> str:
        return self.data[self.starts[i] : self.ends[i]].decode()


def _is_utf8(data: bytes) -> bool:
    """Whether the file is UTF-8 (the per-record path reports one that is not as an error)."""
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _fits(layout: Any) -> bool:
    """A layout this path converts: a question, options in four or more columns (so never
    yes/no/maybe), one answer field, no year."""
    return (
        isinstance(layout, ColumnLayout)
        and layout.question is not None
        and len(layout.columns) >= 4
        and len(layout.answers) == 1
        and layout.year is None
    )


def _read_table(lines: _Lines, first: dict, layout: ColumnLayout) -> pa.Table | None:
    """The file as a table, when every line has the first line's keys and flat values; else None."""
    texts = [layout.question, *layout.columns, layout.explanation, layout.id_key, *(k for _, k in layout.meta_keys)]
    types = {key: pa.string() for key in texts if key is not None} | {layout.answers[0]: pa.int64()}
    try:
        table = pa_json.read_json(
            pa.BufferReader(lines.data),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=BLOCK_SIZE),
            parse_options=pa_json.ParseOptions(explicit_schema=pa.schema(list(types.items()))),
        )
    except pa.ArrowException:  # not JSON, a value of another type, a line longer than a block
        return None
    if table.num_rows != len(lines) or set(table.column_names) != set(first):
        return None
    for name, column in zip(table.column_names, table.columns):
        if column.type not in FLAT_TYPES:  # a float may be pyarrow's Inf, which Python's json rejects
            return None
        # A null may be an absent key, which would change the record's layout: every line must
        # spell the key out (pyarrow rejects a key given twice, so the count is of lines with it).
        if column.null_count and (
            encode_basestring(name) != f'"{name}"' or lines.data.count(f'"{name}":'.encode()) != len(lines)
        ):
            return None
    return table


@dataclasses.dataclass
class _Columns:
    """One batch of rows, each text field as its JSON string without the quotes (`_bodies`)."""

    offset: int  # the file position of the batch's first row
    question: pa.Array
    options: list[pa.Array]  # one per option column, in letter order
    answer: pa.Array  # int64
    explanation: pa.Array | None
    id: pa.Array | None
    meta: list[tuple[str, pa.Array]]  # (meta name, bodies)


def _columns_of(batch: pa.RecordBatch, layout: ColumnLayout, offset: int) -> _Columns:
    return _Columns(
        offset,
        _bodies(batch.column(layout.question)),
        [_bodies(batch.column(c)) for c in layout.columns],
        batch.column(layout.answers[0]),
        _bodies(batch.column(layout.explanation)) if layout.explanation else None,
        _bodies(batch.column(layout.id_key)) if layout.id_key else None,
        [(name, _bodies(batch.column(key))) for name, key in layout.meta_keys],
    )


def _bodies(values: pa.Array) -> pa.Array:
    """Each value's `clean` text as json writes it, without the quotes; null where `clean` gives None."""
    if values.type == pa.null():
        return pa.nulls(len(values), pa.string())
    # clean()'s missing texts: empty, or "nan" in any case (ASCII, and no other character lower-cases
    # to its letters, so byte length and ascii_lower say it).
    length = pc.binary_length(values)
    missing = pc.or_(
        pc.equal(length, 0),
        pc.and_(pc.equal(length, len(MISSING_TEXT)), pc.equal(pc.ascii_lower(values), MISSING_TEXT)),
    )
    unclean = pc.match_substring_regex(values, PLAIN_TEXT_BREAKERS).fill_null(False)
    changed = pc.or_(missing.fill_null(False), unclean)
    if not pc.any(changed).as_py():
        return values
    replacements = pa.nulls(pc.sum(changed).as_py(), pa.string())  # missing: null
    if pc.any(unclean).as_py():
        cleaned = pa.array(list(map(clean, values.filter(unclean).to_pylist())), pa.string())
        replacements = pc.replace_with_mask(replacements, unclean.filter(changed), _escaped(cleaned))
    return pc.replace_with_mask(values, changed, replacements)


def _escaped(texts: pa.Array) -> pa.Array:
    """Texts as json's string encoder writes them, without the quotes."""
    escaped = pc.match_substring_regex(texts, JSON_ESCAPED).fill_null(False)
    if not pc.any(escaped).as_py():
        return texts
    encoded = [encode_basestring(text)[1:-1] for text in texts.filter(escaped).to_pylist()]
    return pc.replace_with_mask(texts, escaped, pa.array(encoded, pa.string()))


def _index_base(batches: list[_Columns], key: str, first: dict) -> int:
    """`medmcqa.index_base` over whole columns: a 0 anywhere, or an answer equal to its row's option count."""
    has_zero = reaches_last = False
    for columns in batches:
        present = pc.cast(columns.options[0].is_valid(), pa.int64())
        for bodies in columns.options[1:]:
            present = pc.add(present, pc.cast(bodies.is_valid(), pa.int64()))
        has_zero = has_zero or bool(pc.any(pc.equal(columns.answer, 0)).as_py())
        last = pc.and_(pc.greater_equal(columns.answer, 2), pc.equal(columns.answer, present))
        reaches_last = reaches_last or bool(pc.any(last).as_py())
    return decide_index_base(key, first, has_zero, reaches_last)


def _lines_of(columns: _Columns, ctx: Context, schema: Schema, tally: _Tally) -> pa.Array:
    """The batch's canonical JSONL lines (newline included), in file order, skipped rows left out."""
    count = len(columns.options)
    position = pc.subtract(columns.answer, ctx.index_base.get(schema.layout.answers[0], 0))
    answered = pc.and_(pc.greater_equal(position, 0), pc.less(position, count)).fill_null(False)
    complete = columns.question.is_valid()
    for bodies in columns.options:
        complete = pc.and_(complete, bodies.is_valid())
    plain = pc.and_(answered, complete)
    plain = pc.and_(plain, pc.invert(_duplicates(columns.options, plain)))
    index = pc.if_else(answered, position, 0)

    fields = {
        "id": ['"', _ids(columns, plain, ctx), '"'],
        "source": [encode_basestring(ctx.family)],
        "question": ['"', columns.question, '"'],
        "context": ["null"],
        "options": _object([(letter, ['"', bodies, '"']) for letter, bodies in zip(LETTERS, columns.options)]),
        "answer": ['"', pc.take(pa.array(list(LETTERS[:count])), index), '"'],
        "answer_text": ['"', pc.choose(index, *columns.options), '"'],
        "explanation": ["null" if columns.explanation is None else pc.coalesce(_quoted(columns.explanation), "null")],
        "meta": [_meta(columns, ctx)],
    }
    lines = _join(_object([(name, fields[name]) for name in RECORD_FIELDS]) + ["\n"])
    done = pc.sum(plain).as_py() or 0
    tally.add_columnar(done, schema.name, ctx.family)
    if done == len(plain):
        return lines
    others = pc.invert(plain)
    converted = [tally.convert(columns.offset + i) for i in pc.indices_nonzero(others).to_pylist()]
    return pc.drop_null(pc.replace_with_mask(lines, others, pa.array(converted, pa.string())))


def _text_bytes(strings: pa.Array) -> memoryview:
    """The strings of a string array one after another: the stretch of its data buffer they fill."""
    if len(strings) == 0:
        return memoryview(b"")
    _, offsets, data = strings.buffers()
    first, last = np.frombuffer(offsets, np.int32)[[strings.offset, strings.offset + len(strings)]]
    return memoryview(data)[first:last]


def _object(items: list[tuple[str, list[Any]]]) -> list[Any]:
    """The parts of {key: value, ...} as json writes it, each value given as parts (strings or arrays)."""
    parts: list[Any] = []
    for i, (key, value) in enumerate(items):
        parts += [("{" if i == 0 else ", ") + encode_basestring(key) + ": ", *value]
    return parts + ["}" if items else "{}"]


def _join(parts: list[Any]) -> Any:
    """The parts (strings and arrays) joined row by row; a null in any array makes the row null."""
    merged: list[Any] = []
    for part in parts:
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] += part
        else:
            merged.append(part)
    return pc.binary_join_element_wise(*merged, "")


def _quoted(bodies: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise('"', bodies, '"', "")


# Characters whose str.lower() pyarrow's utf8_lower may not match: İ (two characters in Python),
# Σ (ς at a word's end in Python), and all but the oldest blocks (Latin, Greek, Cyrillic,
# punctuation and symbols), where the two libraries' Unicode versions may differ.
# tests/test_data_columnar.py checks the other characters against every code point.
LOWER_DIFFERS = r"[\x{130}\x{3a3}\x{250}-\x{36f}\x{500}-\x{1fff}\x{2c00}-\x{10ffff}]"


def _duplicates(options: list[pa.Array], rows: pa.Array) -> pa.Array:
    """Whether two options of a row are the same text ignoring case (`choices.has_duplicates`).

    pyarrow's utf8_lower is str.lower() outside LOWER_DIFFERS (and json's escapes, lower-case
    already, keep texts apart exactly as before escaping); rows with such characters go to
    has_duplicates itself.
    """
    lowered = []
    differs = pa.array(np.zeros(len(rows), bool))
    for bodies in options:
        lower = pc.ascii_lower(bodies)
        wide = pc.invert(pc.string_is_ascii(bodies)).fill_null(False)
        if pc.any(wide).as_py():  # utf8_lower only where ascii_lower is not enough: it is slower
            lower = pc.replace_with_mask(lower, wide, pc.utf8_lower(bodies.filter(wide)))
            wide_differs = pc.match_substring_regex(bodies.filter(wide), LOWER_DIFFERS)
            differs = pc.or_(differs, pc.replace_with_mask(wide, wide, wide_differs))
        lowered.append(lower)
    found = pa.array(np.zeros(len(rows), bool))
    for i, first in enumerate(lowered):
        for second in lowered[i + 1 :]:
            found = pc.or_(found, pc.equal(first, second))
    found = found.fill_null(False)
    differs = pc.and_(differs, rows)
    if pc.any(differs).as_py():
        texts = zip(*([_unescaped(body) for body in bodies.filter(differs).to_pylist()] for bodies in options))
        found = pc.replace_with_mask(found, differs, pa.array([has_duplicates(t) for t in texts], pa.bool_()))
    return found


def _unescaped(body: str) -> str:
    return json.loads(f'"{body}"') if "\\" in body else body


def _ids(columns: _Columns, rows: pa.Array, ctx: Context) -> pa.Array:
    """The id bodies; a row without an id gets `record_id`'s, from its position."""
    ids = columns.id if columns.id is not None else pa.nulls(len(rows), pa.string())
    missing = pc.and_(rows, ids.is_null())
    if pc.any(missing).as_py():
        made = [record_id(None, ctx, columns.offset + i) for i in pc.indices_nonzero(missing).to_pylist()]
        ids = pc.replace_with_mask(ids, missing, _escaped(pa.array(made, pa.string())))
    return ids


def _meta(columns: _Columns, ctx: Context) -> Any:
    """The meta object: the meta fields a row has, in the layout's order, then the split."""
    entries: list[Any] = [
        pc.binary_join_element_wise(encode_basestring(name) + ': "', bodies, '"', "") for name, bodies in columns.meta
    ]
    if ctx.split:
        entries.append(encode_basestring("split") + ": " + encode_basestring(ctx.split))
    if not entries:
        return "{}"
    return pc.binary_join_element_wise("{", pc.binary_join_element_wise(*entries, ", ", null_handling="skip"), "}", "")


class _Tally:
    """The rows that go record by record (parsed from their own line), and the report's counts."""

    def __init__(self, lines: _Lines, ctx: Context):
        self.lines, self.ctx = lines, ctx
        self.schemas: dict = {}
        self.encode = _json_encoder()
        self.kept = self.columnar_rows = 0
        self.skipped: collections.Counter[str] = collections.Counter()
        self.sources: set[str] = set()
        self.layouts: collections.Counter[str] = collections.Counter()

    def add_columnar(self, rows: int, layout: str, source: str) -> None:
        if rows:
            self.columnar_rows += rows
            self.kept += rows
            self.layouts[layout] += rows
            self.sources.add(source)

    def convert(self, position: int) -> str | None:
        """The line of the record at this file position, or None when it is skipped (counted)."""
        row = parse_row(self.lines.text(position))
        result, schema = _convert_one(row, None, position, self.ctx, self.schemas)
        self.layouts[schema.name] += 1
        if result.__class__ is Record:
            self.kept += 1
            self.sources.add(result.source)
            return self.encode(vars(result)) + "\n"
        self.skipped[result] += 1
        return None
