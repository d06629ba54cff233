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

from clinalign.data.records import Record

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
