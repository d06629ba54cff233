"""MedQA, and every copy that keeps its options in one field.

MedQA's own layout (jind11's US JSONL, also `GBaker/MedQA-USMLE-4-options`): `{question, answer
(text), options {"A".."E"}, meta_info ("step1" / "step2&3"), answer_idx (letter)}`. The converter
here takes any options field (`options`, `Options`, `choices`) in any shape `choices.read_options`
reads (dict, list, "A. text" list, `bigbio/med_qa`'s [{"key", "value"}] list) and any answer field:
`answer_idx` (a letter, or in some copies the option text, upper-cased or not), "Correct Option",
`answer` (letter or text), `label`. It also reads MedMCQA and PubMedQA recast this way (MedAgents,
MIRAGE, MultiMedQA's TitleCase "Correct Option" copies; yes/no/maybe options become a decision
record) and the toolkit's own canonical JSONL, so converted files read back unchanged.
"""

from __future__ import annotations

from typing import Any

from clinalign.data.choices import (
    Context,
    Schema,
    Skip,
    clean,
    decision_of,
    decision_record,
    first_key,
    is_decision_options,
    mcq_record,
    pick_answer,
    read_options,
    record_id,
    year_of,
)
from clinalign.records import Record

OPTION_KEYS = ("options", "Options", "OPTIONS", "choices", "Choices", "answer_choices")
QUESTION_KEYS = ("question", "Question", "QUESTION", "query")
ANSWER_KEYS = (
    "answer_idx", "Correct Option", "correct_option", "label", "cop", "answer", "Answer",
    "Correct Answer", "correct_answer", "answer_text", "output",
)  # fmt: skip
# Answer keys that only multiple-choice copies use: a record with one but no options lacks them.
CHOICE_ANSWER_KEYS = frozenset({"answer_idx", "Correct Option", "correct_option", "cop"})
EXPLANATION_KEYS = ("explanation", "Explanation", "exp", "answer_rationale", "long_answer", "LONG_ANSWER", "rationale")
CONTEXT_KEYS = ("context", "contexts", "CONTEXTS")
ID_KEYS = ("id", "realidx", "item_index", "qid", "question_id", "idx", "ID", "_id", "uid", "PMID", "pubid")
META_KEYS = (
    ("meta_info", ("meta_info",)),
    ("subject", ("subject_name", "Subject_name", "subject")),
    ("topic", ("topic_name", "topic")),
)
SIGNATURE_KEYS = frozenset({"meta_info", "metamap_phrases", "sent1", "ending0"})
CANONICAL_KEYS = frozenset({"id", "source", "question", "options", "answer", "answer_text", "meta"})


def signal(row: dict) -> bool:
    """Whether a record is recognisably MedQA (keys only MedQA copies carry)."""
    return not SIGNATURE_KEYS.isdisjoint(row)


def schema_for(keys: dict) -> Schema | None:
    """The options-field layout for a record with these keys, or None when it has no options field."""
    options_key = first_key(keys, OPTION_KEYS)
    if options_key is None and CHOICE_ANSWER_KEYS.isdisjoint(keys):
        return None
    question = first_key(keys, QUESTION_KEYS)
    answers = tuple(k for k in ANSWER_KEYS if k in keys)
    explanation = first_key(keys, EXPLANATION_KEYS)
    context = first_key(keys, CONTEXT_KEYS)
    id_key = first_key(keys, ID_KEYS)
    meta_keys = tuple((name, found) for name, aliases in META_KEYS if (found := first_key(keys, aliases)))
    canonical = CANONICAL_KEYS.issubset(keys)

    def convert(row: dict, key: Any, position: int, ctx: Context) -> Record:
        raw_question = row.get(question) if question else None
        text = clean(raw_question)
        if text is None:
            raise Skip("empty_question")
        options = read_options(row.get(options_key)) if options_key else None
        rid = key if key is not None else record_id(row.get(id_key) if id_key else None, ctx, position)
        source = None
        if canonical:  # the toolkit's own JSONL: keep its source and meta
            meta = dict(row["meta"]) if isinstance(row.get("meta"), dict) else {}
            if not ctx.explicit and isinstance(row.get("source"), str) and clean(row["source"]):
                source = clean(row["source"])
        else:
            meta = {}
            for name, source_key in meta_keys:
                value = clean(row.get(source_key))
                if value is not None:
                    meta[name] = value
            if "year" in row and (value := year_of(row["year"])) is not None:
                meta["year"] = value
        explanation_text = clean(row.get(explanation)) if explanation else None
        context_value = row.get(context) if context else None
        if options is None or is_decision_options(options):
            decision = _decision(row, answers, options, ctx)
            return decision_record(ctx, rid, raw_question, context_value, decision, explanation_text, meta, source)
        letter = pick_answer(row, answers, options, ctx)
        context_text = clean(context_value) if isinstance(context_value, str) else None
        return mcq_record(ctx, rid, text, options, letter, explanation_text, meta, context_text, source)

    shown = options_key or "no options field"
    return Schema(
        f"{'canonical' if canonical else 'options field'} {shown}, answer {'/'.join(answers) or 'none'}", convert
    )


def _decision(row: dict, answers: tuple[str, ...], options: dict[str, str] | None, ctx: Context) -> str | None:
    """yes/no/maybe from a letter over yes/no/maybe options, or from a decision answer field."""
    if options is not None:
        letter = pick_answer(row, answers, options, ctx)
        return options[letter].lower() if letter else None
    for key in answers:
        value = row.get(key)
        if clean(value) is None:
            continue
        try:
            return decision_of(value)
        except Skip:
            raise Skip("too_few_options") from None  # a multiple-choice record without its options
    if ctx.family != "pubmedqa" and not CANONICAL_KEYS.issubset(row):
        raise Skip("too_few_options")  # neither answer nor options: not a yes/no/maybe question either
    return None
