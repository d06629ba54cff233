"""Online RL with PPO's clipped surrogate on TRL's RLOOTrainer (shared by rl/ppo.py and rl/tune_kl.py).

TRL 1.16 has no PPOTrainer (removed in 2026, PR #7020). The policy is optimised with PPO's clipped
surrogate objective through RLOOTrainer: for each prompt it samples a group of completions and uses
the leave-one-out group mean as the baseline in place of a value network; each generated batch is
reused for `num_iterations` > 1 optimisation passes, so the importance ratio moves away from 1 and
the clipping at 1 +- `epsilon` is active. The reward is a weighted sum of the reward model's score,
the rule-based factuality score (when the prompt has a gold answer) and the safety score; `beta` is
the KL coefficient against the reference (the SFT policy: TRL keeps a frozen copy of the SFT adapter
as the "ref" adapter), applied as a per-sequence penalty on the reward, and an adaptive KL
controller (clinalign.kl_control, Ziegler et al. 2019) retunes `beta` toward a target KL.
"""

from __future__ import annotations

import dataclasses
import json

from datasets import Dataset
from transformers import set_seed
from trl import RLOOConfig, RLOOTrainer

from clinalign import tasks
from clinalign.compat import score_only_labelled_positions
from clinalign.config import eval_fraction_field
from clinalign.errors import ConfigError
from clinalign.kl_control import AdaptiveKLController, KLControlCallback
from clinalign.models import (
    ensure_pad_token,
    load_tokenizer,
    load_trainable_policy,
    quantize_after_lora,
)
from clinalign.records import Record
from clinalign.resume import RunIdentity
from clinalign.rewards import RewardModelReward, factuality_reward, load_reward_model, safety_reward


@dataclasses.dataclass
class PPOArgs:
    data: list[str] = dataclasses.field(
        default_factory=list, metadata={"help": "Question files or hub ids (any converter input) for RL prompts."}
    )
    safety_prompts: str | None = dataclasses.field(
        default="clinalign/sample_data/safety_prompts.jsonl", metadata={"help": "Safety prompt set (JSONL); none: null."}
    )
    eval_fraction: float = eval_fraction_field()
    max_prompts: int = dataclasses.field(default=64, metadata={"help": "At most this many training prompts."})
    sft_adapter: str | None = dataclasses.field(
        default=None, metadata={"help": "The final SFT stage adapter: the policy starts from it and it is the reference."}
    )
    reward_model: str | None = dataclasses.field(default=None, metadata={"help": "Reward model folder (reward/train.py)."})
    reward_model_weight: float = dataclasses.field(default=1.0, metadata={"help": "Weight of the reward model score."})
    factuality_weight: float = dataclasses.field(default=1.0, metadata={"help": "Weight of the factuality score."})
    safety_weight: float = dataclasses.field(default=1.0, metadata={"help": "Weight of the safety score."})
    kl_target: float | None = dataclasses.field(
        default=None, metadata={"help": "Target KL per sequence (nats) for the adaptive controller; null: fixed beta."}
    )
    kl_horizon: float = dataclasses.field(default=10000.0, metadata={"help": "Controller horizon, in sequences."})
    reasoning_effort: str = dataclasses.field(
        default="low",
        metadata={"help": "GPT-OSS: the harmony reasoning effort SFT trained with (prompts, reward model).",
                  "choices": ["low", "medium", "high"]},
    )


def rl_prompts(records: list[Record], safety_prompts: list, eval_fraction: float, limit: int) -> Dataset:
    """Training prompts (held-out ones excluded), interleaved questions and safety prompts."""
    trained_records = tasks.split([r for r in records if r.answer is not None], eval_fraction)[0]
    questions = [{"prompt": tasks.task_of(r).messages(r), "record": json.dumps(r.to_dict())} for r in trained_records]
    safety = [{"prompt": tasks.TASKS["safety"].messages(p), "record": ""} for p in tasks.split(safety_prompts, eval_fraction)[0]]
    mixed = [row for pair in zip(questions, safety) for row in pair]
    mixed += questions[len(safety) :] + safety[len(questions) :]
    if not mixed:
        raise ConfigError("no RL prompts: give data files and/or safety_prompts")
    return Dataset.from_list(mixed[:limit])


def build_ppo_trainer(ppo_args: PPOArgs, training_args: RLOOConfig, model_args, prompts: Dataset):
    """The RLOO trainer with PPO clipping, the reward functions and the KL controller attached."""
    if training_args.num_iterations < 2:
        raise ConfigError("num_iterations must be >= 2 so each batch gets several passes and PPO clipping acts")
    if training_args.restore_callback_states_from_checkpoint:
        # transformers would rebuild the callbacks without the trainer they act on; the KL controller
        # restores its coefficient itself on resume.
        raise ConfigError("restore_callback_states_from_checkpoint: leave it false; the KL controller restores itself")
    if training_args.beta <= 0:
        raise ConfigError("beta (the KL coefficient) must be > 0: the reference is what keeps the policy sane")
    score_only_labelled_positions()
    reward_funcs, weights = [], []
    if ppo_args.reward_model and ppo_args.reward_model_weight:
        model, tokenizer = load_reward_model(ppo_args.reward_model)
        reward_funcs.append(RewardModelReward(model, tokenizer, reasoning_effort=ppo_args.reasoning_effort))
        weights.append(ppo_args.reward_model_weight)
    if ppo_args.factuality_weight:
        reward_funcs.append(factuality_reward)
        weights.append(ppo_args.factuality_weight)
    if ppo_args.safety_weight:
        reward_funcs.append(safety_reward)
        weights.append(ppo_args.safety_weight)
    if not reward_funcs:
        raise ConfigError("every reward weight is zero and no reward model is set: nothing to optimise")
    training_args.reward_weights = weights
    # RLOO renders prompts with the chat template: on GPT-OSS, with the reasoning effort SFT used.
    training_args.chat_template_kwargs = {"reasoning_effort": ppo_args.reasoning_effort,
                                          **(training_args.chat_template_kwargs or {})}

    # With the SFT adapter, RLOO trains it and keeps a frozen copy as the "ref" adapter (the reference).
    set_seed(training_args.seed)  # a fresh LoRA is initialised here, before the Trainer would seed
    policy = load_trainable_policy(model_args, ppo_args.sft_adapter, training_args.gradient_checkpointing)
    tokenizer = load_tokenizer(ppo_args.sft_adapter or model_args.model_name_or_path)
    ensure_pad_token(tokenizer, policy)
    tokenizer.padding_side = "left"  # generation
    trainer = RLOOTrainer(
        model=policy,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=prompts,
        processing_class=tokenizer,
    )
    quantize_after_lora(trainer.model, model_args)  # GPT-OSS 4-bit: experts, once both adapters exist
    controller = None
    if ppo_args.kl_target is not None:
        controller = AdaptiveKLController(training_args.beta, ppo_args.kl_target, ppo_args.kl_horizon)
    # generation_batch_size: the sequences of one generated batch, over all processes
    kl_callback = KLControlCallback(trainer, controller, training_args.generation_batch_size)
    trainer.add_callback(kl_callback)
    trainer.add_callback(RunIdentity("ppo", model_args.model_name_or_path))
    return trainer, kl_callback
