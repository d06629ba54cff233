"""PubMedQA: yes / no / maybe questions about a PubMed abstract.

Layouts converted here (options absent; the answer is the decision itself):

- the original `ori_pqal.json`: a dict keyed by PMID -> {QUESTION, CONTEXTS, LABELS, MESHES, YEAR,
  final_decision, LONG_ANSWER};
- the hub's `qiaojin/PubMedQA` (pqa_labeled, pqa_artificial, pqa_unlabeled): pubid, question,
  context {contexts, labels, meshes}, long_answer, final_decision (absent when unlabeled);
- flattened copies: contexts as a list, a joined string or absent; the decision as final_decision,
  yes_no or answer; long_answer / answer_rationale.

PubMedQA recast as multiple choice (options yes/no/maybe and a letter: MIRAGE, MedAgents) goes
through `medqa`'s options converter and prompt copies (input/output) through
`choices.prompt_schema_for`; both end in `choices.decision_record` like the layouts here.
The long answer becomes the record's `explanation`, the year `meta["year"]`.
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
    record_id,
    year_of,
)
from clinalign.records import Record

QUESTION_KEYS = ("QUESTION", "question", "Question")
CONTEXT_KEYS = ("CONTEXTS", "contexts", "context", "Context", "CONTEXT", "abstract")
DECISION_KEYS = ("final_decision", "yes_no", "decision", "answer", "Answer", "output")
EXPLANATION_KEYS = ("LONG_ANSWER", "long_answer", "answer_rationale", "explanation")
ID_KEYS = ("pubid", "PMID", "pmid", "realidx", "id", "ID")
YEAR_KEYS = ("YEAR", "year")
# Keys only PubMedQA copies carry.
SIGNATURE_KEYS = frozenset(
    {
        "final_decision", "yes_no", "LONG_ANSWER", "long_answer", "answer_rationale", "pubid", "PMID",
        "CONTEXTS", "QUESTION", "reasoning_required_pred", "reasoning_free_pred",
    }
)  # fmt: skip
PROMPT_KEYS = frozenset({"input", "instruction", "instances", "conversations", "messages", "prompt"})


def signal(row: dict) -> bool:
    """Whether a record is recognisably PubMedQA (its keys, or a yes/no/maybe answer without options)."""
    if not SIGNATURE_KEYS.isdisjoint(row):
        return True
    value = row.get("answer", row.get("output"))
    return isinstance(value, str) and value.strip().lower() in ("yes", "no", "maybe") and "options" not in row


def schema_for(keys: dict) -> Schema | None:
    """The decision layout for a record with these keys, or None when it is not one."""
    question = first_key(keys, QUESTION_KEYS)
    strict = not SIGNATURE_KEYS.isdisjoint(keys)
    if question is None and (not strict or not PROMPT_KEYS.isdisjoint(keys)):
        return None
    decisions = tuple(k for k in DECISION_KEYS if k in keys)
    context = first_key(keys, CONTEXT_KEYS)
    explanation = first_key(keys, EXPLANATION_KEYS)
    id_key = first_key(keys, ID_KEYS)
    year = first_key(keys, YEAR_KEYS)

    def convert(row: dict, key: Any, position: int, ctx: Context) -> Record:
        if question is None or clean(row.get(question)) is None:
            raise Skip("empty_question")
        decision = None
        for name in decisions:
            try:
                decision = decision_of(row.get(name))
            except Skip:
                # A copy that is not PubMedQA ({question, answer: "free text"}) is open-ended QA.
                raise Skip("answer_not_in_options" if strict else "open_ended") from None
            if decision is not None:
                break
        meta = {}
        if year is not None and (value := year_of(row.get(year))) is not None:
            meta["year"] = value
        return decision_record(
            ctx,
            key if key is not None else record_id(row.get(id_key) if id_key else None, ctx, position),
            row.get(question) if question else None,
            row.get(context) if context else None,
            decision,
            clean(row.get(explanation)) if explanation else None,
            meta,
        )

    fields = ", ".join(k for k in (question, context, *decisions, explanation) if k)
    return Schema(f"yes/no/maybe ({fields})", convert)
