"""Canonical records from any published copy of PubMedQA, MedMCQA and MedQA.

    from clinalign.data import load_records
    result = load_records("openlifescienceai/medmcqa", split="validation")  # or a local file
    result.records  # list[Record]
    result.report   # {"read", "kept", "skipped": {reason: count}, "dataset", "schema"}

    from clinalign.data import convert_file
    report = convert_file("medmcqa_train.jsonl", "out.jsonl")  # file -> JSONL, the fastest way

CLI: `python -m clinalign.data convert INPUT --out OUT.jsonl` (`convert_file`) and
`python -m clinalign.data check TRAIN EVAL` (see `__main__`).

Every raw record becomes a `Record` or a counted skip, so `read == kept + sum(skipped)` always:

    invalid_json           a line of a JSON-lines file that does not parse
    not_an_object          a record that is not a JSON object (a bare string, number or list)
    unrecognized_record    no question, options, prompt or answer field of any known layout
    preference_pair        a chosen/rejected preference record: not a question dataset
    open_ended             a free-text prompt and reply (no options, not yes/no/maybe)
    empty_question         the question is missing, empty, or not text
    bad_options            options in a shape that cannot be read (odd keys, letters with a gap)
    empty_option           an option missing between present ones
    too_few_options        fewer than two options
    duplicate_options      two options with the same text (ignoring case, as Record.problems() does)
    no_answer              no answer (a test split); kept with answer None under keep_unlabeled
    answer_not_in_options  the answer names no option (or is not yes/no/maybe)
    ambiguous_answer       the answer text matches two options, or lists several answers
    conflicting_answers    two answer fields (answer_idx and answer text) name different options
    unexpected_<Error>     a converter bug on an odd record; counted, never raised

Detection is per file, not per record: the family (`--dataset auto`) from a sample of records, the
wrappers' names and the file name; the layout once per distinct key set; MedMCQA's index base once
per file. Then each record goes through its layout's converter only.

The report's "dataset" is the records' source (pubmedqa, medmcqa, medqa, or another family such as
cnmleqa), "mixed" when a file holds several (UltraMedical's ShareGPT export), or "unknown" when
nothing says. Files that are not question datasets (preference pairs, safety prompts) convert to a
counted skip report with kept 0, never an error: `preference_pair`, `open_ended`,
`unrecognized_record`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from clinalign.data import medmcqa, medqa, pubmedqa
from clinalign.data.choices import Context, Schema, Skip
from clinalign.data.prompt_text import FAMILIES, prompt_schema_for
from clinalign.data.sources import Batch, DuplicateId, InvalidJson, Source, dataset_batches, open_source
from clinalign.errors import ClinalignError
from clinalign.records import Record, normalize_text

__all__ = [
    "DATASETS",
    "FORMATS",
    "ConversionResult",
    "Record",
    "SAMPLE_DATA",
    "convert_file",
    "convert_record",
    "convert_rows",
    "count_overlap",
    "load_records",
    "sample_path",
    "write_records",
]

DATASETS = ("auto", "pubmedqa", "medmcqa", "medqa")
FORMATS = ("canonical", "instruction", "chat")
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"
SAMPLE_FILES = {"pubmedqa": "pubmedqa_ori_pqal.json", "medmcqa": "medmcqa_train.jsonl", "medqa": "medqa_us_test.jsonl"}
PREFERENCE_KEYS = frozenset({"chosen", "rejected", "response_chosen", "response_rejected"})
INDEX_ANSWER_KEYS = ("cop", "label", "answer")
SAMPLE_SIZE = 200  # records read for family detection and the index base's candidate keys


@dataclasses.dataclass
class ConversionResult:
    records: list[Record]
    report: dict[str, Any]


def sample_path(dataset: str) -> Path:
    """The shipped sample file of a dataset family (the team's own records, original schema)."""
    if dataset not in SAMPLE_FILES:
        raise ClinalignError(f"no sample data for {dataset!r} (have: {', '.join(SAMPLE_FILES)})")
    return SAMPLE_DATA / SAMPLE_FILES[dataset]


def load_records(
    source: str | os.PathLike,
    dataset: str = "auto",
    keep_unlabeled: bool = False,
    split: str | None = None,
    config_name: str | None = None,
) -> ConversionResult:
    """Convert a local file (.json/.jsonl/.csv/.parquet) or a hub id into canonical records.

    A hub id goes through `datasets.load_dataset(source, config_name, split=split)`; for a local
    file `split` picks one split of a wrapper such as {"dev": [...], "test": [...]} (or labels a
    flat file's records). A missing file or an unreadable one is a one-line `ClinalignError`.
    """
    _check_dataset(dataset)
    with _gc_paused():
        opened = open_source(str(source), split=split, config_name=config_name)
        return _convert(opened, dataset, keep_unlabeled)


def convert_file(
    source: str | os.PathLike,
    out: str | os.PathLike,
    dataset: str = "auto",
    format: str = "canonical",
    keep_unlabeled: bool = False,
    split: str | None = None,
    config_name: str | None = None,
) -> dict[str, Any]:
    """Convert a file or hub id straight to a JSONL file (the CLI's `convert`); returns the report.

    The same lines and report as `load_records` + `write_records`; `out` is checked before the input
    is read, and written whole or not at all.
    """
    _check_dataset(dataset)
    _check_format(format)
    _check_out(out)
    result = load_records(source, dataset, keep_unlabeled, split, config_name)
    write_records(result.records, out, format)
    return result.report


def convert_rows(
    rows: Iterable[Any] | Any,
    dataset: str = "auto",
    keep_unlabeled: bool = False,
    split: str | None = None,
    name: str = "",
) -> ConversionResult:
    """Convert raw records already in memory: a list of dicts, a `datasets.Dataset` or `DatasetDict`.

    `name` (a file name or hub id) is a hint for family detection, as a file's name is.
    """
    _check_dataset(dataset)
    if hasattr(rows, "column_names"):  # a datasets.Dataset or DatasetDict
        batches = dataset_batches(rows, split)
    else:
        batches = [Batch(list(rows), split=split)]
    with _gc_paused():
        return _convert(Source(name or "rows", batches, [name.lower()] if name else []), dataset, keep_unlabeled)


def convert_record(
    raw: Any, dataset: str = "auto", keep_unlabeled: bool = False, index_base: int | None = None
) -> Record | str:
    """Convert one raw record: the canonical `Record`, or the reason (a string) it is skipped.

    Alone, a record carries less evidence than a file: the family comes from its own keys and
    MedMCQA's `cop` counts from 0 (the hub) unless `index_base` says 1 or the record has the
    original release's key order.
    """
    _check_dataset(dataset)
    row = _unwrap(raw) if isinstance(raw, dict) else raw
    family = dataset if dataset != "auto" else _guess_family([row], [])[0]
    ctx = Context(family, keep_unlabeled, explicit=dataset != "auto")
    if isinstance(row, dict):
        for key in INDEX_ANSWER_KEYS:
            if key in row:
                ctx.index_base[key] = index_base if index_base is not None else medmcqa.index_base([row], key)
    return _convert_one(row, None, 0, ctx, {})[0]


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector while a file is parsed and converted.

    Parsing and converting allocate millions of objects and free almost none, so the collector
    would rescan the growing heap again and again for nothing (benchmarks/convert_throughput.py).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ClinalignError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ClinalignError(f"unknown format {format!r}: choose one of {', '.join(FORMATS)}")


def _unwrap(row: dict) -> dict:
    """MultiMedQA's {"id", "data": {...}} and Self-BioRAG's {"instances": {"input", "output"}}, flattened."""
    inner = row.get("data")
    if isinstance(inner, dict):
        merged = dict(inner)
        for key, value in row.items():
            if key != "data":
                merged.setdefault(key, value)
        return merged
    inner = row.get("instances")
    if isinstance(inner, list) and len(inner) == 1:
        inner = inner[0]
    if isinstance(inner, dict):
        merged = {k: v for k, v in row.items() if k != "instances"}
        merged.update(inner)
        return merged
    return row


def _schema_for(row: dict) -> Schema:
    """The layout of a record with these keys (called once per distinct key set in a file)."""
    if not PREFERENCE_KEYS.isdisjoint(row):
        return PREFERENCE
    return (
        medmcqa.schema_for(row)
        or medqa.schema_for(row)
        or pubmedqa.schema_for(row)
        or prompt_schema_for(row)
        or UNRECOGNIZED
    )


def _skip_as(reason: str):
    def convert(row: dict, key: Any, position: int, ctx: Context) -> Record:
        raise Skip(reason)

    return convert


PREFERENCE = Schema("preference pairs (chosen/rejected): not a question dataset", _skip_as("preference_pair"))
UNRECOGNIZED = Schema("unrecognized", _skip_as("unrecognized_record"))
NOT_OBJECTS = Schema("not JSON objects", _skip_as("not_an_object"))
INVALID_LINES = Schema("invalid JSON lines", _skip_as("invalid_json"))


def _convert_one(row: Any, key: Any, position: int, ctx: Context, schemas: dict) -> tuple[Record | str, Schema]:
    if not isinstance(row, dict):
        if isinstance(row, DuplicateId):
            return "duplicate_id", INVALID_LINES
        return ("invalid_json", INVALID_LINES) if isinstance(row, InvalidJson) else ("not_an_object", NOT_OBJECTS)
    if "data" in row or "instances" in row:
        row = _unwrap(row)
    signature = tuple(row)
    schema = schemas.get(signature)
    if schema is None:
        schema = schemas[signature] = _schema_for(row)
    try:
        return schema.convert(row, key, position, ctx), schema
    except Skip as skip:
        return skip.reason, schema
    except Exception as error:  # a converter bug on an odd record: counted, so the file still converts
        return f"unexpected_{type(error).__name__}", schema


def _file_context(sample: list[dict], hints: list[str], dataset: str, keep_unlabeled: bool) -> tuple[Context, bool]:
    """What converters know about a file, from a sample of its records (the index base aside).

    The flag says whether keys or names decided the family (see `_guess_family`).
    """
    family, evidence = (dataset, True) if dataset != "auto" else _guess_family(sample, hints)
    return Context(family, keep_unlabeled, explicit=dataset != "auto"), evidence


def _index_keys(sample: list[dict]) -> set[str]:
    """The answer fields whose integers need an index base (decided over the whole file)."""
    return {key for row in sample for key in INDEX_ANSWER_KEYS if key in row}


def _convert(source: Source, dataset: str, keep_unlabeled: bool) -> ConversionResult:
    sample = _sample(source.batches)
    ctx, evidence = _file_context(sample, source.hints, dataset, keep_unlabeled)
    for key in _index_keys(sample):
        ctx.index_base[key] = medmcqa.index_base(_unwrapped_rows(source.batches), key)

    records: list[Record] = []
    skipped: collections.Counter[str] = collections.Counter()
    layouts: collections.Counter[str] = collections.Counter()
    schemas: dict[tuple, Schema] = {}
    read = 0
    append = records.append
    rows_per_schema: dict[Schema, int] = {}
    schema_mismatch: dict[Schema, str | None] = {}
    for batch in source.batches:
        ctx.split = batch.split
        ids = batch.ids
        read += len(batch.rows)
        for position, row in enumerate(batch.rows):
            # The common case inline (one dict per record, its key set seen before); the rest in
            # _convert_one. This loop runs once per record: keep it lean.
            schema = (
                schemas.get(tuple(row))
                if row.__class__ is dict and "data" not in row and "instances" not in row
                else None
            )
            if schema is None:
                result, schema = _convert_one(row, ids[position] if ids else None, position, ctx, schemas)
            else:
                try:
                    result = schema.convert(row, ids[position] if ids else None, position, ctx)
                except Skip as skip:
                    result = skip.reason
                except Exception as error:
                    result = f"unexpected_{type(error).__name__}"
            rows_per_schema[schema] = rows_per_schema.get(schema, 0) + 1
            if result.__class__ is Record and not ctx.explicit:
                # Keys decide a schema, so one look per schema says whether its records fit the file.
                mismatch = schema_mismatch.get(schema, False)
                if mismatch is False:
                    own = _unwrap(row) if isinstance(row, dict) and ("data" in row or "instances" in row) else row
                    mismatch = schema_mismatch[schema] = family_mismatch(own, ctx)
                if mismatch is not None:
                    result = mismatch
            if result.__class__ is Record:
                append(result)
            else:
                skipped[result] += 1
    for schema, count in rows_per_schema.items():
        layouts[schema.name] += count
    sources = {r.source for r in records}
    return ConversionResult(records, _report(read, len(records), skipped, sources, ctx, evidence, layouts))


def _report(
    read: int,
    kept: int,
    skipped: collections.Counter[str],
    sources: set[str],
    ctx: Context,
    evidence: bool,
    layouts: collections.Counter[str],
) -> dict[str, Any]:
    """The conversion report; `sources` are the kept records' sources, `layouts` records per layout name.

    "dataset" is the records' one source, "mixed" for several, else the family (or "unknown" when
    only the content guess said it).
    """
    if len(sources) == 1:
        dataset = next(iter(sources))
    else:
        dataset = "mixed" if sources else (ctx.family if evidence else "unknown")
    return {
        "read": read,
        "kept": kept,
        "skipped": dict(sorted(skipped.items())),
        "dataset": dataset,
        "schema": _schema_summary(layouts),
    }


def _schema_summary(layouts: collections.Counter[str]) -> str:
    """The layout, or the three commonest with their record counts when a file mixes several."""
    if len(layouts) <= 1:
        return next(iter(layouts), "none")
    shown = "; ".join(f"{name} ({n})" for name, n in layouts.most_common(3))
    return shown + ("; ..." if len(layouts) > 3 else "")


def _sample(batches: list[Batch]) -> list[dict]:
    sample: list[dict] = []
    for batch in batches:
        for row in batch.rows[:SAMPLE_SIZE]:
            if isinstance(row, dict):
                sample.append(_unwrap(row))
        if len(sample) >= SAMPLE_SIZE:
            break
    return sample


def _unwrapped_rows(batches: list[Batch]) -> Iterable[Any]:
    for batch in batches:
        for row in batch.rows:
            yield _unwrap(row) if isinstance(row, dict) and ("data" in row or "instances" in row) else row


def family_from_name(name: str) -> str | None:
    """The dataset family a file name, hub id or wrapper name points to ("medqa_test.csv" -> medqa)."""
    text = name.lower()
    if "pubmedqa" in text or "pubmed_qa" in text:
        return "pubmedqa"
    if "medmcqa" in text or "medmc_qa" in text:
        return "medmcqa"
    if "medqa" in text or "med_qa" in text:
        return "medqa"
    if "cnmle" in text:
        return "cnmleqa"
    return None


def _vote(row: Any) -> str | None:
    """The family one record's own keys or names point to (None: they say nothing)."""
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("source"), str) and row["source"] in FAMILIES:
        return row["source"]
    if "ope" in row and "question_type" in row:
        return "cnmleqa"
    if pubmedqa.signal(row) or _has_decision_options(row):
        return "pubmedqa"
    if medmcqa.signal(row):
        return "medmcqa"
    if medqa.signal(row):
        return "medqa"
    return next(
        (family_from_name(v) for k in ("name", "dataset_name", "source_dataset") if isinstance(v := row.get(k), str)),
        None,
    )


def _guess_family(sample: list[Any], hints: list[str]) -> tuple[str, bool]:
    """The family of a file's records: the file's name (or a wrapper's), unless a clear majority of its
    records' keys or names says otherwise; with no name, that majority; then the content.

    Never one record's vote: an `exp` field on 1 of 300 MedQA records once relabelled the whole file
    MedMCQA (ids, held-out hash and all). The flag says whether keys or names decided it (False: only
    the content guess did).
    """
    votes = collections.Counter(v for row in sample if (v := _vote(row)))
    records = sum(isinstance(row, dict) for row in sample)
    named = next((family for hint in hints if (family := family_from_name(hint))), None)
    if votes:
        top, count = votes.most_common(1)[0]
        if top == named or count * 2 > records:
            return top, True
    if named:
        return named, True
    if votes and len(votes) == 1 and sum(votes.values()) == records:
        return votes.most_common(1)[0][0], True
    # No name and no clear majority: USMLE-style clinical vignettes are MedQA, short items MedMCQA.
    questions = [row.get("question", "") for row in sample if isinstance(row, dict)]
    vignettes = sum(isinstance(q, str) and "year-old" in q[:200] for q in questions)
    return ("medqa" if questions and vignettes * 2 >= len(questions) else "medmcqa"), False


def family_mismatch(row: Any, ctx: Context) -> str | None:
    """The skip reason of a record whose own keys say another family than its file's (None: it fits).

    A record naming its `source` keeps it (canonical files mix datasets); --dataset overrides all.
    """
    if ctx.explicit or not isinstance(row, dict) or "source" in row:
        return None
    vote = _vote(row)
    return f"{vote}_record_in_{ctx.family}_file" if vote is not None and vote != ctx.family else None


def _has_decision_options(row: dict) -> bool:
    options = row.get("options")
    return (
        isinstance(options, dict)
        and len(options) == 3
        and all(isinstance(v, str) and v.strip().lower() in ("yes", "no", "maybe") for v in options.values())
    )


# ---- output --------------------------------------------------------------------------------------


def write_records(records: Iterable[Record], path: str | os.PathLike, format: str = "canonical") -> int:
    """Write records as JSONL: canonical fields, or the instruction / chat example of `clinalign.prompts`.

    Unlabeled records have no completion: in chat format they are written prompt-only
    ({"prompt": [...]}, TRL's prompt-only format, for prediction); in instruction format with an
    empty output. Returns the number of lines written.
    """
    from clinalign import prompts

    _check_format(format)
    encode = _json_encoder()
    with _gc_paused(), _nan_is_an_error():
        if format == "canonical":
            lines = [encode(vars(r)) for r in records]  # vars(): the fields in order, without asdict's deep copy
        elif format == "instruction":
            lines = [encode(prompts.to_instruction_example(r)) for r in records]
        else:
            lines = [
                encode(prompts.to_chat_example(r) if r.answer is not None else {"prompt": prompts.prompt_messages(r)})
                for r in records
            ]
    path = _check_out(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary file beside the output, renamed into place: a failed write leaves no truncated file.
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write("\n".join(lines) + ("\n" if lines else ""))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return len(lines)


@contextlib.contextmanager
def _nan_is_an_error():
    try:
        yield
    except ValueError as e:  # the encoder's "Out of range float values are not JSON compliant"
        raise ClinalignError(f"cannot write strict JSON: {e} (a NaN or Infinity in a record's meta)") from None


def _check_out(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if path.is_dir() or str(path).endswith(os.sep):
        raise ClinalignError(f"--out {path} is a folder: give the JSONL file to write")
    if path.parent.exists() and not path.parent.is_dir():
        raise ClinalignError(f"--out {path}: {path.parent} is not a folder")
    return path


def _json_encoder() -> Callable[[Any], str]:
    """JSON text of one object, non-ASCII kept as is, anything unusual in meta written as a string.

    `json.dumps` builds a new C encoder on every call, a third of its time for a record this size;
    this builds it once (the stdlib's own `c_make_encoder`, as `JSONEncoder.iterencode` calls it)
    and falls back to `JSONEncoder.encode` where the C accelerator is missing.
    """
    from json import encoder

    if encoder.c_make_encoder is None:
        return json.JSONEncoder(ensure_ascii=False, default=str, allow_nan=False).encode
    # allow_nan False (the last argument): NaN/Infinity are not JSON; a float one from a parquet
    # file's meta is an error naming it, never an unreadable output line.
    make = encoder.c_make_encoder(None, str, encoder.c_encode_basestring, None, ": ", ", ", False, False, False)
    return lambda value: "".join(make(value, 0))


def question_key(record: Record) -> str:
    """A question's identity for contamination checks: normalised, case-folded question text."""
    return normalize_text(record.question).casefold()


def count_overlap(train: list[Record], evaluation: list[Record]) -> dict[str, Any]:
    """Eval questions that also appear in train: by question text, and by question text + option set.

    A shared stem with different options ("Which of the following is true?") counts only in the
    first; the second is the contamination that inflates accuracy.
    """
    train_questions = {question_key(r) for r in train}
    train_items = {(question_key(r), _option_set(r)) for r in train}
    same_question = [r for r in evaluation if question_key(r) in train_questions]
    same_item = [r for r in same_question if (question_key(r), _option_set(r)) in train_items]
    return {
        "train": len(train),
        "eval": len(evaluation),
        "same_question": len(same_question),
        "same_question_and_options": len(same_item),
        "ids": [r.id for r in same_item],
    }


def _option_set(record: Record) -> frozenset[str]:
    return frozenset(normalize_text(t).casefold() for t in (record.options or {}).values())
