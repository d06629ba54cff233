"""The DPO training path, shared by rl/dpo.py and rl/tune_kl.py.

DPO against the SFT reference: the policy is base + the final SFT stage adapter (trainable); TRL's
DPOTrainer, given a PeftModel that already carries an adapter, keeps a frozen copy of it as the
"ref" adapter, so the reference is exactly the SFT policy and no second model is loaded. `beta` is
the coefficient of the reverse-KL term of the objective DPO solves in closed form: larger beta keeps
the policy closer to the reference.
"""

from __future__ import annotations

import dataclasses

from datasets import Dataset
from transformers import set_seed
from trl import DPOConfig, DPOTrainer

from clinalign.compat import score_only_labelled_positions
from clinalign.config import eval_fraction_field
from clinalign.models import (
    ensure_pad_token,
    load_tokenizer,
    load_trainable_policy,
    quantize_after_lora,
)
from clinalign.preferences import read_pairs, split_pairs
from clinalign.sampling import PairLengthGrouping


class LengthGroupedDPOTrainer(PairLengthGrouping, DPOTrainer):
    """TRL's DPOTrainer; with `train_sampling_strategy: group_by_length`, pairs of similar length share a batch."""


@dataclasses.dataclass
class DPOArgs:
    pairs: str = dataclasses.field(
        default="runs/demo/pairs/pairs.jsonl",
        metadata={"help": "Preference pairs: reward/pairs.py output, a data file or folder, or a hub dataset id "
                          "(TRL's standard or conversational format, explicit or implicit prompt)."},
    )
    pairs_config: str | None = dataclasses.field(default=None, metadata={"help": "Hub dataset config of `pairs`."})
    pairs_split: str = dataclasses.field(default="train", metadata={"help": "Split of `pairs` (hub id or folder)."})
    pairs_eval_fraction: float = dataclasses.field(
        default=0.2, metadata={"help": "Share of pairs (by question) held out of training for preference accuracy."}
    )
    pairs_eval_max: int | None = dataclasses.field(
        default=None, metadata={"help": "At most this many held-out pairs for preference accuracy (null: all)."}
    )
    sft_adapter: str | None = dataclasses.field(
        default=None, metadata={"help": "The final SFT stage adapter: the policy starts from it and it is the reference."}
    )
    eval_data: list[str] = dataclasses.field(
        default_factory=list, metadata={"help": "Question files; their held-out records measure accuracy and KL."}
    )
    safety_prompts: str | None = dataclasses.field(
        default="clinalign/sample_data/safety_prompts.jsonl", metadata={"help": "Safety prompt set (held-out part used)."}
    )
    eval_fraction: float = eval_fraction_field()
    eval_max_records: int = dataclasses.field(default=24, metadata={"help": "At most this many held-out questions."})
    eval_max_safety_prompts: int | None = dataclasses.field(
        default=None, metadata={"help": "At most this many held-out safety prompts (null: all)."}
    )
    eval_max_new_tokens: int = dataclasses.field(default=64, metadata={"help": "Greedy tokens per eval response."})
    kl_max_new_tokens: int = dataclasses.field(default=48, metadata={"help": "Sampled tokens per KL response."})
    kl_num_samples: int = dataclasses.field(default=2, metadata={"help": "Sampled responses per KL prompt."})
    reward_model: str | None = dataclasses.field(
        default=None, metadata={"help": "Reward model folder: adds its mean score on held-out responses."}
    )
    reasoning_effort: str = dataclasses.field(
        default="low",
        metadata={"help": "Harmony reasoning effort of the prompts (GPT-OSS): the SFT stages' setting.",
                  "choices": ["low", "medium", "high"]},
    )  # fmt: skip


def dpo_pairs(dpo_args: DPOArgs) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs of `dpo_args.pairs`, split by question; at most `pairs_eval_max` held out."""
    train_rows, eval_rows = split_pairs(read_pairs(dpo_args.pairs, dpo_args.pairs_config, dpo_args.pairs_split), dpo_args.pairs_eval_fraction)
    return train_rows, eval_rows[: dpo_args.pairs_eval_max]


def preference_dataset(rows: list[dict], reasoning_effort: str = "low") -> Dataset:
    """TRL's conversational preference format: prompt messages, chosen / rejected assistant turns.

    Each row carries `chat_template_kwargs` {"reasoning_effort"}: TRL renders it into a harmony
    template's system message (GPT-OSS, as SFT trained it; the template's own default is "medium");
    other chat templates ignore it.
    """
    template_kwargs = {"reasoning_effort": reasoning_effort}
    columns = ("prompt", "chosen", "rejected")
    return Dataset.from_list(
        [{**{k: row[k] for k in columns}, "chat_template_kwargs": template_kwargs} for row in rows]
    )


def build_dpo_trainer(dpo_args: DPOArgs, training_args: DPOConfig, model_args, train_rows, eval_rows) -> DPOTrainer:
    # With the SFT adapter, TRL trains it and keeps a frozen copy as the "ref" adapter (the reference);
    # without one, a fresh LoRA whose copy (B = 0) is the base model.
    score_only_labelled_positions()
    set_seed(training_args.seed)  # a fresh LoRA is initialised here, before the Trainer would seed
    policy = load_trainable_policy(model_args, dpo_args.sft_adapter, training_args.gradient_checkpointing)
    tokenizer = load_tokenizer(dpo_args.sft_adapter or model_args.model_name_or_path)
    ensure_pad_token(tokenizer, policy)
    trainer = LengthGroupedDPOTrainer(
        model=policy,
        ref_model=None,
        args=training_args,
        train_dataset=preference_dataset(train_rows, dpo_args.reasoning_effort),
        eval_dataset=preference_dataset(eval_rows, dpo_args.reasoning_effort) if eval_rows else None,
        processing_class=tokenizer,
    )
    quantize_after_lora(trainer.model, model_args)  # GPT-OSS 4-bit: experts, once both adapters exist
    return trainer
