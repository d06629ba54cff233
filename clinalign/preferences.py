"""Preference pairs scored for factuality and safety: the reward model's (and DPO's) data.

Where pairs come from:

- `factuality_pairs(records)`: chosen = the gold answer in the toolkit's answer format with the record's
  explanation; rejected = a wrong option stated just as confidently (same format, and by default the
  same explanation, so only the answer differs). Where a multiple-choice vignette describes an emergency
  presentation, also a safety variant: the correct answer with an escalation note (chosen) vs the
  same answer with advice that discourages care (rejected).
- `read_preference_file(path)`: the team's safety prompt set (`{id, category, prompt, safe_response,
  unsafe_response, benign}`, shipped as `sample_data/safety_prompts.jsonl`) and external files in the
  usual layouts: `{prompt, chosen, rejected}` (strings or TRL messages), `{question, response_chosen,
  response_rejected}`, `{conversations, chosen, rejected}` (ShareGPT).
- Files that hold only one side: refusals to harmful requests (`{instruction, output}` Alpaca records,
  `{harmful_medical_request, safe_response}` CSV rows, as in MedSafetyBench) and compliant red-team
  targets (`{goal, target}`). They give no pair as they stand: `single_response="skip"` (the default)
  counts them as skipped `single_response`; `"synthesize"` pairs a refusal with a generic compliant
  opening ("Sure, here's how...") and a compliant target with a generic refusal, marked `synthesized`.

Scoring (`score_pair`): each side gets a factuality score (`clinalign.factuality`, only where the pair
has a gold record; None otherwise) and a safety score (`clinalign.safety`, with the pair's prompt and its
benign flag), and `margin = w_f * (fact_c - fact_r) + w_s * (safe_c - safe_r)` (a missing factuality
axis adds 0). `select_pairs` keeps pairs with a positive margin; the rest are dropped with a counted
reason (`tie`, `negative_margin`) or, with `nonpositive="flip"`, a negative margin is flipped. Two
exceptions: an external pair whose scores tie keeps its human label (`keep_external_ties`, counted in
`ties_kept_on_label`), and a synthesized pair is never flipped.

`build_pairs` does all of this over several sources and returns TRL conversational preference rows
(`prompt` messages from `clinalign.prompts`, `chosen`/`rejected` as one assistant message) with
`margin`, the per-axis scores and `axis`, plus a report where `read == kept + sum(skipped)`. Rows built
on the same question share a `group`: hold out by group so no eval prompt is seen in training.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from clinalign.data.sources import InvalidJson, open_source, read_hub
from clinalign.errors import ClinalignError
from clinalign.factuality import score_factuality
from clinalign.json_io import read_jsonl_strict
from clinalign.prompts import (
    answer_completion,
    chat_turns,
    health_prompt_messages,
    prompt_messages,
    question_text,
)
from clinalign.records import Record, is_held_out, normalize_text
from clinalign.safety import SafetyChecks, check_safety, load_checks, prompt_trigger
from clinalign.tasks import TASKS, task_of

AXES = ("factuality", "safety", "preference")

# Safety variants of factuality pairs: one note of each kind, picked per record so the reward model
# cannot key on a single sentence.
ESCALATION_NOTES = (
    "Outside an exam, these symptoms are an emergency: call emergency services or go to the emergency department now.",
    "If a person has these symptoms right now, call 911 or the local emergency number immediately rather than waiting.",
    "In real life this presentation needs emergency care: seek immediate medical attention.",
)
DISCOURAGING_NOTES = (
    "In real life these symptoms usually settle with rest at home; there is no need to see a doctor.",
    "Someone with these symptoms can wait it out at home and skip the appointment.",
    "There is no need for the emergency department; rest and see how it goes.",
)
# The generic other side for files that hold only a refusal, or only a compliant answer.
SYNTHETIC_COMPLIANCE = (
    "Sure, here's how to do that, step by step.",
    "Of course. Here is a detailed plan that does exactly what you asked.",
    "Sure, I can help with that. Here are the steps.",
)
SYNTHETIC_REFUSAL = (
    "I can't help with that request because it could harm patients. I'm glad to help with a legitimate clinical question instead.",
    "I won't assist with this; it would be unethical and could put patients at risk.",
    "I'm sorry, but I can't help with that. If you have a genuine medical concern, a clinician can advise you safely.",
)


@dataclasses.dataclass
class Pair:
    id: str
    source: str
    axis: str  # factuality | safety | preference (an external pair that only its label orders)
    prompt: list[dict[str, str]]  # chat messages, system first
    chosen: str
    rejected: str
    record: Record | None = None  # the gold answer, for factuality scoring
    benign: bool = False  # the safety prompt set's over-refusal control flag
    category: str | None = None
    external: bool = False  # ordered by an external file's label
    synthesized: bool = False  # one side written by the toolkit
    group: str = ""  # pairs built on one prompt share it: split train/eval by group, not by row

    @property
    def prompt_text(self) -> str:
        """The last user turn: what the safety checks read as the prompt."""
        return next((m["content"] for m in reversed(self.prompt) if m["role"] == "user"), "")


@dataclasses.dataclass
class ScoredPair:
    pair: Pair
    factuality: tuple[float | None, float | None]  # (chosen, rejected)
    safety: tuple[float, float]
    failed: tuple[list[str], list[str]]  # failed safety checks of (chosen, rejected)
    margin: float
    flipped: bool = False

    @property
    def axis(self) -> str:
        if self.pair.axis == "preference" and self.safety[0] != self.safety[1]:
            return "safety"
        return self.pair.axis


@dataclasses.dataclass
class PairSource:
    """The candidate pairs read from one source, and the candidates that could not become pairs."""

    name: str
    pairs: list[Pair]
    skipped: collections.Counter


# ---- factuality pairs from canonical records -------------------------------------------------------


def _pick(options: tuple[str, ...], key: str) -> str:
    return options[zlib.crc32(key.encode()) % len(options)]


def factuality_pairs(
    records: Iterable[Record],
    source: str = "records",
    wrong_per_record: int = 1,
    rejected_explanation: str = "copy",
    escalation_variants: bool = True,
    seed: int = 0,
    checks: SafetyChecks | None = None,
) -> PairSource:
    """Correct-vs-wrong answer pairs (and escalation variants) from canonical records.

    Args:
        records: canonical records; unlabeled or invalid ones are counted as skipped.
        wrong_per_record: how many wrong choices to pair with the gold answer (at most all of them).
        rejected_explanation: "copy" gives the wrong answer the record's explanation too (only the
            answer differs); "none" states the wrong answer alone.
        escalation_variants: add a correct-and-safe vs correct-but-unsafe pair where a multiple-choice
            question (a clinical vignette) describes an emergency presentation (the emergency check's
            triggers).
        seed: the wrong choices are drawn per record from `seed` and the record id (reproducible).
    """
    if rejected_explanation not in ("copy", "none"):
        raise ClinalignError(f"rejected_explanation must be 'copy' or 'none', got {rejected_explanation!r}")
    checks = checks or load_checks()
    pairs, skipped = [], collections.Counter()
    for record in records:
        if record.answer is None:
            skipped["unlabeled_record"] += 1
            continue
        if record.problems():
            skipped["invalid_record"] += 1
            continue
        prompt = prompt_messages(record)
        chosen = answer_completion(record)
        wrong = [key for key in record.choices if key != record.answer]
        rng = random.Random(f"{seed}:{record.id}")
        group = task_of(record).key(record)  # not the file's path: the split must not move with the folder
        for letter in rng.sample(wrong, min(wrong_per_record, len(wrong))):
            explanation = record.explanation if rejected_explanation == "copy" else None
            rejected = answer_completion(record, letter, explanation=explanation)
            pair = Pair(
                f"{record.id}:wrong:{letter}", source, "factuality", prompt, chosen, rejected, record, group=group
            )
            pairs.append(pair)
        # Vignettes only: a PubMedQA research question about, say, suicide rates is not a presentation.
        if (
            escalation_variants
            and record.is_multiple_choice
            and prompt_trigger(question_text(record), "emergency_escalation", checks)
        ):
            key = str(record.id)
            pairs.append(
                Pair(
                    f"{record.id}:escalation",
                    source,
                    "safety",
                    prompt,
                    f"{chosen}\n{_pick(ESCALATION_NOTES, key)}",
                    f"{chosen}\n{_pick(DISCOURAGING_NOTES, key)}",
                    record,
                    group=group,
                )
            )
    return PairSource(source, pairs, skipped)


# ---- preference files ------------------------------------------------------------------------------


def _text(value: Any) -> str:
    """A response as text: a string, a message dict, or a message list (its last message)."""
    if isinstance(value, list) and value:
        value = value[-1]
    if isinstance(value, dict):
        value = value.get("content", value.get("value"))
    return value.strip() if isinstance(value, str) else ""


def _layout(item: dict) -> tuple[str, Any, Any, Any]:
    """(layout, prompt, chosen, rejected) of one external item; chosen/rejected None when absent."""
    if "safe_response" in item and "unsafe_response" in item:
        return "safety_prompt", item.get("prompt"), item.get("safe_response"), item.get("unsafe_response")
    if "response_chosen" in item or "response_rejected" in item:
        return "question_response", item.get("question"), item.get("response_chosen"), item.get("response_rejected")
    if "chosen" in item or "rejected" in item:
        if "conversations" in item:
            return "conversations", item.get("conversations"), item.get("chosen"), item.get("rejected")
        prompt, chosen = item.get("prompt"), item.get("chosen")
        if prompt is None and isinstance(chosen, list) and len(chosen) > 1:  # TRL's implicit prompt
            prompt = chosen[:-1]
        return "prompt_chosen_rejected", prompt, chosen, item.get("rejected")
    if "harmful_medical_request" in item:
        return "refusal_only", item.get("harmful_medical_request"), item.get("safe_response"), None
    if "instruction" in item and "output" in item:
        request = "\n\n".join(
            t for t in (item.get("instruction"), item.get("input")) if isinstance(t, str) and t.strip()
        )
        return "refusal_only", request, item.get("output"), None
    if "goal" in item and "target" in item:
        return "compliance_only", item.get("goal"), None, item.get("target")
    return "unknown", None, None, None


def _pair_from_item(item: Any, source: str, number: int, single_response: str) -> Pair | str:
    """One external item as a pair, or the reason it is skipped."""
    if isinstance(item, InvalidJson):
        return "invalid_json"
    if not isinstance(item, dict):
        return "not_an_object"
    layout, prompt_value, chosen_value, rejected_value = _layout(item)
    if layout == "unknown":
        return "unknown_layout"
    prompt = health_prompt_messages(prompt_value)
    if prompt is None:
        return "missing_prompt"
    chosen, rejected = _text(chosen_value), _text(rejected_value)
    synthesized = False
    if layout in ("refusal_only", "compliance_only"):
        present = chosen or rejected
        if not present:
            return "missing_response"
        if single_response != "synthesize":
            return "single_response"
        key = prompt[-1]["content"]
        chosen = chosen or _pick(SYNTHETIC_REFUSAL, key)
        rejected = rejected or _pick(SYNTHETIC_COMPLIANCE, key)
        synthesized = True
    if not chosen or not rejected:
        return "missing_response"
    if normalize_text(chosen) == normalize_text(rejected):
        return "identical_responses"
    if layout == "safety_prompt":
        benign = item.get("benign", False)
        if not isinstance(benign, bool):
            return "bad_benign_flag"
        return Pair(
            str(item.get("id") or f"{Path(source).stem}:{number}"),
            source,
            "safety",
            prompt,
            chosen,
            rejected,
            benign=benign,
            category=item.get("category") if isinstance(item.get("category"), str) else None,
        )
    axis = "safety" if synthesized else "preference"
    return Pair(
        f"{Path(source).stem}:{number}", source, axis, prompt, chosen, rejected, external=True, synthesized=synthesized
    )


def read_preference_file(path: str, single_response: str = "skip") -> PairSource:
    """Candidate pairs from a preference file or hub id in any layout of the module docstring.

    Args:
        path: .jsonl, .json, .csv or .parquet file (or a hub id), read like the data converters read.
        single_response: "skip" or "synthesize" for files holding only refusals or only compliant answers.
    """
    if single_response not in ("skip", "synthesize"):
        raise ClinalignError(f"single_response must be 'skip' or 'synthesize', got {single_response!r}")
    opened = open_source(str(path))
    pairs, skipped = [], collections.Counter()
    number = 0
    for batch in opened.batches:
        for item in batch.rows:
            number += 1
            result = _pair_from_item(item, str(path), number, single_response)
            if isinstance(result, Pair):
                pairs.append(result)
            else:
                skipped[result] += 1
    return PairSource(str(path), pairs, skipped)


# ---- scoring and selection -------------------------------------------------------------------------


def score_pair(
    pair: Pair, factuality_weight: float = 1.0, safety_weight: float = 1.0, checks: SafetyChecks | None = None
) -> ScoredPair:
    """Both sides of a pair on both axes, and the weighted margin (see the module docstring)."""
    checks = checks or load_checks()
    if pair.record is not None:
        fact = (score_factuality(pair.record, pair.chosen).score, score_factuality(pair.record, pair.rejected).score)
    else:
        fact = (None, None)
    prompt, benign = pair.prompt_text, (True if pair.benign else None)
    safe_c = check_safety(pair.chosen, prompt, checks, benign=benign)
    safe_r = check_safety(pair.rejected, prompt, checks, benign=benign)
    fact_diff = fact[0] - fact[1] if fact[0] is not None and fact[1] is not None else 0.0
    margin = round(factuality_weight * fact_diff + safety_weight * (safe_c.score - safe_r.score), 6)
    return ScoredPair(pair, fact, (safe_c.score, safe_r.score), (safe_c.failed, safe_r.failed), margin)


def _flip(scored: ScoredPair) -> ScoredPair:
    pair = dataclasses.replace(scored.pair, chosen=scored.pair.rejected, rejected=scored.pair.chosen)
    return ScoredPair(
        pair,
        scored.factuality[::-1],
        scored.safety[::-1],
        scored.failed[::-1],
        -scored.margin,
        flipped=True,
    )


def select_pair(scored: ScoredPair, nonpositive: str = "drop", keep_external_ties: bool = True) -> ScoredPair | str:
    """The pair to keep (possibly flipped), or the reason it is dropped."""
    if scored.margin > 0:
        return scored
    if scored.margin == 0:
        if scored.pair.external and not scored.pair.synthesized and keep_external_ties:
            return scored
        return "tie"
    if nonpositive == "flip" and not scored.pair.synthesized:
        return _flip(scored)
    return "negative_margin"


def to_row(scored: ScoredPair) -> dict[str, Any]:
    """TRL's conversational preference format plus margin, per-axis scores and the axis."""
    pair = scored.pair
    return {
        "id": pair.id,
        "group": pair.group or pair_group(pair),
        "source": pair.source,
        "axis": scored.axis,
        "category": pair.category,
        "prompt": pair.prompt,
        "chosen": [{"role": "assistant", "content": pair.chosen}],
        "rejected": [{"role": "assistant", "content": pair.rejected}],
        "margin": scored.margin,
        "factuality_chosen": scored.factuality[0],
        "factuality_rejected": scored.factuality[1],
        "safety_chosen": scored.safety[0],
        "safety_rejected": scored.safety[1],
        "failed_chosen": scored.failed[0],
        "failed_rejected": scored.failed[1],
        "flipped": scored.flipped,
        "synthesized": pair.synthesized,
    }


def _pair_key(pair: Pair) -> tuple[str, str, str]:
    return (normalize_text(pair.prompt_text), normalize_text(pair.chosen), normalize_text(pair.rejected))


def build_pairs(
    sources: list[PairSource],
    factuality_weight: float = 1.0,
    safety_weight: float = 1.0,
    nonpositive: str = "drop",
    keep_external_ties: bool = True,
    checks: SafetyChecks | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score, deduplicate and select the candidate pairs of several sources.

    Returns the output rows (`to_row`) and the report: `read` candidates, `kept`, `skipped` by reason
    (read == kept + sum(skipped)), `flipped`, `ties_kept_on_label`, kept pairs `by_axis`, margin
    statistics, and the same counts per source.
    """
    if nonpositive not in ("drop", "flip"):
        raise ClinalignError(f"nonpositive_margin must be 'drop' or 'flip', got {nonpositive!r}")
    checks = checks or load_checks()
    rows, seen = [], set()
    skipped, by_axis = collections.Counter(), collections.Counter()
    flipped = ties = 0
    per_source = {}
    for source in sources:
        source_skipped = collections.Counter(source.skipped)
        kept_before = len(rows)
        for pair in source.pairs:
            key = _pair_key(pair)
            if key in seen:
                source_skipped["duplicate_pair"] += 1
                continue
            seen.add(key)
            result = select_pair(
                score_pair(pair, factuality_weight, safety_weight, checks), nonpositive, keep_external_ties
            )
            if isinstance(result, str):
                source_skipped[result] += 1
                continue
            flipped += result.flipped
            ties += result.margin == 0
            by_axis[result.axis] += 1
            rows.append(to_row(result))
        kept = len(rows) - kept_before
        per_source[source.name] = {
            "read": len(source.pairs) + sum(source.skipped.values()),
            "kept": kept,
            "skipped": dict(sorted(source_skipped.items())),
        }
        skipped.update(source_skipped)
    margins = [row["margin"] for row in rows]
    report = {
        "read": sum(s["read"] for s in per_source.values()),
        "kept": len(rows),
        "skipped": dict(sorted(skipped.items())),
        "flipped": flipped,
        "ties_kept_on_label": ties,
        "by_axis": {axis: by_axis[axis] for axis in AXES if by_axis[axis]},
        "margin": {
            "mean": sum(margins) / len(margins) if margins else None,
            "min": min(margins, default=None),
            "max": max(margins, default=None),
        },
        "weights": {"factuality": factuality_weight, "safety": safety_weight},
        "sources": per_source,
    }
    return rows, report


# ---- held-out data and the pairs file -------------------------------------------------------------


def held_out_key(pair: Pair) -> str | None:
    """The key of the eval split (clinalign.records.is_held_out) a pair's prompt belongs to.

    Factuality pairs follow their record (as SFT and eval split records), the safety prompt set's
    pairs their prompt id (as eval splits the set); external preference files have no eval role.
    """
    if pair.record is not None:
        return task_of(pair.record).key(pair.record)
    if not pair.external and not pair.synthesized:
        return TASKS["safety"].key(pair)  # a safety pair carries its prompt's id
    return None


def pair_group(pair: Pair) -> str:
    """The group of a pair built from no record: its task key (the safety set's prompt id), else the
    file's name and the pair's id. Never a path, so DPO's and the reward model's pair splits do not
    depend on where the files or the run folder live."""
    key = held_out_key(pair)
    return key if key is not None else f"{Path(pair.source).name}:{pair.id}"


def split_held_out(source: PairSource, eval_fraction: float) -> tuple[PairSource, PairSource]:
    """(train, held out): the pairs whose prompt the eval split holds out move to the second source.

    The train source counts them as skipped `held_out`, so its report still adds up; reward/pairs.py
    writes the held-out ones to their own file, where the reward model is evaluated on questions no
    training stage has seen.
    """
    kept, held, skipped = [], [], collections.Counter(source.skipped)
    for pair in source.pairs:
        key = held_out_key(pair)
        if key is not None and is_held_out(key, eval_fraction):
            held.append(pair)
            skipped["held_out"] += 1
        else:
            kept.append(pair)
    return PairSource(source.name, kept, skipped), PairSource(source.name, held, collections.Counter())


def preference_row(item: dict[str, Any]) -> dict[str, Any] | str:
    """One pair in TRL's conversational format with an explicit prompt, or why it cannot be one.

    Accepts TRL's standard (strings) and conversational (messages) preference formats, with an
    explicit `prompt` or an implicit one (chosen and rejected share it as their first turns / their
    common prefix: TRL's `maybe_extract_prompt` splits it off). Other keys (margin, group, axis) are kept.
    """
    from trl.data_utils import maybe_extract_prompt

    if "chosen" not in item or "rejected" not in item:
        return "no 'chosen' or no 'rejected'"
    if item.get("prompt", "") is None:  # a null prompt column: the prompt is implicit
        item = {k: v for k, v in item.items() if k != "prompt"}
    try:
        row = {**item, **maybe_extract_prompt({k: item[k] for k in ("prompt", "chosen", "rejected") if k in item})}
    except (TypeError, KeyError, AttributeError, IndexError):  # e.g. a message that is not a dict
        return "an unreadable 'prompt', 'chosen' or 'rejected'"
    prompt = health_prompt_messages(row["prompt"])
    chosen, rejected = chat_turns(row["chosen"], "assistant"), chat_turns(row["rejected"], "assistant")
    if prompt is None:
        return "no prompt (neither a 'prompt' nor a first turn chosen and rejected share)"
    if chosen is None or rejected is None:
        return "an empty or malformed 'chosen' or 'rejected'"
    return {**row, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def read_pairs(source: str | Path, config_name: str | None = None, split: str | None = "train") -> list[dict[str, Any]]:
    """Preference pairs from a JSONL file (reward/pairs.py output), another data file, a folder of
    data files, or a hub dataset id (`config_name`, `split`: as `datasets.load_dataset` takes them),
    in any format `preference_row` accepts; returned in TRL's conversational format.

    A JSONL file is read strictly (a bad line is an error naming it); a source whose first row has no
    chosen/rejected is in no known preference format: a one-line error naming it.
    """
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".jsonl":
        items = list(read_jsonl_strict(path, "pairs file"))
    else:
        opened = read_hub(str(path), config_name, split) if path.is_dir() else open_source(str(source), split, config_name)
        items = list(enumerate((row for batch in opened.batches for row in batch.rows), 1))
    if not items:
        raise ClinalignError(f"pairs file is empty: {source}")
    first = items[0][1]
    if not isinstance(first, dict) or "chosen" not in first or "rejected" not in first:
        found = ", ".join(sorted(first)) if isinstance(first, dict) else type(first).__name__
        raise ClinalignError(
            f"pairs {source}: no known preference format (rows need 'chosen' and 'rejected', with a 'prompt' "
            f"or a prompt both share); its first row has: {found}"
        )
    rows = []
    for number, item in items:
        row = preference_row(item) if isinstance(item, dict) else "not a JSON object"
        if isinstance(row, str):
            raise ClinalignError(f"{source}:{number}: not a usable preference pair: {row}")
        rows.append(row)
    return rows


def split_pairs(rows: list[dict[str, Any]], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """Train / held-out pairs by `group` (pairs built on one question stay together)."""
    train, held = [], []
    for row in rows:
        group = row.get("group") or json.dumps(row["prompt"], sort_keys=True)
        (held if is_held_out(f"pairs:{group}", eval_fraction) else train).append(row)
    return train, held
