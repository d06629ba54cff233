"""Questions, options and answers in every published shape, and the canonical record built from them.

Options arrive as a dict (`{"A": text}`), a list of strings (plain or `"A. text"`), a list of
`{"key": "A", "value": text}` dicts, columns (`opa..ope`, `option_A..`, `ending0..`), or lines
inside a prompt (`"Option A: ..."`, `"A. ..."`). Answers arrive as a letter, a 0- or 1-based index,
the option text in any case, an option column name (`"opb"`), or not at all. Every function here is
a pure function of its arguments; a value that cannot be used raises `Skip(reason)`, which the
caller counts in the conversion report.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections.abc import Callable, Collection
from typing import Any

from clinalign.records import DECISIONS, LETTERS, Record

MISSING_TEXT = "nan"  # a text that means missing, in any case (pandas' NaN written out)
# Answer keys whose digit strings are indexes ("0".."3"), not option texts.
INDEX_KEYS = frozenset({"cop", "label", "answer_index", "correct_index"})
_LETTER_RUNS = [list(LETTERS[:n]) for n in range(len(LETTERS) + 1)]
_DECORATED_LETTER = re.compile(r"(?:(?:option|answer|ans)\s*[:.\-]?\s*)?\(?([A-Za-z])\)?[.):]?", re.IGNORECASE)
_LETTER_AND_TEXT = re.compile(r"\(?([A-Z])[.):]\s+(.+)", re.DOTALL)
_OPTION_COLUMN = re.compile(r"op(?:tion)?[_ ]?([a-zA-Z])", re.IGNORECASE)
# Greedy (.*) and no trailing-space handling here: a lazy group before [ \t]*$ backtracks
# quadratically on long runs of spaces; clean() strips them afterwards.
_OPTION_LINE = re.compile(r"^[ \t]*(?:[Oo]ption[ \t]+)?\(?([A-Z])[.):](.*)$", re.MULTILINE)
_LETTER_PREFIX = re.compile(r"\(?([A-Za-z])[.):]\s+")
_STRAY = " \"'.`"
_CONTEXT_LABEL = re.compile(r"^\s*Context\s*:\s*")


class Skip(Exception):
    """A raw record that cannot become a canonical record; `reason` is its key in the report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class Context:
    """What converters know about the file a record came from (decided once per file)."""

    family: str  # the `source` of records whose own fields name none
    keep_unlabeled: bool = False
    split: str | None = None
    index_base: dict[str, int] = dataclasses.field(default_factory=dict)  # answer key -> 0 or 1
    explicit: bool = False  # --dataset was given: it overrides names found in records


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: counted per record
class Schema:
    """One record layout: a name for the report and the function that converts such records.

    `layout` is where the fields sit (`medmcqa.ColumnLayout`); None for the others.
    """

    name: str
    convert: Callable[[dict, Any, int, Context], Record]
    layout: Any = None


def first_key(keys: Any, aliases: tuple[str, ...]) -> str | None:
    """The first alias present among `keys` (a dict or a set of key names)."""
    for alias in aliases:
        if alias in keys:
            return alias
    return None


def clean(value: Any) -> str | None:
    """`records.normalize_text`, or None when the value is missing (None, NaN, '', 'nan', not text).

    The converters' hot path: a long ASCII string that is already clean (most are) is returned
    after a few memchr-fast `in` tests instead of a split/join over the whole string; short
    strings go straight to split/join, which is cheaper than the tests for them.
    """
    if value.__class__ is str:
        if (
            len(value) > 60
            and value.isascii()
            and "\n" not in value
            and "\t" not in value
            and "\r" not in value
            and "\x0b" not in value
            and "\x0c" not in value
            and "\x1c" not in value
            and "\x1d" not in value
            and "\x1e" not in value
            and "\x1f" not in value
            and "  " not in value
            and value[0] != " "
            and value[-1] != " "
        ):
            return value
        text = " ".join(value.split())
    elif value is None or isinstance(value, (dict, list, tuple, set, bytes)):
        return None
    elif isinstance(value, float) and value != value:  # NaN from pandas
        return None
    else:
        try:
            text = " ".join(str(value).split())
        except ValueError:  # an int too long to print (Python's int-to-str digit limit)
            return None
    if not text or (len(text) == 3 and text.lower() == MISSING_TEXT):
        return None
    return text


def record_id(value: Any, ctx: Context, position: int) -> str:
    """The record's own id (first of a list such as MIRAGE's PMID: [..]), else source-split-position."""
    if isinstance(value, list) and value:
        value = value[0]
    text = clean(value)
    if text is not None:
        return text
    return f"{ctx.family}-{ctx.split}-{position}" if ctx.split else f"{ctx.family}-{position}"


def year_of(value: Any) -> int | str | None:
    """A year as an int ("2011.0" -> 2011), or the text when it is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = clean(value)
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() else text


# ---- options -------------------------------------------------------------------------------------


def options_from_values(values: list[Any]) -> dict[str, str]:
    """Options given in order (a list or columns), lettered A, B, ...; missing trailing ones dropped."""
    return lettered([clean(v) for v in values])


def lettered(texts: list[str | None]) -> dict[str, str]:
    """Cleaned option texts in order -> {"A": .., "B": ..}; a missing one (None) only at the end."""
    while texts and texts[-1] is None:
        texts.pop()
    if None in texts:
        raise Skip("empty_option")
    if len(texts) < 2:
        raise Skip("too_few_options")
    if len(texts) > len(LETTERS):
        raise Skip("bad_options")
    return dict(zip(LETTERS, texts))


def options_from_list(values: list[Any]) -> dict[str, str]:
    """A list of strings, of `"A. text"` strings, or of {"key": "A", "value": text} dicts."""
    if values and all(isinstance(v, dict) for v in values):
        pairs = {}
        for item in values:
            key = first_key(item, ("key", "label", "letter", "id"))
            text = first_key(item, ("value", "text", "option", "content"))
            if key is None or text is None:
                raise Skip("bad_options")
            pairs[item[key]] = item[text]
        return options_from_mapping(pairs)
    texts = [clean(v) for v in values]
    prefixes = [_LETTER_PREFIX.match(t) if t else None for t in texts]
    if len(texts) >= 2 and all(m and m.group(1).upper() == LETTERS[i] for i, m in enumerate(prefixes)):
        texts = [t[m.end() :] for t, m in zip(texts, prefixes)]
    return options_from_values(texts)


def options_from_mapping(mapping: dict[Any, Any]) -> dict[str, str]:
    """A dict keyed by letters ("A"/"a"), by indexes (0.. or 1..), or {"label": [..], "text": [..]}."""
    keys = list(mapping)
    if len(keys) <= len(LETTERS) and keys == _LETTER_RUNS[len(keys)]:
        return options_from_values(list(mapping.values()))  # the common case, already in order
    if set(keys) == {"label", "text"} and isinstance(mapping["label"], list) and isinstance(mapping["text"], list):
        return options_from_mapping(dict(zip(mapping["label"], mapping["text"])))
    by_letter: dict[str, Any] = {}
    for key in keys:
        text = str(key).strip()
        if len(text) == 1 and text.isalpha() and text.upper() in LETTERS:
            by_letter[text.upper()] = mapping[key]
        elif text.isdigit():
            by_letter[str(int(text))] = mapping[key]
        else:
            raise Skip("bad_options")
    if any(k.isdigit() for k in by_letter):
        if not all(k.isdigit() for k in by_letter):
            raise Skip("bad_options")
        numbers = sorted(by_letter, key=int)
        start = int(numbers[0])
        if start not in (0, 1) or [int(n) - start for n in numbers] != list(range(len(numbers))):
            raise Skip("bad_options")
        return options_from_values([by_letter[n] for n in numbers])
    letters = sorted(by_letter)
    values = [by_letter[letter] for letter in letters]
    while values and clean(values[-1]) is None:  # a missing last option (MedQA's option_E: "nan")
        values.pop()
        letters.pop()
    if letters != _LETTER_RUNS[len(letters)]:
        raise Skip("bad_options")  # letters with a gap: re-lettering would move the answer
    return options_from_values(values)


def read_options(value: Any) -> dict[str, str] | None:
    """Options from a field holding any of the shapes above; None when the field is empty."""
    if isinstance(value, dict):
        return options_from_mapping(value)
    if isinstance(value, (list, tuple)):
        return options_from_list(list(value))
    if value is None or clean(value) is None:
        return None
    if isinstance(value, str):  # a CSV cell holding a dict or list, or option lines
        text = value.strip()
        if text[:1] in "[{":
            parsed = _parse_literal(text)
            if isinstance(parsed, (dict, list)):
                return read_options(parsed)
        lines = option_lines(text)
        if lines is not None:
            return lines[2]
    raise Skip("bad_options")


def _parse_literal(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def is_decision_options(options: dict[str, str]) -> bool:
    """Options that are only yes / no / maybe (PubMedQA recast as multiple choice)."""
    return len(options) <= 3 and all(text.lower() in DECISIONS for text in options.values())


# ---- answers -------------------------------------------------------------------------------------


def answer_letter(value: Any, options: dict[str, str], base: int = 0, numeric: bool = False) -> str | None:
    """The option letter an answer value names, or None when the record has no answer.

    `base` is the index base for integer answers (MedMCQA's cop: 1 in the original release, 0 on the
    hub); `numeric` makes digit strings indexes (cop "2"). A value that names no option raises
    `Skip("answer_not_in_options")`; one that names two (duplicate texts) `Skip("ambiguous_answer")`.
    """
    cls = value.__class__
    if cls is str:
        if value in options:
            return value  # already a letter: the common case
        text = clean(value)
        if text is None:
            return None
        if numeric and text.lstrip("-").isdigit():
            return _letter_at(int(text), options, base)
        if text == "-1" and text not in options.values():
            return None  # the hidden-label marker, as a string (a CSV export of a test split)
        return _letter_from_text(text, options)
    if cls is int:
        return _letter_at(value, options, base)
    if value is None:
        return None
    if cls is float:
        if value != value:
            return None
        if value.is_integer():
            return _letter_at(int(value), options, base)
    elif isinstance(value, list):  # bigbio: a list of answer texts
        if not value:
            return None
        if len(value) > 1:
            raise Skip("ambiguous_answer")
        if not isinstance(value[0], (list, dict)):
            return answer_letter(value[0], options, base, numeric)
    raise Skip("answer_not_in_options")


def _letter_at(index: int, options: dict[str, str], base: int) -> str | None:
    if index < 0:
        return None  # -1: the label is hidden (MedMCQA's test split)
    position = index - base
    if 0 <= position < len(options):
        return LETTERS[position]
    raise Skip("answer_not_in_options")


def _letter_from_text(text: str, options: dict[str, str]) -> str:
    # Case-insensitive, as Record.problems() compares option texts: "Atropine" matches "atropine" too.
    lowered = text.lower()
    matches = [letter for letter, option in options.items() if option.lower() == lowered]
    if not matches:  # stray quotes or a final period around the text ('Benzodiazepine intoxication\n"')
        bare = text.strip(_STRAY).lower()
        matches = [letter for letter, option in options.items() if option.strip(_STRAY).lower() == bare]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise Skip("ambiguous_answer")
    decorated = _DECORATED_LETTER.fullmatch(text)
    if decorated and decorated.group(1).upper() in options:
        return decorated.group(1).upper()
    with_text = _LETTER_AND_TEXT.fullmatch(text)  # "B. Trigeminal nerve"
    if with_text and with_text.group(1) in options:
        if options[with_text.group(1)].lower() == with_text.group(2).lower():
            return with_text.group(1)
        raise Skip("conflicting_answers")
    column = _OPTION_COLUMN.fullmatch(text)  # CNMLEQA's "opb"
    if column and column.group(1).upper() in options:
        return column.group(1).upper()
    raise Skip("answer_not_in_options")


def pick_answer(row: dict, keys: tuple[str, ...], options: dict[str, str], ctx: Context) -> str | None:
    """The answer letter from the first answer field that has a value, checked against the next one.

    Copies carry the answer twice (MedQA's answer_idx + answer text, "Correct Option" + "Correct
    Answer"); when both name an option and they differ, the record is `conflicting_answers`. A
    second field that names no option (a paraphrased text) is not held against the first.
    """
    letter = None
    primary = None
    for key in keys:
        value = row.get(key)
        if value is None:
            continue
        if primary is None:
            letter = answer_letter(value, options, ctx.index_base.get(key, 0), key in INDEX_KEYS)
            if letter is None:
                continue  # missing here ("nan", -1): a later field may hold it
            primary = key
            continue
        try:
            other = answer_letter(value, options, ctx.index_base.get(key, 0), key in INDEX_KEYS)
        except Skip:
            return letter
        if other is not None and other != letter:
            raise Skip("conflicting_answers")
        return letter
    return letter


def decision_of(value: Any) -> str | None:
    """yes / no / maybe from a decision field ("Yes", "no.", ...); None when missing."""
    text = clean(value)
    if text is None:
        return None
    decision = text.lower().rstrip(".!")
    if decision in DECISIONS:
        return decision
    raise Skip("answer_not_in_options")


# ---- records -------------------------------------------------------------------------------------


def has_duplicates(texts: Collection[str]) -> bool:
    """Whether two option texts are the same, ignoring case (as `Record.problems()` compares them)."""
    return len(set(map(str.lower, texts))) != len(texts)


def mcq_record(
    ctx: Context,
    rid: str,
    question: str,
    options: dict[str, str],
    letter: str | None,
    explanation: str | None,
    meta: dict[str, Any],
    context: str | None = None,
    source: str | None = None,
) -> Record:
    """The canonical multiple-choice record, once question, options and letter are known."""
    if letter is None and not ctx.keep_unlabeled:
        raise Skip("no_answer")
    if has_duplicates(options.values()):
        raise Skip("duplicate_options")
    if ctx.split and "split" not in meta:
        meta["split"] = ctx.split
    return Record(
        rid,
        source or ctx.family,
        question,
        context,
        options,
        letter,
        options[letter] if letter is not None else None,
        explanation,
        meta,
    )


def decision_record(
    ctx: Context,
    rid: str,
    question_value: Any,
    context_value: Any,
    decision: str | None,
    explanation: str | None,
    meta: dict[str, Any],
    source: str | None = None,
) -> Record:
    """The canonical yes/no/maybe record (PubMedQA).

    Copies that fold the abstract into the question ("<abstract>\\n<question>") are split at the
    last line, so the context and the question land in their own fields. An abstract given as a
    list of sections is joined with spaces into `context` and also kept, section by section, in
    `meta["contexts"]` (lm-evaluation-harness joins the sections with newlines: `mc_eval`).
    """
    if context_value is None and isinstance(question_value, str):
        head, _, tail = question_value.strip().rpartition("\n")
        if head and tail.strip():
            context_value, question_value = _CONTEXT_LABEL.sub("", head), tail
    question = clean(question_value)
    if question is None:
        raise Skip("empty_question")
    if decision is None and not ctx.keep_unlabeled:
        raise Skip("no_answer")
    if isinstance(context_value, dict):  # the hub's PubMedQA: {"contexts": [...], "labels": [...]}
        context_value = context_value.get("contexts")
    if isinstance(context_value, list):
        sections = [part for part in map(clean, context_value) if part]
        if sections:
            meta["contexts"] = sections
        context = " ".join(sections) or None
    else:
        context = clean(context_value)
    if ctx.split and "split" not in meta:
        meta["split"] = ctx.split
    return Record(rid, source or ctx.family, question, context, None, decision, decision, explanation, meta)


def option_lines(text: str) -> tuple[int, int, dict[str, str]] | None:
    """The last run of option lines ("A. ..", "B. .." or "Option A: ..") as (start, end, options)."""
    best: list[re.Match] = []
    run: list[re.Match] = []
    for match in _OPTION_LINE.finditer(text):
        letter = match.group(1)
        if run and len(run) < len(LETTERS) and letter == LETTERS[len(run)] and match.start() == run[-1].end() + 1:
            run.append(match)
        else:
            run = [match] if letter == "A" else []
        if len(run) >= 2:
            best = list(run)
    if not best:
        return None
    return best[0].start(), best[-1].end(), options_from_values([m.group(2) for m in best])
