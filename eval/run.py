"""Evaluate every model of the pipeline the same way, side by side.

    python eval/run.py --config configs/eval/smollm2.yaml
    python eval/run.py --config configs/eval/tiny.yaml

Models are `{name, base, adapter}` entries (the base model, each SFT stage, DPO, PPO). Each is
measured on the held-out records of `data` (the split no stage trained on) and the held-out safety
prompts by clinalign.policy_eval: multiple-choice accuracy by log-likelihood following
lm-evaluation-harness 0.4's pubmedqa / medmcqa / medqa_4options protocol (acc, acc_norm); accuracy,
exact match and no-answer share of greedy answers in the toolkit's chat format; ROUGE-L (rouge-score)
and BLEU (sacrebleu) of generated explanations; each safety check's pass rate and the over-refusal rate
on benign controls; the reward model's mean score; KL(model || reference) per sequence (k1, k3) on
sampled responses. Writes OUTPUT_DIR/metrics.json (model -> dataset -> metric), report.md (one table,
models as rows) and PNG bar charts of the headline metrics, and prints the table last.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

from clinalign.config import (
    ClinalignError,
    ConfigError,
    Parser,
    eval_fraction_field,
    run,
    write_json,
    write_resolved_config,
)
from clinalign.data import load_records
from clinalign.models import load_policy, resolve_model
from clinalign.plots import metric_bars
from clinalign.policy_eval import evaluate_policy, held_out_records, held_out_safety_prompts
from clinalign.rewards import load_reward_model

HEADLINE = ["mc_acc", "mc_acc_norm", "gen_acc", "exact_match", "no_answer", "rougeL", "bleu", "safety_score",
            "over_refusal_rate", "rm_score", "kl_k1", "kl_k3"]
CHARTS = ["mc_acc", "gen_acc", "safety_score", "rm_score", "kl_k3"]


@dataclasses.dataclass
class EvalArgs:
    models: list[dict] = dataclasses.field(
        default_factory=list, metadata={"help": "Models to compare: each {name, base, [adapter]}."}
    )
    data: list[str] = dataclasses.field(
        default_factory=list, metadata={"help": "Question files or hub ids (any converter input); their held-out part."}
    )
    eval_fraction: float = eval_fraction_field()
    max_records_per_dataset: int | None = dataclasses.field(
        default=None, metadata={"help": "At most this many held-out questions per dataset (null: all)."}
    )
    safety_prompts: str | None = dataclasses.field(
        default="clinalign/sample_data/safety_prompts.jsonl", metadata={"help": "Safety prompt set; null: skip."}
    )
    reward_model: str | None = dataclasses.field(default=None, metadata={"help": "Reward model folder; null: skip."})
    reference: dict | None = dataclasses.field(
        default=None, metadata={"help": "KL reference {base, [adapter]} (e.g. the final SFT stage); null: skip KL."}
    )
    dtype: str = dataclasses.field(default="auto", metadata={"help": "auto, bfloat16 or float32 (float32 for lm-eval parity)."})
    max_new_tokens: int = dataclasses.field(default=96, metadata={"help": "Greedy tokens per generated answer."})
    kl_max_new_tokens: int = dataclasses.field(default=48, metadata={"help": "Sampled tokens per KL response."})
    kl_max_prompts: int = dataclasses.field(default=16, metadata={"help": "Prompts used for the KL estimate."})
    kl_num_samples: int = dataclasses.field(default=1, metadata={"help": "Sampled responses per KL prompt."})
    batch_size: int = dataclasses.field(default=8, metadata={"help": "Prompts per generation / scoring batch."})
    reasoning_effort: str = dataclasses.field(
        default="low",
        metadata={"help": "GPT-OSS models: the harmony reasoning effort they were trained with.",
                  "choices": ["low", "medium", "high"]},
    )
    output_dir: str = dataclasses.field(default="runs/demo/eval", metadata={"help": "Where metrics, report and charts go."})


@dataclasses.dataclass
class ModelSpec:
    name: str
    base: str
    adapter: str | None = None

    @classmethod
    def parse(cls, index: int, raw) -> ModelSpec:
        where = f"models[{index}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a mapping {{name, base, [adapter]}}, got {raw!r}")
        unknown = sorted(set(raw) - {"name", "base", "adapter"})
        if unknown:
            raise ConfigError(f"unknown key '{unknown[0]}' in {where} (valid: name, base, adapter)")
        if not raw.get("base") or not raw.get("name"):
            raise ConfigError(f"{where} needs a name and a base")
        spec = cls(**raw)
        resolve_model(spec.base)  # a missing base fails now, not after an hour of evaluating others
        if spec.adapter and not (Path(spec.adapter) / "adapter_config.json").is_file():
            raise ClinalignError(f"{where} ({spec.name}): adapter not found: {spec.adapter}")
        return spec


def headline(results: dict) -> dict:
    """One row of the report: per-dataset metrics averaged over datasets, then safety and overall."""
    datasets = [m for name, m in results.items() if name not in ("safety", "overall")]
    row = {}
    for key in ("mc_acc", "mc_acc_norm", "gen_acc", "exact_match", "no_answer", "rougeL", "bleu"):
        values = [m[key] for m in datasets if m.get(key) is not None]
        row[key] = sum(values) / len(values) if values else None
    row.update({k: results.get("safety", {}).get(k) for k in ("safety_score", "over_refusal_rate")})
    row.update({k: results["overall"].get(k) for k in ("rm_score", "kl_k1", "kl_k3")})
    return row


def report_table(rows: dict[str, dict]) -> str:
    lines = ["| model | " + " | ".join(HEADLINE) + " |", "|---|" + "---|" * len(HEADLINE)]
    for name, row in rows.items():
        cells = ["-" if row.get(k) is None else f"{row[k]:.3f}" for k in HEADLINE]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: EvalArgs):
    specs = [ModelSpec.parse(i, raw) for i, raw in enumerate(args.models)]
    if not specs:
        raise ConfigError("models is empty: list at least one {name, base, [adapter]}")
    if len({s.name for s in specs}) != len(specs):
        raise ConfigError("model names must be unique")
    records = [r for source in args.data for r in load_records(source).records if r.answer is not None]
    held_out = held_out_records(records, args.eval_fraction)
    if args.max_records_per_dataset is not None:
        per_source: dict[str, list] = {}
        for record in held_out:
            per_source.setdefault(record.source, []).append(record)
        held_out = [r for rs in per_source.values() for r in rs[: args.max_records_per_dataset]]
    safety = held_out_safety_prompts(args.safety_prompts, args.eval_fraction) if args.safety_prompts else []
    if not held_out and not safety:
        raise ConfigError("nothing to evaluate: no held-out records in data and no safety prompts")
    reward = load_reward_model(args.reward_model, dtype=args.dtype) if args.reward_model else None
    reference = None
    if args.reference:
        ref = ModelSpec.parse(-1, {"name": "reference", **args.reference})
        reference = load_policy(ref.base, ref.adapter, dtype=args.dtype)[0]

    results, rows = {}, {}
    for spec in specs:
        print(f"[eval] {spec.name}: {spec.base}" + (f" + {spec.adapter}" if spec.adapter else ""))
        model, tokenizer = load_policy(spec.base, spec.adapter, dtype=args.dtype)
        results[spec.name] = evaluate_policy(
            model, tokenizer, records=held_out, safety_prompts=safety, reward=reward, reference=reference,
            kl=reference is not None, max_new_tokens=args.max_new_tokens, kl_max_new_tokens=args.kl_max_new_tokens,
            kl_max_prompts=args.kl_max_prompts, kl_num_samples=args.kl_num_samples, batch_size=args.batch_size,
            reasoning_effort=args.reasoning_effort, progress=True,
        )
        rows[spec.name] = headline(results[spec.name])
        del model
        gc.collect()

    output_dir = Path(args.output_dir)
    write_json(output_dir / "metrics.json", results)
    table = report_table(rows)
    counts = ", ".join(f"{s}: {sum(r.source == s for r in held_out)}" for s in sorted({r.source for r in held_out}))
    (output_dir / "report.md").write_text(
        "# Evaluation report\n\n"
        f"Held-out questions ({counts}), {len(safety)} safety prompts; "
        f"KL reference: {args.reference or 'none'}; reward model: {args.reward_model or 'none'}.\n"
        "Metrics are means over datasets where per dataset (see metrics.json for each dataset).\n\n"
        + table + "\n\n![headline metrics](headline.png)\n"
    )
    metric_bars(rows, CHARTS, output_dir / "headline.png", "Held-out metrics per model")
    write_resolved_config(output_dir, args)
    print(table)
    return results


def make_parser() -> Parser:
    return Parser([EvalArgs])


if __name__ == "__main__":
    run(main, make_parser())
