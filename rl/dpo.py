"""DPO against the SFT reference, with the KL coefficient `beta` (tune it with rl/tune_kl.py).

    accelerate launch --config_file configs/accelerate/cpu.yaml rl/dpo.py --config configs/rl/smollm2_dpo.yaml
    accelerate launch rl/dpo.py --config configs/rl/llama2-7b_dpo.yaml
    python rl/dpo.py --config configs/rl/tiny_dpo.yaml --beta 0.3
    accelerate launch rl/dpo.py --config configs/rl/llama2-7b_dpo.yaml --resume_from_checkpoint true   # after a kill: the newest checkpoint

TRL's DPOTrainer on preference pairs: reward/pairs.py output, or any file, folder or hub dataset id
(`pairs_config`, `pairs_split`) in TRL's standard or conversational format, explicit or implicit prompt. The policy starts from the final SFT stage adapter; the reference is that same
SFT policy, frozen (TRL keeps a copy of the adapter as "ref": no second model). TRL logs
rewards/chosen, rewards/rejected, rewards/margins and rewards/accuracies. Before and after training
the script measures the policy on held-out data (clinalign.policy_eval): safety score on the safety
prompt set, multiple-choice accuracy, reward-model score, and KL(policy || reference) per sequence
on sampled responses (k1 and k3 estimators).
"""

from __future__ import annotations

from pathlib import Path

from trl import DPOConfig

from clinalign import tasks
from clinalign.adapters import write_adapter_provenance
from clinalign.config import ModelArgs, Parser, run, write_resolved_config
from clinalign.data import load_records
from clinalign.dpo import DPOArgs, build_dpo_trainer, dpo_pairs
from clinalign.errors import ClinalignError
from clinalign.eval_report import comparison
from clinalign.json_io import write_json
from clinalign.model_card import write_model_card
from clinalign.policy_eval import evaluate_policy
from clinalign.resume import RunIdentity, resume_checkpoint
from clinalign.rewards import load_reward_model
from clinalign.stats import fmt
from clinalign.tasks import load_safety_prompts
from clinalign.tracking import log_measurements


def main(dpo_args: DPOArgs, training_args: DPOConfig, model_args: ModelArgs):
    checkpoint = resume_checkpoint(training_args, "dpo", model_args.model_name_or_path)
    train_rows, eval_rows = dpo_pairs(dpo_args)
    records = tasks.split([r for f in dpo_args.eval_data for r in load_records(f).records], dpo_args.eval_fraction)[1]
    records = [r for r in records if r.answer is not None][: dpo_args.eval_max_records]
    safety = tasks.split(load_safety_prompts(dpo_args.safety_prompts), dpo_args.eval_fraction)[1] if dpo_args.safety_prompts else []
    safety = safety[: dpo_args.eval_max_safety_prompts]
    reward = load_reward_model(dpo_args.reward_model) if dpo_args.reward_model else None

    if not records and not safety:
        raise ClinalignError("no held-out data to measure the policy on: set eval_data and/or safety_prompts")
    trainer = build_dpo_trainer(dpo_args, training_args, model_args, train_rows, eval_rows)
    trainer.add_callback(RunIdentity("dpo", model_args.model_name_or_path))
    tokenizer = trainer.processing_class
    measure = dict(
        records=records, safety_prompts=safety, reward=reward, max_new_tokens=dpo_args.eval_max_new_tokens,
        kl_max_new_tokens=dpo_args.kl_max_new_tokens, kl_num_samples=dpo_args.kl_num_samples,
        reasoning_effort=dpo_args.reasoning_effort, batch_size=training_args.per_device_eval_batch_size,
    )
    before = evaluate_policy(trainer.model, tokenizer, kl=False, **measure)  # the policy is the reference: KL = 0
    # No preference eval before training: the policy is then the reference, so every implicit reward is 0.
    trainer.train(resume_from_checkpoint=checkpoint)
    after_pairs = trainer.evaluate() if eval_rows else {}
    # Training wrapped forward in the accelerator's autocast; measure "after" in the precision "before" used.
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    # KL to the reference DPO trained against: TRL's frozen copy of the SFT adapter ("ref"), no second model.
    after = evaluate_policy(trainer.model, tokenizer, reference="ref", **measure)
    trainer.save_model(training_args.output_dir)
    # Beside the loss in every report_to tracker (eval/dpo/...), at the last step.
    log_measurements(trainer, {"before": before, "after": after}, "dpo")

    metrics = {
        "beta": training_args.beta,
        "resumed_from": checkpoint,
        "pairs": {"train": len(train_rows), "eval": len(eval_rows)},
        "preference_eval": after_pairs,
        "held_out": {"before": before, "after": after},
        # After vs before on the same held-out items: paired tests and a verdict per metric.
        "comparison": {"baseline": "before", "metrics": comparison(after, before)},
        "log_history": trainer.state.log_history,
    }
    if trainer.accelerator.is_main_process:
        output_dir = Path(training_args.output_dir)
        write_adapter_provenance(output_dir, model_args.model_name_or_path, trainer.model)
        write_json(output_dir / "metrics.json", metrics)
        write_resolved_config(output_dir, dpo_args, training_args, model_args)
        write_model_card(output_dir)  # replaces PEFT's and TRL's template README.md
        safety_before = before.get("safety", {}).get("safety_score")
        safety_after = after.get("safety", {}).get("safety_score")
        print(f"[dpo] beta {training_args.beta}: held-out safety {safety_before} -> {safety_after}, "
              f"KL/seq (k1, k3) {after['overall'].get('kl_k1')}, {after['overall'].get('kl_k3')}, "
              f"held-out preference accuracy {after_pairs.get('eval_rewards/accuracies')}")
        for metric, c in metrics["comparison"]["metrics"].items():
            print(f"[dpo] {metric}: after - before {fmt(c['difference'], c['low'], c['high'], c['n'], 3)}, "
                  f"p {c['p']:.3g}: {c['verdict']}")
    return metrics


def make_parser() -> Parser:
    return Parser([DPOArgs, DPOConfig, ModelArgs])


if __name__ == "__main__":
    run(main, make_parser(), upstream_patches=True)
