"""The canonical record: one question, whatever dataset or schema it came from.

`id, source, question, context, options, answer, answer_text, explanation, meta`

- `options` is `{"A": text, "B": text, ...}` (letters in order, at least two, texts distinct), or
  None for yes/no/maybe questions (PubMedQA).
- `answer` is an option letter, or "yes" / "no" / "maybe" when `options` is None, or None for an
  unlabeled record (kept only with `--keep-unlabeled`, for prediction).
- `answer_text` is the text of the answer option (or the decision itself for yes/no/maybe).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

DECISIONS = ("yes", "no", "maybe")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_SPACES = re.compile(r"\s+")


def normalize_text(value: Any) -> str:
    """Strip, turn no-break spaces into spaces and collapse whitespace runs; keep the text otherwise."""
    if value is None:
        return ""
    return _SPACES.sub(" ", str(value).replace("\u00a0", " ")).strip()


@dataclasses.dataclass
class Record:
    id: str
    source: str
    question: str
    context: str | None
    options: dict[str, str] | None
    answer: str | None
    answer_text: str | None
    explanation: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def problems(self) -> list[str]:
        """The invariants this record breaks (empty when it is valid)."""
        found = []
        if not self.question:
            found.append("empty question")
        if self.options is not None:
            letters = list(self.options)
            if letters != list(LETTERS[: len(letters)]):
                found.append(f"option letters {letters} are not A, B, C... in order")
            if len(letters) < 2:
                found.append("fewer than two options")
            texts = [normalize_text(t).lower() for t in self.options.values()]
            if any(not t for t in texts):
                found.append("an empty option")
            if len(set(texts)) != len(texts):
                found.append("duplicate option texts")
            if self.answer is not None and self.answer not in self.options:
                found.append(f"answer {self.answer!r} is not an option letter")
            if self.answer is not None and self.answer_text != self.options.get(self.answer):
                found.append("answer_text differs from the answer option's text")
        elif self.answer is not None and self.answer not in DECISIONS:
            found.append(f"answer {self.answer!r} is not yes/no/maybe")
        return found

    @property
    def is_multiple_choice(self) -> bool:
        return self.options is not None

    @property
    def choices(self) -> dict[str, str]:
        """What can be answered: the options, or yes/no/maybe for decision questions."""
        return self.options if self.options is not None else {d: d for d in DECISIONS}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# The held-out share every stage leaves out (records by source:id, safety prompts by id). Declared here
# once: every config's `eval_fraction` defaults to it (clinalign.config.eval_fraction_field), so on
# defaults no stage trains on what another holds out.
EVAL_FRACTION = 0.2


def is_held_out(key: str, fraction: float) -> bool:
    """A deterministic split, stable across runs and machines: the key's hash, read as a number in [0, 1),
    falls below `fraction`. Every stage splits with this (records by source:id, safety prompts by id), so
    what SFT, the reward model and DPO train on is never what eval holds out."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0x100000000 < fraction
