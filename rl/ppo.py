"""Online RL (PPO-clip) against the SFT reference, rewarded by the reward model and the rule checks.

    accelerate launch --config_file configs/accelerate/cpu.yaml rl/ppo.py --config configs/rl/smollm2_ppo.yaml
    accelerate launch rl/ppo.py --config configs/rl/llama2-7b_ppo.yaml
    python rl/ppo.py --config configs/rl/tiny_ppo.yaml
    accelerate launch rl/ppo.py --config configs/rl/llama2-7b_ppo.yaml --resume_from_checkpoint true   # after a kill: the newest checkpoint

TRL 1.16 has no PPOTrainer. This script runs PPO's clipped surrogate objective through TRL's
maintained RLOOTrainer: sampled groups of completions per prompt, the leave-one-out group baseline
in place of a value network, and `num_iterations` > 1 optimisation passes per generated batch so
the ratio clipping (1 +- epsilon) is active. Rewards: the reward model's score, the rule-based
factuality score (prompts with a gold answer) and the safety score, weighted by the config and
logged separately (rewards/<name>/mean). KL: `beta` against the reference, the SFT policy (a frozen
copy of the SFT adapter), as a per-sequence penalty on the reward; with `kl_target` set, an adaptive
KL controller (Ziegler et al. 2019, clinalign/kl_control.py) retunes beta each step, else beta is
fixed. Logged per step: reward (total and per component), kl, kl_per_sequence, kl_coef, entropy,
clip ratios, completion length; training_curves.png plots reward and KL over steps.
"""

from __future__ import annotations

from pathlib import Path

from trl import RLOOConfig

from clinalign.adapters import write_adapter_provenance
from clinalign.config import ModelArgs, Parser, run, write_resolved_config
from clinalign.data import load_records
from clinalign.json_io import write_json
from clinalign.model_card import write_model_card
from clinalign.plots import training_curves
from clinalign.ppo import PPOArgs, build_ppo_trainer, rl_prompts
from clinalign.resume import resume_checkpoint
from clinalign.tasks import load_safety_prompts

CURVES = ["reward", "rewards/reward_model/mean", "rewards/factuality_reward/mean", "rewards/safety_reward/mean",
          "kl_per_sequence", "kl_coef", "entropy", "clip_ratio/region_mean", "completions/mean_length"]


def main(ppo_args: PPOArgs, training_args: RLOOConfig, model_args: ModelArgs):
    checkpoint = resume_checkpoint(training_args, "ppo", model_args.model_name_or_path)
    records = [r for source in ppo_args.data for r in load_records(source).records]
    safety = load_safety_prompts(ppo_args.safety_prompts) if ppo_args.safety_prompts else []
    prompts = rl_prompts(records, safety, ppo_args.eval_fraction, ppo_args.max_prompts)
    trainer, kl_callback = build_ppo_trainer(ppo_args, training_args, model_args, prompts)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(training_args.output_dir)

    if trainer.accelerator.is_main_process:
        output_dir = Path(training_args.output_dir)
        history = trainer.state.log_history
        metrics = {
            "prompts": len(prompts),
            "resumed_from": checkpoint,
            "final_kl_coef": trainer.beta,
            "kl_controller": kl_callback.history,
            "last_log": next((e for e in reversed(history) if "reward" in e), {}),
            "log_history": history,
        }
        write_json(output_dir / "metrics.json", metrics)
        write_resolved_config(output_dir, ppo_args, training_args, model_args)
        write_adapter_provenance(output_dir, model_args.model_name_or_path, trainer.model)
        write_model_card(output_dir)  # replaces PEFT's and TRL's template README.md
        training_curves(history, CURVES, output_dir / "training_curves.png", "PPO-clip (RLOO) on the SFT policy")
        last = metrics["last_log"]
        print(f"[ppo] steps {trainer.state.global_step}: reward {last.get('reward')}, "
              f"KL/seq {last.get('kl_per_sequence')}, beta {trainer.beta:.4g} -> {output_dir}")
    return trainer


def make_parser() -> Parser:
    return Parser([PPOArgs, RLOOConfig, ModelArgs])


if __name__ == "__main__":
    run(main, make_parser(), upstream_patches=True)
