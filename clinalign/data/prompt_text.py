"""Records whose question lives inside prompt text: instruction (Alpaca-style) and chat (ShareGPT,
TRL messages) exports of PubMedQA, MedMCQA and MedQA, parsed back into canonical records.

The question, its options (`"A. ..."`, `"Option A: ..."` lines or an inline `Options:` list) and
the PubMedQA context are split out of the user turn; the gold answer comes from the reply's
`Answer:` line or a column beside the conversation. Option and answer parsing is clinalign.data.choices'.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from clinalign.data.choices import (
    Context,
    Schema,
    Skip,
    answer_letter,
    clean,
    decision_of,
    decision_record,
    first_key,
    is_decision_options,
    mcq_record,
    option_lines,
    options_from_values,
    record_id,
)
from clinalign.prompts import chat_turns
from clinalign.records import LETTERS, Record

_OPTIONS_LABEL = re.compile(r"(?:answer\s+)?(?:options|choices)\s*:?\s*$", re.IGNORECASE)
_INLINE_OPTIONS = re.compile(r"(?:Options|Choices)\s*:\s*(?=A\.\s)")
_SECTION = re.compile(r"(?:^|(?<=\s))(Question|QUESTION|Context|CONTEXT|Abstract|ABSTRACT)\s*:\s*")
_ANSWER_LINE = re.compile(r"^[ \t]*Answer[ \t]*:(.+)$", re.MULTILINE)
_EXPLANATION = re.compile(r"^[ \t]*Explanation[ \t]*:(.*)$", re.MULTILINE | re.DOTALL)


# ---- questions inside prompt text ----------------------------------------------------------------


def _inline_options(text: str) -> tuple[int, dict[str, str]] | None:
    """Options written on one line after "Options:" ("Options: A. x B. y"), as (start, options)."""
    markers = list(_INLINE_OPTIONS.finditer(text))
    if not markers:
        return None
    body = text[markers[-1].end() :]
    starts = [0]
    for letter in LETTERS[1:]:
        found = body.find(f" {letter}. ", starts[-1] + 2)
        if found < 0:
            break
        starts.append(found + 1)
    if len(starts) < 2:
        return None
    ends = starts[1:] + [len(body)]
    return markers[-1].start(), options_from_values([body[s + 2 : e] for s, e in zip(starts, ends)])


def split_prompt(text: str) -> tuple[str, str | None, dict[str, str] | None]:
    """(question, context, options) from a prompt such as "Question: ..\\nContext: ..\\nA. ..\\nB. ..".

    Understands option lines, inline "Options: A. .. B. ..", "Question:"/"Context:" sections and a
    trailing answer instruction ("Answer 'yes', 'no', or 'maybe'."), which is dropped.
    """
    options = None
    lines = option_lines(text)
    if lines is not None:
        options = lines[2]
        text = _OPTIONS_LABEL.sub("", text[: lines[0]].rstrip())
    else:
        inline = _inline_options(text)
        if inline is not None:
            text, options = text[: inline[0]], inline[1]
    stripped = text.rstrip()
    head, _, last = stripped.rpartition("\n")
    if last.strip().lower().startswith("answer") and len(last) < 100:
        stripped = head
    for hint in ("Answer with yes, no or maybe.", "Answer with yes, no, or maybe."):
        if stripped.endswith(hint):
            stripped = stripped[: -len(hint)]
    question, context = _sections(stripped)
    return question, context, options


def _sections(text: str) -> tuple[str, str | None]:
    """(question, context) from "Question:" / "Context:" sections; the whole text when unmarked."""
    marks = list(_SECTION.finditer(text))
    labels = [m.group(1).lower() for m in marks]
    if "question" not in labels:
        return text, None
    parts: dict[str, str] = {}
    for mark, label, following in zip(marks, labels, marks[1:] + [None]):
        key = "question" if label == "question" else "context"
        parts.setdefault(key, text[mark.end() : following.start() if following else len(text)])
    return parts["question"], parts.get("context")


def answer_in_reply(reply: str) -> tuple[str | None, str | None]:
    """(answer value, explanation) from a reply in the toolkit's format ("Answer: B. ..\\nExplanation: ..")."""
    answer = _ANSWER_LINE.search(reply)
    explanation = _EXPLANATION.search(reply)
    return (answer.group(1) if answer else None), (clean(explanation.group(1)) if explanation else None)


# ---- instruction and chat records ----------------------------------------------------------------

CHAT_KEYS = ("conversations", "messages", "prompt")
FAMILIES = frozenset({"pubmedqa", "medmcqa", "medqa"})
_ID_PREFIX = re.compile(r"([A-Za-z][\w.-]*),")  # UltraMedical ids: "MedQA,1592", "PubMedQA,20804554"


def prompt_schema_for(keys: Any) -> Schema | None:
    """Records whose question lives inside prompt text: instruction/input/output, ShareGPT, chat."""
    chat = first_key(keys, CHAT_KEYS)
    if chat is not None:
        return Schema(f"chat ({chat})", _chat_converter(chat))
    if "input" in keys or "instruction" in keys:
        return Schema("instruction (instruction/input/output)", _convert_instruction)
    return None


def _convert_instruction(row: dict, key: Any, position: int, ctx: Context) -> Record:
    texts = [t for t in (row.get("input"), row.get("instruction")) if isinstance(t, str) and t.strip()]
    if not texts:
        raise Skip("empty_question")
    # The question sits in `input` (Self-BioRAG, prompt copies) or in `instruction` (the original
    # pipeline's format, Alpaca): take the first that holds options, else the first non-empty one.
    parsed = next((p for p in map(split_prompt, texts) if p[2] is not None), None) or split_prompt(texts[0])
    rid = key if key is not None else record_id(row.get("id"), ctx, position)
    return _prompt_record(ctx, rid, parsed, row.get("output"), None, {}, None)


def _chat_converter(chat_key: str) -> Callable[[dict, Any, int, Context], Record]:
    def convert(row: dict, key: Any, position: int, ctx: Context) -> Record:
        turns = [
            *(chat_turns(row.get(chat_key), "user", skip_bad_turns=True) or []),
            *(chat_turns(row.get("completion"), "assistant", skip_bad_turns=True) or []),
        ]
        user = next((t["content"] for t in turns if t["role"] == "user"), None)
        if user is None or not user.strip():
            raise Skip("empty_question")
        reply = next((t["content"] for t in turns if t["role"] == "assistant"), None)
        answer, explanation = (None, None) if reply is None else answer_in_reply(reply)
        if "answer" in row:  # ShareGPT exports with the gold letter beside the conversation (UltraMedical)
            answer, explanation = row["answer"], explanation or clean(reply)
        source = None
        prefix = _ID_PREFIX.match(row["id"]) if isinstance(row.get("id"), str) else None
        if prefix and not ctx.explicit:
            source = prefix.group(1).lower()
        rid = key if key is not None else record_id(row.get("id"), ctx, position)
        return _prompt_record(ctx, rid, split_prompt(user), answer, explanation, {}, source)

    return convert


def _prompt_record(
    ctx: Context,
    rid: str,
    parsed: tuple[str, str | None, dict[str, str] | None],
    answer: Any,
    explanation: str | None,
    meta: dict[str, Any],
    source: str | None,
) -> Record:
    question, context, options = parsed
    if clean(question) is None:
        raise Skip("empty_question")
    if options is not None and not is_decision_options(options):
        letter = answer_letter(answer, options)
        return mcq_record(ctx, rid, clean(question), options, letter, explanation, meta, clean(context), source)
    if options is not None:
        letter = answer_letter(answer, options)
        decision = options[letter].lower() if letter else None
    else:
        try:
            decision = decision_of(answer)
        except Skip:
            raise Skip("open_ended") from None  # a free-text prompt and reply, not a question record
        if decision is None and (source or ctx.family) != "pubmedqa":
            raise Skip("open_ended")
    return decision_record(ctx, rid, question, context, decision, explanation, meta, source)
