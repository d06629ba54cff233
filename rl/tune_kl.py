"""Tune the KL coefficient: short trainings over a grid of beta, the KL / objective frontier, a pick.

    python rl/tune_kl.py --config configs/rl/smollm2_tune_kl.yaml
    python rl/tune_kl.py --config configs/rl/tiny_tune_kl.yaml --grid 0.1 0.3 1.0
    python rl/tune_kl.py --config configs/rl/smollm2_tune_kl.yaml --method ppo --base_config configs/rl/smollm2_ppo.yaml

For each beta of the grid (default 0.01, 0.03, 0.1, 0.3, 1.0) it trains the method of `base_config`
(DPO, or PPO-clip through RLOO: the same training paths as rl/dpo.py and rl/ppo.py) for `max_steps`
from the SFT policy, then measures the policy on held-out data with clinalign.policy_eval: preference
accuracy (DPO), multiple-choice accuracy, safety score, reward-model score and KL(policy || SFT
reference) per sequence. It picks the beta with the best `objective` among those within `kl_budget`
(nats per sequence; the lowest-KL point when none is), and writes frontier.md / frontier.json (the
table), frontier.png (KL vs objective, one point per beta) and chosen_<method>.yaml: the base config
with the chosen beta, which rl/dpo.py (or rl/ppo.py) accepts as it is.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import yaml
from trl import DPOConfig, RLOOConfig

from clinalign.config import ClinalignError, ModelArgs, Parser, resolved_config, run, write_json, write_resolved_config
from clinalign.data import load_records
from clinalign.dpo import DPOArgs, build_dpo_trainer, dpo_pairs
from clinalign.plots import kl_frontier
from clinalign.policy_eval import evaluate_policy, held_out_records, held_out_safety_prompts
from clinalign.ppo import PPOArgs, build_ppo_trainer, rl_prompts
from clinalign.preferences import load_safety_prompts
from clinalign.rewards import load_reward_model

OBJECTIVES = ("rm_score", "safety_score", "mc_acc", "gen_acc", "preference_accuracy")


@dataclasses.dataclass
class TuneKLArgs:
    method: str = dataclasses.field(default="dpo", metadata={"help": "Which coefficient.", "choices": ["dpo", "ppo"]})
    base_config: str = dataclasses.field(
        default="configs/rl/smollm2_dpo.yaml", metadata={"help": "The rl/dpo.py or rl/ppo.py config every run starts from."}
    )
    grid: list[float] = dataclasses.field(
        default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0], metadata={"help": "The beta values to train."}
    )
    max_steps: int = dataclasses.field(default=10, metadata={"help": "Training steps per beta (short runs)."})
    objective: str = dataclasses.field(
        default="rm_score", metadata={"help": "What to maximise.", "choices": list(OBJECTIVES)}
    )
    kl_budget: float | None = dataclasses.field(
        default=None, metadata={"help": "Largest acceptable KL(policy || reference), nats per sequence; null: none."}
    )
    kl_estimator: str = dataclasses.field(
        default="kl_k3", metadata={"help": "Which KL estimate the budget applies to.", "choices": ["kl_k1", "kl_k3"]}
    )
    eval_max_records: int = dataclasses.field(default=24, metadata={"help": "At most this many held-out questions."})
    eval_max_safety_prompts: int | None = dataclasses.field(
        default=None, metadata={"help": "At most this many held-out safety prompts (null: all)."}
    )
    eval_max_pairs: int | None = dataclasses.field(
        default=None, metadata={"help": "DPO: at most this many held-out pairs for preference accuracy (null: all)."}
    )
    output_dir: str = dataclasses.field(default="runs/demo/tune_kl", metadata={"help": "Where the runs and the frontier go."})


def method_parser(method: str) -> Parser:
    return Parser([DPOArgs, DPOConfig, ModelArgs] if method == "dpo" else [PPOArgs, RLOOConfig, ModelArgs])


def train_one(method: str, configs: tuple, held_out: dict, reward) -> dict:
    """Train one beta, then measure it; returns the row of the frontier table."""
    method_args, training_args, model_args = configs
    if method == "dpo":
        train_rows, eval_rows = dpo_pairs(method_args)
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
    datasets = [m for name, m in measured.items() if name not in ("safety", "overall")]

    def mean(key):
        values = [m[key] for m in datasets if m.get(key) is not None]
        return sum(values) / len(values) if values else None

    row = {
        "beta": training_args.beta,
        "preference_accuracy": preference,
        "mc_acc": mean("mc_acc"),
        "gen_acc": mean("gen_acc"),
        "safety_score": measured.get("safety", {}).get("safety_score"),
        "rm_score": measured["overall"].get("rm_score"),
        "kl_k1": measured["overall"].get("kl_k1"),
        "kl_k3": measured["overall"].get("kl_k3"),
        "final_beta": getattr(trainer, "beta", training_args.beta),  # PPO's adaptive controller may move it
    }
    del trainer
    gc.collect()
    return row


def choose(rows: list[dict], objective: str, kl_key: str, budget: float | None) -> tuple[dict, bool]:
    """The best row by objective within the KL budget; (lowest-KL row, False) when none fits."""
    scored = [r for r in rows if r.get(objective) is not None]
    if not scored:
        raise ClinalignError(f"no run produced the objective '{objective}' (is a reward model configured?)")
    within = [r for r in scored if budget is None or r[kl_key] <= budget]
    if not within:
        return min(scored, key=lambda r: r[kl_key]), False
    return max(within, key=lambda r: (r[objective], -r[kl_key])), True


def main(args: TuneKLArgs):
    if not Path(args.base_config).is_file():
        raise ClinalignError(f"base config not found: {args.base_config}")
    output_dir = Path(args.output_dir)
    base = method_parser(args.method).parse(["--config", args.base_config])
    method_args = base[0]
    eval_fraction = method_args.eval_fraction
    record_sources = method_args.eval_data if args.method == "dpo" else method_args.data
    records = held_out_records([r for s in record_sources for r in load_records(s).records], eval_fraction)
    held_out = {
        "reasoning_effort": method_args.reasoning_effort,
        "batch_size": base[1].per_device_eval_batch_size,  # generation batches: wide ones are ~2x faster on a CPU
        "records": [r for r in records if r.answer is not None][: args.eval_max_records],
        "safety_prompts": (held_out_safety_prompts(method_args.safety_prompts, eval_fraction)
                           if method_args.safety_prompts else [])[: args.eval_max_safety_prompts],
    }
    reward = load_reward_model(method_args.reward_model) if method_args.reward_model else None

    rows = []
    for beta in args.grid:
        run_args = ["--config", args.base_config, "--beta", str(beta), "--max_steps", str(args.max_steps),
                    "--output_dir", str(output_dir / f"{args.method}_beta_{beta:g}"), "--save_strategy", "no"]
        if args.method == "dpo" and args.eval_max_pairs is not None:
            run_args += ["--pairs_eval_max", str(args.eval_max_pairs)]
        rows.append(train_one(args.method, method_parser(args.method).parse(run_args), held_out, reward))
        print(f"[tune_kl] {args.method} beta {beta:g}: " + ", ".join(f"{k} {v}" for k, v in rows[-1].items()))

    best, within_budget = choose(rows, args.objective, args.kl_estimator, args.kl_budget)
    chosen_config = resolved_config(*base)
    chosen_config["beta"] = best["beta"]
    chosen_path = output_dir / f"chosen_{args.method}.yaml"
    chosen_path.write_text(
        f"# Written by rl/tune_kl.py: {args.base_config} with the chosen beta ({args.objective} best"
        f"{' within the KL budget' if within_budget else '; NO beta met the KL budget: lowest KL taken'}).\n"
        + yaml.safe_dump(chosen_config, sort_keys=False)
    )
    table = frontier_table(rows, best)
    (output_dir / "frontier.md").write_text(table + "\n")
    write_json(output_dir / "frontier.json", {"method": args.method, "objective": args.objective,
                                             "kl_estimator": args.kl_estimator, "kl_budget": args.kl_budget,
                                             "chosen_beta": best["beta"], "within_budget": within_budget, "runs": rows})
    points = [{"beta": r["beta"], "kl": r[args.kl_estimator], args.objective: r[args.objective]}
              for r in rows if r[args.objective] is not None]
    kl_frontier(points, args.objective, output_dir / "frontier.png", args.kl_budget, chosen=best["beta"])
    write_resolved_config(output_dir, args)
    print(table)
    print(f"[tune_kl] chosen beta {best['beta']:g} -> {chosen_path}")
    return {"rows": rows, "chosen": best, "within_budget": within_budget}


def frontier_table(rows: list[dict], best: dict) -> str:
    keys = ["beta", "kl_k1", "kl_k3", "rm_score", "safety_score", "mc_acc", "gen_acc", "preference_accuracy"]
    lines = ["| " + " | ".join(keys) + " | chosen |", "|" + "---|" * (len(keys) + 1)]
    for row in rows:
        cells = ["-" if row[k] is None else f"{row[k]:.4g}" for k in keys]
        lines.append("| " + " | ".join(cells) + f" | {'yes' if row is best else ''} |")
    return "\n".join(lines)


def make_parser() -> Parser:
    return Parser([TuneKLArgs])


if __name__ == "__main__":
    run(main, make_parser())
