"""Tune the KL coefficient: a full training per beta over a grid, the KL / objective frontier, a pick.

    python rl/tune_kl.py --config configs/rl/smollm2_tune_kl.yaml
    python rl/tune_kl.py --config configs/rl/tiny_tune_kl.yaml --grid 0.1 0.3 1.0
    python rl/tune_kl.py --config configs/rl/smollm2_tune_kl.yaml --method ppo --base_config configs/rl/smollm2_ppo.yaml

For each beta of the grid (default 0.01, 0.03, 0.1, 0.3, 1.0) it trains the method of `base_config`
(DPO, or PPO-clip through RLOO: the same training paths as rl/dpo.py and rl/ppo.py) from the SFT
policy for as many steps as the final run would (the base config's max_steps unless `max_steps` is
set), saves the adapter, then measures it on the whole held-out set with clinalign.policy_eval
(`max_generated_per_dataset`, `max_new_tokens` and the `kl_*` settings: give them eval/run.py's
values, so a beta is picked on the numbers the final report gives its model), each metric with its 95%
interval: multiple-choice accuracy, safety score, reward-model score and KL(policy || SFT reference)
per sequence; for DPO, held-out preference accuracy of the chosen run (of every run with
`preference_every_beta`, or when it is the objective: in the demo a pair eval took 70 s against 129 s of
training, one profiled run). It picks a beta by CHOICE_RULE (the
best objective within `kl_budget`; among betas whose intervals overlap the best one's, the largest:
a tie, and the report says so) and writes frontier.md / frontier.json (the rule, the table, whether it
was a tie), frontier.png (KL vs objective with intervals), chosen/ (the chosen run's adapter: the
method's result, so nothing is trained twice) and chosen_<method>.yaml: the base config with the
chosen beta, which rl/dpo.py (or rl/ppo.py) accepts as it is. Each run's folder keeps its measurement
(measurement.json, keyed by everything it depends on), which eval/run.py takes for the chosen adapter
instead of measuring the same model on the same items again.
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
from pathlib import Path

import yaml
from trl import DPOConfig, RLOOConfig

from clinalign import tasks
from clinalign.adapters import write_adapter_provenance
from clinalign.config import ModelArgs, Parser, resolved_config, run, write_resolved_config
from clinalign.data import load_records
from clinalign.dpo import DPOArgs, build_dpo_trainer, dpo_pairs
from clinalign.errors import ClinalignError
from clinalign.eval_report import headline
from clinalign.json_io import write_json
from clinalign.plots import kl_frontier
from clinalign.policy_eval import MeasureArgs, evaluate_policy, measurement_key, measurement_settings, store_measurement
from clinalign.ppo import PPOArgs, build_ppo_trainer, rl_prompts
from clinalign.rewards import load_reward_model
from clinalign.run_dir import remove_inside
from clinalign.stats import fmt, intervals_overlap, wilson
from clinalign.tables import markdown_table
from clinalign.tasks import load_safety_prompts
from clinalign.tracking import log_measurements, open_trackers

OBJECTIVES = ("rm_score", "safety_score", "mc_acc", "gen_acc", "preference_accuracy")


@dataclasses.dataclass
class TuneKLArgs(MeasureArgs):  # measured as eval/run.py measures
    method: str = dataclasses.field(default="dpo", metadata={"help": "Which coefficient.", "choices": ["dpo", "ppo"]})
    base_config: str = dataclasses.field(
        default="configs/rl/smollm2_dpo.yaml",
        metadata={"help": "The rl/dpo.py or rl/ppo.py config every run starts from."},
    )
    grid: list[float] = dataclasses.field(
        default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0], metadata={"help": "The beta values to train."}
    )
    max_steps: int | None = dataclasses.field(
        default=None,
        metadata={"help": "Training steps per beta (null: the base config's, as long as the final run would train)."},
    )
    objective: str = dataclasses.field(
        default="rm_score", metadata={"help": "What to maximise.", "choices": list(OBJECTIVES)}
    )
    kl_budget: float | None = dataclasses.field(
        default=None, metadata={"help": "Largest acceptable KL(policy || reference), nats per sequence; null: none."}
    )
    kl_estimator: str = dataclasses.field(
        default="kl_k3", metadata={"help": "Which KL estimate the budget applies to.", "choices": ["kl_k1", "kl_k3"]}
    )
    eval_max_records: int | None = dataclasses.field(
        default=None, metadata={"help": "At most this many held-out questions (null: all)."}
    )
    eval_max_safety_prompts: int | None = dataclasses.field(
        default=None, metadata={"help": "At most this many held-out safety prompts (null: all)."}
    )
    eval_max_pairs: int | None = dataclasses.field(
        default=None, metadata={"help": "DPO: at most this many held-out pairs for preference accuracy (null: all)."}
    )
    preference_every_beta: bool = dataclasses.field(
        default=False,
        metadata={"help": "DPO: held-out preference accuracy for every beta, not the chosen run's only (a pair eval "
                          "per beta: ~70 s each on the demo); always every beta when it is the objective."},
    )  # fmt: skip
    output_dir: str = dataclasses.field(
        default="runs/demo/tune_kl", metadata={"help": "Where the runs and the frontier go."}
    )


def method_parser(method: str) -> Parser:
    return Parser([DPOArgs, DPOConfig, ModelArgs] if method == "dpo" else [PPOArgs, RLOOConfig, ModelArgs])


MEASURED = ("mc_acc", "gen_acc", "safety_score", "rm_score", "kl_k1", "kl_k3")


def train_one(method: str, configs: tuple, held_out: dict, reward, pair_eval: bool = True) -> dict:
    """Train one beta, save its adapter, then measure it; returns the row of the frontier table.
    `pair_eval=False`: no held-out preference accuracy (`preference_accuracy` adds it later)."""
    method_args, training_args, model_args = configs
    if method == "dpo":
        train_rows, eval_rows = dpo_pairs(method_args)
        eval_rows = eval_rows if pair_eval else []
        trainer = build_dpo_trainer(method_args, training_args, model_args, train_rows, eval_rows)
    else:
        records = [r for source in method_args.data for r in load_records(source).records]
        safety = load_safety_prompts(method_args.safety_prompts) if method_args.safety_prompts else []
        prompts = rl_prompts(records, safety, method_args.eval_fraction, method_args.max_prompts)
        trainer, _ = build_ppo_trainer(method_args, training_args, model_args, prompts)
        eval_rows = []
    trainer.train()
    preference = trainer.evaluate().get("eval_rewards/accuracies") if eval_rows else None
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)  # drop the training autocast
    # KL to the reference the run trained against: the trainer's frozen "ref" copy of the SFT adapter.
    measured = evaluate_policy(trainer.model, trainer.processing_class, reference="ref", reward=reward, **held_out)
    intervals = {k: v for k, v in headline(measured).items() if k in MEASURED}
    if preference is not None:
        intervals["preference_accuracy"] = preference_interval(preference, len(eval_rows))
    # Each beta's run reaches the trackers its config names (eval/tune_kl/beta_<b>/<metric>: value, low, high).
    log_measurements(trainer, {f"beta_{training_args.beta:g}": intervals}, "tune_kl")
    # Every point is a finished run: the chosen one is the method's result, not trained a second time.
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        write_adapter_provenance(Path(training_args.output_dir), model_args.model_name_or_path, trainer.model)
        # What eval/run.py would measure for this adapter, with what it depends on: eval reuses it for the
        # chosen run instead of measuring the same model on the same items a second time.
        measure_kwargs = {f.name: held_out[f.name] for f in dataclasses.fields(MeasureArgs)}
        key = measurement_key(
            base=model_args.model_name_or_path, adapter=training_args.output_dir, records=held_out["records"],
            safety_prompts=held_out["safety_prompts"], reward_model=method_args.reward_model,
            reference=(model_args.model_name_or_path, method_args.sft_adapter),
            settings=measurement_settings(measure_kwargs, batch_size=held_out["batch_size"],
                                          reasoning_effort=held_out["reasoning_effort"], dtype=model_args.dtype, kl=True),
        )  # fmt: skip
        store_measurement(training_args.output_dir, key, measured)
    row = {
        "beta": training_args.beta,
        "preference_accuracy": preference,
        **{k: intervals[k]["value"] for k in MEASURED},
        "final_beta": getattr(trainer, "beta", training_args.beta),  # PPO's adaptive controller may move it
        "steps": trainer.state.global_step,
        "adapter": training_args.output_dir,
        "intervals": intervals,
    }
    del trainer
    gc.collect()
    return row


def preference_interval(accuracy: float, n: int) -> dict:
    return wilson(round(accuracy * n), n).as_dict()


def preference_accuracy(configs: tuple, adapter: str | Path) -> dict | None:
    """Held-out preference accuracy (TRL's eval `rewards/accuracies`, with its interval) of a finished DPO
    run's adapter, measured after the grid: the run's trainer rebuilt from the SFT policy (whose frozen
    "ref" copy is the run's reference), the run's trained weights loaded into the trained adapter. The
    same number the run's own trainer gives after training; None without held-out pairs."""
    from peft import load_peft_weights, set_peft_model_state_dict

    method_args, training_args, model_args = configs
    train_rows, eval_rows = dpo_pairs(method_args)
    if not eval_rows:
        return None
    trainer = build_dpo_trainer(method_args, training_args, model_args, train_rows, eval_rows)
    adapter_name = trainer.model.active_adapter  # the trained one; "ref" is the frozen SFT copy
    set_peft_model_state_dict(trainer.model, load_peft_weights(str(adapter)), adapter_name=adapter_name)
    open_trackers(trainer)  # no train(): without it TensorBoard would log to ./runs/ in the working directory
    accuracy = trainer.evaluate()["eval_rewards/accuracies"]
    del trainer
    gc.collect()
    return preference_interval(accuracy, len(eval_rows))


CHOICE_RULE = (
    "the best objective among the betas within the KL budget (point estimates); when other betas' 95% "
    "intervals of the objective overlap the best one's, the difference is noise, and the most "
    "conservative of them (the largest beta) is taken: a tie"
)


def _interval(row: dict, key: str) -> dict:
    return row.get("intervals", {}).get(key) or {"value": row[key], "low": None, "high": None}


def choose(rows: list[dict], objective: str, kl_key: str, budget: float | None) -> tuple[dict, bool, list[float]]:
    """(chosen row, within budget, the tied betas: [] when no tie) by CHOICE_RULE; the lowest-KL row
    when no beta fits the budget."""
    scored = [r for r in rows if r.get(objective) is not None]
    if not scored:
        raise ClinalignError(f"no run produced the objective '{objective}' (is a reward model configured?)")
    within = [r for r in scored if budget is None or r[kl_key] <= budget]
    if not within:
        return min(scored, key=lambda r: r[kl_key]), False, []
    best = max(within, key=lambda r: (r[objective], -r[kl_key]))
    tied = [r for r in within if intervals_overlap(_interval(best, objective), _interval(r, objective))]
    if len(tied) == 1:
        return best, True, []
    return max(tied, key=lambda r: (r["beta"], -r[kl_key])), True, sorted(r["beta"] for r in tied)


def main(args: TuneKLArgs):
    if not Path(args.base_config).is_file():
        raise ClinalignError(f"base config not found: {args.base_config}")
    output_dir = Path(args.output_dir)
    base = method_parser(args.method).parse(["--config", args.base_config])
    method_args = base[0]
    eval_fraction = method_args.eval_fraction
    record_sources = method_args.eval_data if args.method == "dpo" else method_args.data
    records = tasks.split([r for s in record_sources for r in load_records(s).records], eval_fraction)[1]
    held_out = {
        "reasoning_effort": method_args.reasoning_effort,
        **args.measure_kwargs(),
        "batch_size": base[1].per_device_eval_batch_size,  # generation batches: wide ones are ~2x faster on a CPU
        "records": [r for r in records if r.answer is not None][: args.eval_max_records],
        "safety_prompts": (
            tasks.split(load_safety_prompts(method_args.safety_prompts), eval_fraction)[1] if method_args.safety_prompts else []
        )[: args.eval_max_safety_prompts],
    }
    # In the policy's dtype, as eval/run.py loads it: a stored measurement must be the one eval would make.
    reward = load_reward_model(method_args.reward_model, dtype=base[2].dtype) if method_args.reward_model else None

    # A pair eval took 70 s against 129 s of DPO training (demo, one profiled run): unless it is the objective,
    # only the chosen run has one.
    every_pair_eval = args.preference_every_beta or args.objective == "preference_accuracy"
    rows, configs = [], {}
    for beta in args.grid:
        run_args = [
            "--config",
            args.base_config,
            "--beta",
            str(beta),
            "--output_dir",
            str(output_dir / f"{args.method}_beta_{beta:g}"),
            "--save_strategy",
            "no",
        ]
        if args.max_steps is not None:
            run_args += ["--max_steps", str(args.max_steps)]
        if args.method == "dpo" and args.eval_max_pairs is not None:
            run_args += ["--pairs_eval_max", str(args.eval_max_pairs)]
        configs[beta] = method_parser(args.method).parse(run_args)
        rows.append(train_one(args.method, configs[beta], held_out, reward, pair_eval=every_pair_eval))
        print(f"[tune_kl] {args.method} beta {beta:g}: " + ", ".join(f"{k} {v}" for k, v in rows[-1].items()))

    best, within_budget, tied = choose(rows, args.objective, args.kl_estimator, args.kl_budget)
    if args.method == "dpo" and not every_pair_eval:
        measured = preference_accuracy(configs[best["beta"]], best["adapter"])
        if measured is not None:
            best["preference_accuracy"], best["intervals"]["preference_accuracy"] = measured["value"], measured
    chosen_adapter = output_dir / "chosen"  # the chosen run's adapter: what rl/dpo.py (or ppo.py) would have made
    if chosen_adapter.exists():
        remove_inside(chosen_adapter, output_dir)
    shutil.copytree(best["adapter"], chosen_adapter)
    chosen_config = resolved_config(*base)
    chosen_config["beta"] = best["beta"]
    chosen_path = output_dir / f"chosen_{args.method}.yaml"
    chosen_path.write_text(
        f"# Written by rl/tune_kl.py: {args.base_config} with the chosen beta ({args.objective} best"
        f"{' within the KL budget' if within_budget else '; NO beta met the KL budget: lowest KL taken'}"
        f"{f'; a tie between betas {tied}: the largest taken' if tied else ''}).\n"
        + yaml.safe_dump(chosen_config, sort_keys=False)
    )
    table = frontier_table(rows, best)
    verdict = (
        f"Chosen beta {best['beta']:g} ({args.objective}, KL budget {args.kl_budget} on {args.kl_estimator}). "
        f"Rule: {CHOICE_RULE}. "
        + (
            f"A tie: betas {tied} are indistinguishable on {args.objective}; the largest was taken."
            if tied
            else "Not a tie: no other beta's interval overlaps the best one's."
        )
        + ("" if within_budget else " NO beta met the KL budget: the lowest-KL one was taken.")
        + ("" if args.method != "dpo" or every_pair_eval else
           " Held-out preference accuracy: the chosen run's only (preference_every_beta: true measures every beta).")
    )  # fmt: skip
    (output_dir / "frontier.md").write_text(verdict + "\n\n" + table + "\n")
    write_json(
        output_dir / "frontier.json",
        {
            "method": args.method,
            "objective": args.objective,
            "kl_estimator": args.kl_estimator,
            "kl_budget": args.kl_budget,
            "rule": CHOICE_RULE,
            "chosen_beta": best["beta"],
            "tie": tied,
            "chosen_adapter": str(chosen_adapter),
            "within_budget": within_budget,
            "runs": rows,
        },
    )
    points = [
        {"beta": r["beta"], "kl": _interval(r, args.kl_estimator), args.objective: _interval(r, args.objective)}
        for r in rows
        if r[args.objective] is not None
    ]
    kl_frontier(points, args.objective, output_dir / "frontier.png", args.kl_budget, chosen=best["beta"])
    write_resolved_config(output_dir, args)
    print(verdict)
    print(table)
    print(f"[tune_kl] chosen beta {best['beta']:g} -> {chosen_path}, adapter {chosen_adapter}")
    return {"rows": rows, "chosen": best, "within_budget": within_budget, "tie": tied}


def frontier_table(rows: list[dict], best: dict) -> str:
    keys = ["kl_k1", "kl_k3", "rm_score", "safety_score", "mc_acc", "gen_acc", "preference_accuracy"]
    cells = []
    for row in rows:
        intervals = [_interval(row, key) for key in keys]
        values = [fmt(iv.get("value"), iv.get("low"), iv.get("high"), iv.get("n"), 3) for iv in intervals]
        cells.append([f"{row['beta']:g}", row["steps"], *values, "yes" if row is best else ""])
    return markdown_table(["beta", "steps", *keys, "chosen"], cells)


def make_parser() -> Parser:
    return Parser([TuneKLArgs])


if __name__ == "__main__":
    run(main, make_parser(), upstream_patches=True)
