"""The tasks: for each dataset family and the safety prompt set, the one place that knows how an item
becomes a prompt, what its gold answer is, whether it is held out, and how a response is scored.

- `pubmedqa`, `medmcqa`, `medqa` (`QuestionTask`): canonical records (clinalign.data). The prompt is
  `clinalign.prompts.prompt_messages` (GPT-OSS renders the same messages with openai-harmony,
  harmony.render), the gold answer the record's `answer`, the score `clinalign.factuality`.
- `safety` (`SafetyTask`): the safety and over-refusal prompt set. The prompt is the user's text
  under the clinical instructions, the gold a safe reply, the score `clinalign.safety.check_safety`
  (a benign control forces the over-refusal check).

One held-out split for every stage: an item is held out when `records.is_held_out(task.key(item),
eval_fraction)`, keyed `SOURCE:ID` for records and `safety:ID` for safety prompts, with one default
fraction (`records.EVAL_FRACTION`). SFT, pair building, RL and eval all split through `split`, so on
defaults no stage trains on what eval holds out (tests/test_held_out_split.py).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from clinalign.errors import ClinalignError, ConfigError
from clinalign.factuality import FactualityScore, score_factuality
from clinalign.json_io import read_jsonl_strict
from clinalign.prompts import free_text_messages, prompt_messages
from clinalign.records import EVAL_FRACTION, Record, is_held_out
from clinalign.safety import SafetyChecks, SafetyResult, check_safety

SAFETY_PROMPTS = Path(__file__).with_name("sample_data") / "safety_prompts.jsonl"
QUESTION_FAMILIES = ("pubmedqa", "medmcqa", "medqa")


@dataclasses.dataclass(frozen=True)
class SafetyPrompt:
    id: str
    category: str
    prompt: str
    safe_response: str
    unsafe_response: str
    benign: bool


def load_safety_prompts(path: str | Path | None = None) -> list[SafetyPrompt]:
    """The safety prompt set (default: the shipped one), strictly: a bad line is a one-line error."""
    path = Path(path or SAFETY_PROMPTS)
    prompts = []
    for number, item in read_jsonl_strict(path, "safety prompt file"):
        for field in ("id", "category", "prompt", "safe_response", "unsafe_response"):
            if not isinstance(item.get(field), str) or not item[field].strip():
                raise ClinalignError(f"{path}:{number}: '{field}' must be non-empty text")
        if not isinstance(item.get("benign"), bool):
            raise ClinalignError(f"{path}:{number}: 'benign' must be true or false")
        prompts.append(SafetyPrompt(**{f.name: item[f.name] for f in dataclasses.fields(SafetyPrompt)}))
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise ClinalignError(f"{path}: duplicate ids")
    # One question under two ids would be trained under one and evaluated under the other.
    seen: dict[str, str] = {}
    for p in prompts:
        first = seen.setdefault(_question_key(p.prompt), p.id)
        if first != p.id:
            raise ClinalignError(f"{path}: '{p.id}' asks what '{first}' asks (the held-out split would leak it)")
    return prompts


_CONTRACTIONS = {"what's": "what is", "it's": "it is", "i'm": "i am", "don't": "do not", "can't": "cannot"}


def _question_key(text: str) -> str:
    """A prompt's words, case, punctuation and common contractions aside."""
    text = text.lower().replace("\u2019", "'")
    for short, long in _CONTRACTIONS.items():
        text = text.replace(short, long)
    return " ".join(re.findall(r"[a-z0-9]+", text))


@dataclasses.dataclass(frozen=True)
class QuestionTask:
    """A question-answering dataset family over canonical records."""

    name: str

    def key(self, record: Record) -> str:
        return f"{record.source}:{record.id}"

    def messages(self, record: Record) -> list[dict[str, str]]:
        return prompt_messages(record)

    def gold(self, record: Record) -> str | None:
        return record.answer

    def score(self, record: Record, response: str) -> FactualityScore:
        return score_factuality(record, response)


@dataclasses.dataclass(frozen=True)
class SafetyTask:
    """The safety and over-refusal prompt set."""

    name: str = "safety"

    def key(self, prompt: SafetyPrompt) -> str:
        return f"safety:{prompt.id}"

    def messages(self, prompt: SafetyPrompt) -> list[dict[str, str]]:
        return free_text_messages(prompt.prompt)

    def gold(self, prompt: SafetyPrompt) -> str:
        return prompt.safe_response

    def score(self, prompt: SafetyPrompt, response: str, checks: SafetyChecks | None = None) -> SafetyResult:
        # A benign control forces the over-refusal check; the others are judged by their own triggers.
        return check_safety(response, prompt.prompt, checks, benign=True if prompt.benign else None)


TASKS: dict[str, QuestionTask | SafetyTask] = {name: QuestionTask(name) for name in QUESTION_FAMILIES}
TASKS["safety"] = SafetyTask()


def task_of(item: Record | SafetyPrompt) -> QuestionTask | SafetyTask:
    if isinstance(item, SafetyPrompt):
        return TASKS["safety"]
    try:
        return TASKS[item.source]
    except KeyError:
        raise ClinalignError(f"record {item.id}: no task for source '{item.source}' ({', '.join(TASKS)})") from None


def held_out(item: Record | SafetyPrompt, eval_fraction: float = EVAL_FRACTION) -> bool:
    return is_held_out(task_of(item).key(item), eval_fraction)


Item = TypeVar("Item", Record, SafetyPrompt)


def split(items: Iterable[Item], eval_fraction: float = EVAL_FRACTION) -> tuple[list[Item], list[Item]]:
    """(train, held out): the deterministic split every stage uses (stable across runs and machines)."""
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    train, held = [], []
    for item in items:
        (held if held_out(item, eval_fraction) else train).append(item)
    return train, held
