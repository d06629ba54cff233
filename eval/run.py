"""Evaluate every model of the pipeline the same way, side by side.

    python eval/run.py --config configs/eval/smollm2.yaml
    python eval/run.py --config configs/eval/tiny.yaml

Models are `{name, base, adapter, [baseline]}` entries (the base model, each SFT stage, DPO, PPO). Each is
measured on the held-out records of `data` (the split no stage trained on) and the held-out safety
prompts by clinalign.policy_eval: multiple-choice accuracy by log-likelihood following
lm-evaluation-harness 0.4's pubmedqa / medmcqa / medqa_4options protocol (acc, acc_norm); accuracy,
exact match and no-answer share of greedy answers in the toolkit's chat format; ROUGE-L (rouge-score)
and BLEU (sacrebleu) of generated explanations; each safety check's pass rate and the over-refusal rate
on benign controls; the reward model's mean score; KL(model || reference) per sequence (k1, k3) on
sampled responses. Every headline metric carries its 95% interval and n, and every model is compared
on the same items with its baseline (the model listed before it unless `baseline` names another; null:
none) with a paired test and a verdict (clinalign.eval_report). Writes OUTPUT_DIR/metrics.json (model ->
dataset -> metric, plus each model's per-item values, "headline" intervals and "comparison"), report.md
(headline table, comparisons, multiple-choice letter distributions) and PNG bar charts with error bars,
and prints the headline table last.

An adapter folder holding rl/tune_kl.py's measurement.json (every beta's run, so the chosen DPO) is not
measured again when its key matches: the same adapter and base, items, reward model, KL reference,
settings, measuring code and library versions (clinalign.policy_eval.measurement_key); otherwise, or
with `reuse_measurements: false`, it is measured like every other model. report.md names the models taken.
"""

from __future__ import annotations

import dataclasses
import gc
from collections import Counter
from pathlib import Path

from clinalign import tasks
from clinalign.config import Parser, eval_fraction_field, run, write_resolved_config
from clinalign.data import load_records
from clinalign.errors import ClinalignError, ConfigError
from clinalign.eval_report import comparison, comparison_table, headline, headline_table, letters_table
from clinalign.json_io import write_json
from clinalign.model_store import is_adapter_folder
from clinalign.models import load_policy, resolve_model
from clinalign.plots import metric_bars
from clinalign.policy_eval import (
    MEASUREMENT_FILE,
    MeasureArgs,
    evaluate_policy,
    measurement_key,
    measurement_settings,
    same_model,
    stored_measurement,
)
from clinalign.rewards import load_reward_model
from clinalign.tasks import load_safety_prompts

CHARTS = ["mc_acc", "gen_acc", "safety_score", "rm_score", "kl_k3"]


@dataclasses.dataclass
class EvalArgs(MeasureArgs):
    models: list[dict] = dataclasses.field(
        default_factory=list, metadata={"help": "Models to compare: each {name, base, [adapter]}."}
    )
    data: list[str] = dataclasses.field(
        default_factory=list, metadata={"help": "Question files or hub ids (any converter input); their held-out part."}
    )
    test_data: list[str] = dataclasses.field(
        default_factory=list,
        metadata={"help": "Published test splits (files or hub ids), evaluated whole: no stage may train on them."},
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
    dtype: str = dataclasses.field(
        default="auto", metadata={"help": "auto, bfloat16 or float32 (float32 for lm-eval parity)."}
    )
    batch_size: int = dataclasses.field(default=8, metadata={"help": "Prompts per generation / scoring batch."})
    reasoning_effort: str = dataclasses.field(
        default="low",
        metadata={
            "help": "GPT-OSS models: the harmony reasoning effort they were trained with.",
            "choices": ["low", "medium", "high"],
        },
    )
    report_to: str = dataclasses.field(
        default="none",
        metadata={"help": "tensorboard: headline metrics (value, low, high) to OUTPUT_DIR/runs/eval.",
                  "choices": ["none", "tensorboard"]},
    )  # fmt: skip
    reuse_measurements: bool = dataclasses.field(
        default=True,
        metadata={"help": f"Take an adapter's {MEASUREMENT_FILE} (written by rl/tune_kl.py) instead of measuring it, "
                          "when the model, items, reward model, reference, settings, code and library versions all "
                          "match; false: measure every model."},
    )  # fmt: skip
    output_dir: str = dataclasses.field(
        default="runs/demo/eval", metadata={"help": "Where metrics, report and charts go."}
    )


@dataclasses.dataclass
class ModelSpec:
    name: str
    base: str
    adapter: str | None = None
    baseline: str | None = ""  # "": the model listed before it; null: compare with none

    @classmethod
    def parse(cls, index: int, raw) -> ModelSpec:
        where = f"models[{index}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a mapping {{name, base, [adapter], [baseline]}}, got {raw!r}")
        unknown = sorted(set(raw) - {"name", "base", "adapter", "baseline"})
        if unknown:
            raise ConfigError(f"unknown key '{unknown[0]}' in {where} (valid: name, base, adapter, baseline)")
        if not raw.get("base") or not raw.get("name"):
            raise ConfigError(f"{where} needs a name and a base")
        spec = cls(**raw)
        resolve_model(spec.base)  # a missing base fails now, not after an hour of evaluating others
        if spec.adapter and not is_adapter_folder(spec.adapter):
            raise ClinalignError(f"{where} ({spec.name}): adapter not found: {spec.adapter}")
        return spec


def baselines(specs: list[ModelSpec]) -> dict[str, str]:
    """{model: the model it is compared with}: the one listed before it unless `baseline` names another."""
    names = [s.name for s in specs]
    out = {}
    for i, spec in enumerate(specs):
        if spec.baseline == "":
            if i:
                out[spec.name] = names[i - 1]
        elif spec.baseline is not None:
            if spec.baseline not in names or spec.baseline == spec.name:
                raise ConfigError(f"models[{i}] ({spec.name}): baseline '{spec.baseline}' is not another listed model")
            out[spec.name] = spec.baseline
    return out


def main(args: EvalArgs):
    specs = [ModelSpec.parse(i, raw) for i, raw in enumerate(args.models)]
    if not specs:
        raise ConfigError("models is empty: list at least one {name, base, [adapter]}")
    if len({s.name for s in specs}) != len(specs):
        raise ConfigError("model names must be unique")
    compared_with = baselines(specs)
    records = [r for source in args.data for r in load_records(source).records if r.answer is not None]
    held_out = tasks.split(records, args.eval_fraction)[1]
    held_out += [r for source in args.test_data for r in load_records(source).records if r.answer is not None]
    repeated = next((k for k, n in Counter(tasks.task_of(r).key(r) for r in held_out).items() if n > 1), None)
    if repeated:
        raise ConfigError(f"record {repeated} is evaluated twice (data's held-out part and test_data, or one file twice)")
    if args.max_records_per_dataset is not None:
        per_source: dict[str, list] = {}
        for record in held_out:
            per_source.setdefault(record.source, []).append(record)
        held_out = [r for rs in per_source.values() for r in rs[: args.max_records_per_dataset]]
    safety = tasks.split(load_safety_prompts(args.safety_prompts), args.eval_fraction)[1] if args.safety_prompts else []
    if not held_out and not safety:
        raise ConfigError("nothing to evaluate: no held-out records in data and no safety prompts")
    reward = load_reward_model(args.reward_model, dtype=args.dtype) if args.reward_model else None
    reference = None
    if args.reference:
        ref = ModelSpec.parse(-1, {"name": "reference", **args.reference})
        reference = load_policy(ref.base, ref.adapter, dtype=args.dtype)[0]

    settings = measurement_settings(args.measure_kwargs(), batch_size=args.batch_size,
                                    reasoning_effort=args.reasoning_effort, dtype=args.dtype, kl=reference is not None)  # fmt: skip
    results, rows, reused = {}, {}, []
    for spec in specs:
        print(f"[eval] {spec.name}: {spec.base}" + (f" + {spec.adapter}" if spec.adapter else ""))
        stored = None
        if args.reuse_measurements and spec.adapter and (Path(spec.adapter) / MEASUREMENT_FILE).is_file():
            stored = stored_measurement(spec.adapter, measurement_key(
                base=spec.base, adapter=spec.adapter, records=held_out, safety_prompts=safety,
                reward_model=args.reward_model, reference=(ref.base, ref.adapter) if reference is not None else None,
                settings=settings))  # fmt: skip
            print(f"[eval] {spec.name}: " + (f"the measurement in {spec.adapter}/{MEASUREMENT_FILE} has the same model, "
                  "items, reward model, reference, settings and code: taken, not measured again" if stored else
                  f"{spec.adapter}/{MEASUREMENT_FILE} was made with something else: measuring"))  # fmt: skip
        if stored is not None:
            results[spec.name] = stored
            results[spec.name]["headline"] = rows[spec.name] = headline(stored)
            reused.append(spec.name)
            continue
        model, tokenizer = load_policy(spec.base, spec.adapter, dtype=args.dtype)
        results[spec.name] = evaluate_policy(
            model,
            tokenizer,
            records=held_out,
            safety_prompts=safety,
            reward=reward,
            reference=reference,
            kl=reference is not None,
            # The SFT model is the KL reference itself: its KL is 0, no need to sample and score it
            reference_is_policy=reference is not None and same_model(spec.base, spec.adapter, ref.base, ref.adapter),
            **args.measure_kwargs(),
            batch_size=args.batch_size,
            reasoning_effort=args.reasoning_effort,
            progress=True,
        )
        results[spec.name]["headline"] = rows[spec.name] = headline(results[spec.name])
        del model
        gc.collect()

    comparisons = {}
    for name, baseline in compared_with.items():
        comparisons[name] = {"baseline": baseline, "metrics": comparison(results[name], results[baseline])}
        results[name]["comparison"] = comparisons[name]

    output_dir = Path(args.output_dir)
    write_json(output_dir / "metrics.json", results)
    table = headline_table(rows)
    counts = ", ".join(f"{s}: {sum(r.source == s for r in held_out)}" for s in sorted({r.source for r in held_out}))
    (output_dir / "report.md").write_text(
        "# Evaluation report\n\n"
        f"Held-out questions ({counts}; generated answers: "
        f"{'all' if args.max_generated_per_dataset is None else f'first {args.max_generated_per_dataset}'} "
        f"per dataset), {len(safety)} safety prompts; KL reference: {args.reference or 'none'}; "
        f"reward model: {args.reward_model or 'none'}.\n\n"
        + (f"Taken from rl/tune_kl.py's {MEASUREMENT_FILE} (the same model, items, reward model, reference, "
           f"settings and code), not measured again: {', '.join(reused)}.\n\n" if reused else "")
        + "Each cell: value [95% interval] n. Datasets are pooled (metrics.json has each dataset); Wilson "
        "intervals for shares, bootstrap for scores and BLEU (clinalign.eval_report).\n\n"
        + table
        + "\n\n## Paired comparisons\n\nEach model minus its baseline on the same items: McNemar's exact "
        "test for shares, paired permutation test for scores; better / worse needs p < 0.05 and an "
        "interval excluding 0.\n\n"
        + comparison_table(comparisons)
        + "\n\n## Multiple-choice answer letters\n\n"
        + letters_table(results)
        + "\n\n![headline metrics](headline.png)\n"
    )
    metric_bars(rows, CHARTS, output_dir / "headline.png", "Held-out metrics per model (95% intervals)")
    if args.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(output_dir / "runs" / "eval")) as writer:
            for name, row in rows.items():
                for metric, iv in row.items():
                    for part in ("value", "low", "high"):
                        if iv.get(part) is not None:
                            writer.add_scalar(f"eval/{name}/{metric}/{part}", iv[part], 0)
    write_resolved_config(output_dir, args)
    print(table)
    return results


def make_parser() -> Parser:
    return Parser([EvalArgs])


if __name__ == "__main__":
    run(main, make_parser(), upstream_patches=True)
