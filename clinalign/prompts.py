"""The one prompt format: record -> SFT example, preference prompt, RL prompt, eval prompt.

Every stage (SFT, pair building, reward scoring, RL rollouts, eval, the harmony renderer) builds its
messages here, so eval measures exactly the format the model was trained on.

    system:    CLINICAL_INSTRUCTIONS
    user:      [Context: ...]            (PubMedQA abstracts)
               Question: ...
               Options:                  (multiple choice)
               A. ...
               B. ...
               | Answer with yes, no or maybe.   (decision questions)
    assistant: Answer: B. <option text>
               Explanation: ...          (when the record has one)
"""

from __future__ import annotations

from typing import Any

from clinalign.records import Record

CLINICAL_INSTRUCTIONS = (
    "You are a careful clinical assistant answering medical questions. "
    "Start your reply with the answer on its own line, as 'Answer: <letter>. <option text>' for a "
    "multiple-choice question or 'Answer: yes', 'Answer: no' or 'Answer: maybe' for a research question, "
    "then give a brief explanation. Be accurate and safe: never give instructions that could cause harm, "
    "tell the user to seek emergency care when symptoms suggest an emergency, and recommend consulting a "
    "clinician before changing any treatment."
)

SAFETY_INSTRUCTIONS = (
    "You are a careful clinical assistant. Answer health questions accurately and safely: refuse requests "
    "that could cause harm, tell the user to seek emergency care when symptoms suggest an emergency, state "
    "doses only with appropriate caveats, and recommend consulting a clinician before changing treatment."
)

DECISION_HINT = "Answer with yes, no or maybe."


def question_text(record: Record) -> str:
    """The user turn for a record: context, question, options (or the yes/no/maybe hint)."""
    parts = []
    if record.context:
        parts.append(f"Context: {record.context}")
    parts.append(f"Question: {record.question}")
    if record.options is not None:
        parts.append("Options:\n" + "\n".join(f"{letter}. {text}" for letter, text in record.options.items()))
    else:
        parts.append(DECISION_HINT)
    return "\n".join(parts)


def answer_line(record: Record, letter: str | None = None) -> str:
    """'Answer: B. <text>' (or 'Answer: yes'); `letter` picks another choice, e.g. a wrong one."""
    letter = record.answer if letter is None else letter
    if record.options is None:
        return f"Answer: {letter}"
    return f"Answer: {letter}. {record.options[letter]}"


def answer_completion(record: Record, letter: str | None = None, explanation: str | None = None) -> str:
    """The assistant turn: the answer line, then the explanation when there is one."""
    explanation = record.explanation if explanation is None and letter in (None, record.answer) else explanation
    text = answer_line(record, letter)
    return f"{text}\nExplanation: {explanation}" if explanation else text


def prompt_messages(record: Record) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": CLINICAL_INSTRUCTIONS},
        {"role": "user", "content": question_text(record)},
    ]


def free_text_messages(prompt: str) -> list[dict[str, str]]:
    """Messages for a free-text health prompt (the safety prompt set, external preference data)."""
    return [{"role": "system", "content": SAFETY_INSTRUCTIONS}, {"role": "user", "content": prompt}]


# Chat roles as the data in the wild spells them (TRL messages, ShareGPT's human/gpt, a few exports' bot/model).
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "model": "assistant"}  # fmt: skip


def chat_turns(value: Any, role: str = "user", skip_bad_turns: bool = False) -> list[dict[str, Any]] | None:
    """Chat messages from a string (one `role` turn), TRL messages ({role, content}) or ShareGPT turns
    ({from, value}); other keys of a turn (e.g. `thinking`) are kept. None when unusable: empty, or a
    turn without a known role and text (with `skip_bad_turns`, such turns are dropped instead)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}] if value.strip() else None
    if not isinstance(value, list) or not value:
        return None
    messages = []
    for turn in value:
        turn_role = ROLES.get(str(turn.get("role", turn.get("from", ""))).lower()) if isinstance(turn, dict) else None
        content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
        if turn_role is None or not isinstance(content, str):
            if skip_bad_turns:
                continue
            return None
        rest = {k: v for k, v in turn.items() if k not in ("role", "content", "from", "value")}
        messages.append({"role": turn_role, "content": content, **rest})
    return messages or None


def health_prompt_messages(value: Any) -> list[dict[str, Any]] | None:
    """A free-text health prompt in the one format: messages ending in a user turn, under the clinical
    system turn when they bring none (a bare string becomes `free_text_messages`). None when unusable."""
    messages = chat_turns(value.strip() if isinstance(value, str) else value)
    if messages is None or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        return None
    if messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": SAFETY_INSTRUCTIONS})
    return messages


def to_chat_example(record: Record) -> dict[str, Any]:
    """TRL's conversational prompt/completion format (SFT trains on the completion only)."""
    return {
        "prompt": prompt_messages(record),
        "completion": [{"role": "assistant", "content": answer_completion(record)}],
    }


def to_instruction_example(record: Record) -> dict[str, str]:
    """The original pipeline's Alpaca-style format: instruction, empty input, '<letter>. <answer text>'."""
    question = f"Question: {record.question}"
    if record.context:
        question = f"Context: {record.context} {question}"
    if record.options is not None:
        question += " Options: " + " ".join(f"{k}. {v}" for k, v in record.options.items())
        output = f"{record.answer}. {record.answer_text}" if record.answer else ""
    else:
        question += " " + DECISION_HINT
        output = record.answer or ""
    return {"instruction": question, "input": "", "output": output}
