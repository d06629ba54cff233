"""Build preference pairs scored for factuality and safety: the reward model's data.

    python reward/pairs.py --config configs/reward/pairs.yaml
    python reward/pairs.py --config configs/reward/pairs.yaml --nonpositive_margin flip --output_dir runs/pairs_flip
    python reward/pairs.py --records my_medqa.jsonl --preference_files clinalign/sample_data/safety_prompts.jsonl

Factuality pairs come from canonical records (any input the data converters take): the gold answer
with its explanation against a wrong option stated just as confidently, plus a correct-and-safe vs
correct-but-unsafe variant where a question describes an emergency. Safety pairs come from the
team's safety prompt set and from external preference files ({prompt, chosen, rejected},
{question, response_chosen, response_rejected}, {conversations, chosen, rejected}; refusal-only or
compliance-only files with `single_response: synthesize`). Every pair is scored on both axes
(clinalign.factuality, clinalign.safety); margin = factuality_weight * (fact_c - fact_r) +
safety_weight * (safe_c - safe_r); a pair whose margin is not positive is dropped with a counted reason,
or flipped (`nonpositive_margin: flip`). See clinalign/preferences.py.

Writes OUTPUT_DIR/pairs.jsonl (TRL's conversational preference format plus margin, per-axis scores
and axis), OUTPUT_DIR/heldout.jsonl (the same, built on the eval split's questions and safety
prompts, which no stage trains on: the reward model's held-out set), OUTPUT_DIR/metrics.json (the
report: read == kept + sum(skipped), per source, the held-out file's own report, and each record
source's conversion report) and OUTPUT_DIR/config.yaml.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from clinalign.config import Parser, eval_fraction_field, run, write_resolved_config
from clinalign.data import load_records
from clinalign.errors import ClinalignError
from clinalign.json_io import to_plain, write_json
from clinalign.preferences import build_pairs, factuality_pairs, read_preference_file, split_held_out
from clinalign.safety import load_checks


@dataclasses.dataclass
class PairsArgs:
    records: list[str] = dataclasses.field(
        default_factory=list,
        metadata={"help": "Question data for factuality pairs: files or hub ids, anything clinalign.data converts."},
    )
    dataset: str = dataclasses.field(
        default="auto",
        metadata={"help": "Dataset family of the records.", "choices": ["auto", "pubmedqa", "medmcqa", "medqa"]},
    )
    preference_files: list[str] = dataclasses.field(
        default_factory=list,
        metadata={"help": "Safety prompt sets and external preference files (any layout clinalign.preferences reads)."},
    )
    output_dir: str = dataclasses.field(
        default="runs/pairs", metadata={"help": "Where pairs.jsonl and metrics.json go."}
    )
    factuality_weight: float = dataclasses.field(default=1.0, metadata={"help": "w_f in the margin."})
    safety_weight: float = dataclasses.field(default=1.0, metadata={"help": "w_s in the margin."})
    nonpositive_margin: str = dataclasses.field(
        default="drop",
        metadata={"help": "What to do with a pair whose margin is not positive.", "choices": ["drop", "flip"]},
    )
    keep_external_ties: bool = dataclasses.field(
        default=True, metadata={"help": "Keep external pairs whose scores tie, ordered by their own label (margin 0)."}
    )
    single_response: str = dataclasses.field(
        default="skip",
        metadata={
            "help": "Files with only refusals or only compliant answers: skip them, or synthesize the other side.",
            "choices": ["skip", "synthesize"],
        },
    )
    wrong_options_per_record: int = dataclasses.field(
        default=1, metadata={"help": "Wrong options paired with each record's gold answer."}
    )
    rejected_explanation: str = dataclasses.field(
        default="copy",
        metadata={
            "help": "copy: the wrong answer keeps the record's explanation (only the answer differs); none: answer alone.",
            "choices": ["copy", "none"],
        },
    )
    escalation_variants: bool = dataclasses.field(
        default=True, metadata={"help": "Add escalation vs discouraging-care variants for emergency questions."}
    )
    safety_checks: str | None = dataclasses.field(
        default=None, metadata={"help": "Safety checks YAML (default: the shipped clinalign/safety_checks.yaml)."}
    )
    seed: int = dataclasses.field(default=42, metadata={"help": "Seed for drawing wrong options (per record id)."})
    eval_fraction: float = eval_fraction_field()


def make_parser() -> Parser:
    return Parser([PairsArgs])


def main(args: PairsArgs) -> dict:
    if not args.records and not args.preference_files:
        raise ClinalignError("nothing to pair: set records and/or preference_files")
    if args.wrong_options_per_record < 1:
        raise ClinalignError("wrong_options_per_record must be at least 1")
    checks = load_checks(args.safety_checks)
    sources, conversions = [], {}
    for source in args.records:
        converted = load_records(source, dataset=args.dataset)
        conversions[source] = to_plain(converted.report)
        sources.append(
            factuality_pairs(
                converted.records,
                source=source,
                wrong_per_record=args.wrong_options_per_record,
                rejected_explanation=args.rejected_explanation,
                escalation_variants=args.escalation_variants,
                seed=args.seed,
                checks=checks,
            )
        )
    sources += [read_preference_file(path, single_response=args.single_response) for path in args.preference_files]
    train_sources, held_sources = zip(*(split_held_out(source, args.eval_fraction) for source in sources))
    scoring = dict(
        factuality_weight=args.factuality_weight,
        safety_weight=args.safety_weight,
        nonpositive=args.nonpositive_margin,
        keep_external_ties=args.keep_external_ties,
        checks=checks,
    )
    rows, report = build_pairs(list(train_sources), **scoring)
    if not rows:
        raise ClinalignError(f"no pair kept (read {report['read']}, skipped {report['skipped']})")
    # Pairs on the held-out questions and safety prompts: never trained on, the reward model's eval set.
    held_rows, held_report = build_pairs(list(held_sources), **scoring)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, file_rows in (("pairs.jsonl", rows), ("heldout.jsonl", held_rows)):
        with open(output_dir / name, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in file_rows)
    write_json(output_dir / "metrics.json", {**report, "heldout": held_report, "conversions": conversions})
    write_resolved_config(output_dir, args)
    axes = ", ".join(f"{axis} {n}" for axis, n in report["by_axis"].items())
    skipped = ", ".join(f"{reason} {n}" for reason, n in report["skipped"].items()) or "none"
    print(
        f"pairs: read {report['read']}, kept {report['kept']} ({axes}), flipped {report['flipped']}, "
        f"skipped {skipped} -> {output_dir / 'pairs.jsonl'}"
    )
    held_axes = ", ".join(f"{axis} {n}" for axis, n in held_report["by_axis"].items()) or "none"
    print(f"pairs: held out {held_report['kept']} ({held_axes}) -> {output_dir / 'heldout.jsonl'}")
    return report


if __name__ == "__main__":
    run(main, make_parser())
