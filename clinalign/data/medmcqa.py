"""MedMCQA, and every copy that keeps options in columns.

MedMCQA's own layout is one column per option, `opa..opd`, with the answer in `cop`: 1-4 in the
original release (`{question, exp, cop, opa, opb, opc, opd, subject_name, topic_name, id,
choice_type}`), 0-3 on the hub (`openlifescienceai/medmcqa`), -1 on its test split, sometimes a
string ("0"). The converter here takes every column layout: `opa..ope` (CNMLEQA, answer "opb"),
`option_A..option_E` (MultiMedQA's MedQA, "nan" for a missing fifth option), `ending0..`
(`GBaker/MedQA-USMLE-4-options-hf`, answer `label`) and one column per letter (`A`, `B`, ...).
`exp` becomes the record's `explanation`; subject, topic and choice type go to `meta`.

Whether `cop` counts from 0 or 1 is decided once per file (`index_base`): a 0 anywhere means 0;
a value equal to the number of options means 1; otherwise the original release's key order
(question, exp, cop, ...) means 1, and anything else means the hub's 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from clinalign.data.choices import (
    INDEX_KEYS,
    Context,
    Schema,
    Skip,
    answer_letter,
    clean,
    decision_record,
    first_key,
    is_decision_options,
    lettered,
    mcq_record,
    pick_answer,
    record_id,
    year_of,
)
from clinalign.records import LETTERS, Record

COLUMN_SETS = (
    tuple(f"op{c}" for c in LETTERS[:10].lower()),
    tuple(f"option_{c}" for c in LETTERS[:10]),
    tuple(f"option_{c}" for c in LETTERS[:10].lower()),
    tuple(f"ending{i}" for i in range(10)),
    tuple(LETTERS[:10]),
)
QUESTION_KEYS = ("question", "Question", "QUESTION", "sent1")
ANSWER_KEYS = (
    "cop", "answer_idx", "Correct Option", "correct_option", "label", "answer", "Answer",
    "Correct Answer", "correct_answer", "answer_text", "output",
)  # fmt: skip
EXPLANATION_KEYS = ("exp", "explanation", "Explanation", "rationale")
ID_KEYS = ("id", "ID", "realidx", "qid", "question_id", "item_index", "idx", "_id")
# (meta name, source keys): subject, topic and choice type from MedMCQA; year and type from CNMLEQA.
META_KEYS = (
    ("subject", ("subject_name", "Subject_name", "subject")),
    ("topic", ("topic_name", "Topic_name", "topic")),
    ("choice_type", ("choice_type",)),
    ("meta_info", ("meta_info",)),
    ("question_type", ("question_type",)),
)
SIGNATURE_KEYS = frozenset({"cop", "exp", "subject_name", "topic_name", "choice_type", "Subject_name"})
ORIGINAL_KEY_ORDER = ("question", "exp", "cop")


def signal(row: dict) -> bool:
    """Whether a record is recognisably MedMCQA (its keys, or exactly four op columns)."""
    return not SIGNATURE_KEYS.isdisjoint(row) or ("opd" in row and "ope" not in row)


def option_columns(keys: Any) -> tuple[str, ...] | None:
    """The option columns of a record: a known set, from its first column to its last present one."""
    for columns in COLUMN_SETS:
        if columns[0] in keys and (columns[1] in keys or columns is not COLUMN_SETS[-1]):
            last = max(i for i, column in enumerate(columns) if column in keys)
            return columns[: last + 1]
    return None


def count_options(row: dict) -> int:
    """How many options a record offers (for deciding the index base of its answer)."""
    columns = option_columns(row)
    if columns is not None:
        return sum(clean(row.get(c)) is not None for c in columns)
    options = row.get("options", row.get("choices"))
    return len(options) if isinstance(options, (list, dict)) else 0


def index_base(rows: Iterable[Any], key: str) -> int:
    """0 or 1: how the integer answers in `key` count, decided over the whole file (see module doc)."""
    first, one_based = None, False
    for row in rows:
        if not isinstance(row, dict):
            continue
        if first is None:
            first = row
        value = row.get(key)
        if value.__class__ is str and value.isdigit():
            value = int(value)
        if value.__class__ is not int:
            continue
        if value == 0:
            return 0
        if not one_based and value >= 2 and value == count_options(row):
            one_based = True  # the last option's number: only a 1-based count reaches it
    return decide_index_base(key, first, has_zero=False, reaches_last=one_based)


def decide_index_base(key: str, first: dict | None, has_zero: bool, reaches_last: bool) -> int:
    """The index base from what a file's answers show: a 0 anywhere means 0; an answer equal to its
    record's number of options (at least 2) means 1; otherwise the first record's key order decides."""
    if has_zero:
        return 0
    if reaches_last:
        return 1
    return 1 if key == "cop" and first is not None and tuple(first)[:3] == ORIGINAL_KEY_ORDER else 0


@dataclasses.dataclass(frozen=True)
class ColumnLayout:
    """Where a record with options in columns keeps each field (found once per key set)."""

    question: str | None
    columns: tuple[str, ...]  # the option columns, in letter order
    answers: tuple[str, ...]  # the answer fields present, most trusted first
    explanation: str | None
    id_key: str | None
    meta_keys: tuple[tuple[str, str], ...]  # (meta name, source key)
    year: str | None

    @property
    def name(self) -> str:
        return f"option columns {self.columns[0]}..{self.columns[-1]}, answer {'/'.join(self.answers) or 'none'}"


def column_layout(keys: Any) -> ColumnLayout | None:
    """The column layout of a record with these keys, or None when its options are not columns."""
    columns = option_columns(keys)
    if columns is None:
        return None
    return ColumnLayout(
        question=first_key(keys, QUESTION_KEYS),
        columns=columns,
        answers=tuple(k for k in ANSWER_KEYS if k in keys and k not in columns),
        explanation=first_key(keys, EXPLANATION_KEYS),
        id_key=first_key(keys, ID_KEYS),
        meta_keys=tuple((name, found) for name, aliases in META_KEYS if (found := first_key(keys, aliases))),
        year="year" if "year" in keys else None,
    )


def schema_for(keys: dict) -> Schema | None:
    """The converter of records with these keys (`column_layout`), or None when their options are not columns."""
    layout = column_layout(keys)
    if layout is None:
        return None
    # Locals, not attribute look-ups, in the converter: it runs once per record.
    question, columns, answers, explanation = layout.question, layout.columns, layout.answers, layout.explanation
    id_key, meta_keys, year = layout.id_key, layout.meta_keys, layout.year
    single = answers[0] if len(answers) == 1 else None

    def convert(row: dict, key: Any, position: int, ctx: Context) -> Record:
        text = clean(row.get(question)) if question else None
        if text is None:
            raise Skip("empty_question")
        options = lettered(list(map(clean, map(row.get, columns))))
        if single is not None:  # one answer field (MedMCQA's cop): skip pick_answer's cross-check loop
            letter = answer_letter(row.get(single), options, ctx.index_base.get(single, 0), single in INDEX_KEYS)
        else:
            letter = pick_answer(row, answers, options, ctx)
        rid = key if key is not None else record_id(row.get(id_key) if id_key else None, ctx, position)
        meta = {}
        for name, source_key in meta_keys:
            value = clean(row.get(source_key))
            if value is not None:
                meta[name] = value
        if year is not None and (value := year_of(row.get(year))) is not None:
            meta["year"] = value
        if is_decision_options(options):
            decision = options[letter].lower() if letter else None
            return decision_record(ctx, rid, row.get(question), None, decision, None, meta)
        explanation_text = clean(row.get(explanation)) if explanation else None
        return mcq_record(ctx, rid, text, options, letter, explanation_text, meta)

    return Schema(layout.name, convert, layout)
