"""Train the reward model on preference pairs scored for factuality and safety.

    accelerate launch --config_file configs/accelerate/cpu.yaml reward/train.py --config configs/reward/smollm2_rm.yaml
    accelerate launch reward/train.py --config configs/reward/llama2-7b_rm.yaml
    python reward/train.py --config configs/reward/tiny.yaml
    accelerate launch reward/train.py --config configs/reward/llama2-7b_rm.yaml --resume_from_checkpoint true   # after a kill: the newest checkpoint

TRL's RewardTrainer (Bradley-Terry: -log sigmoid(r_chosen - r_rejected - margin), plus reward
centering) on a one-logit classification head over the base model, optionally with an SFT stage
adapter merged in first. LoRA trains the backbone; the `score` head is trained in full and saved
with the adapter (`modules_to_save`). The `margin` column of reward/pairs.py output is used.
Held-out pairwise accuracy, overall and per axis (factuality, safety), each with its Wilson 95%
interval, goes to metrics.json: on the
`eval_pairs` file (pairs on the questions every stage holds out) and the `eval_fraction` split of `pairs`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

from datasets import Dataset
from transformers import set_seed
from trl import RewardConfig, get_peft_config

from clinalign.adapters import write_adapter_provenance
from clinalign.config import ModelArgs, Parser, run, write_resolved_config
from clinalign.errors import ConfigError
from clinalign.json_io import write_json
from clinalign.model_card import write_model_card
from clinalign.models import ensure_pad_token, load_tokenizer, model_init_kwargs, quantize_after_lora
from clinalign.preferences import read_pairs, split_pairs
from clinalign.resume import RunIdentity, resume_checkpoint
from clinalign.rewards import LengthGroupedRewardTrainer, restore_score_dtype, reward_backbone, score_responses
from clinalign.stats import fmt, proportion
from clinalign.tracking import log_measurements


@dataclasses.dataclass
class RewardScriptArgs:
    pairs: str = dataclasses.field(
        default="runs/demo/pairs/pairs.jsonl",
        metadata={"help": "Preference pairs: reward/pairs.py output, a data file or folder, or a hub dataset id "
                          "(TRL's standard or conversational format, explicit or implicit prompt)."},
    )
    pairs_config: str | None = dataclasses.field(default=None, metadata={"help": "Hub dataset config of `pairs`."})
    pairs_split: str = dataclasses.field(default="train", metadata={"help": "Split of `pairs` (hub id or folder)."})
    sft_adapter: str | None = dataclasses.field(
        default=None, metadata={"help": "An SFT stage adapter merged into the backbone before reward training."}
    )
    eval_pairs: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Pairs on questions no stage trains on (reward/pairs.py's heldout.jsonl), scored after training."},
    )
    eval_fraction: float = dataclasses.field(
        default=0.2, metadata={"help": "Share of `pairs` (by question) held out of training and scored with eval_pairs."}
    )
    reasoning_effort: str = dataclasses.field(
        default="low",
        metadata={"help": "Harmony reasoning effort of the prompts (GPT-OSS): the SFT stages' setting.",
                  "choices": ["low", "medium", "high"]},
    )  # fmt: skip
    lora_top_layers: int | None = dataclasses.field(
        default=None,
        metadata={"help": "The reward LoRA on the last N decoder layers only (PEFT's layers_to_transform); null: all. "
                          "The backward pass stops below them."},
    )  # fmt: skip


def top_layers(model, n: int | None) -> list[int] | None:
    """Indices of the last `n` decoder layers of `model` (None: all layers)."""
    if n is None:
        return None
    depth = model.config.num_hidden_layers
    if not 1 <= n <= depth:
        raise ConfigError(f"lora_top_layers must be between 1 and the model's {depth} layers, got {n}")
    return list(range(depth - n, depth))


def pairwise_accuracy(model, tokenizer, rows: list[dict], reasoning_effort: str = "low") -> dict:
    """Share of held-out pairs where the chosen response out-scores the rejected one, overall and per axis."""
    prompts = [row["prompt"] for row in rows]
    score = dict(reasoning_effort=reasoning_effort)
    # The completion turns as trained on (TRL's conversational format), not only the last turn's text.
    chosen = score_responses(model, tokenizer, prompts, [row["chosen"] for row in rows], **score)
    rejected = score_responses(model, tokenizer, prompts, [row["rejected"] for row in rows], **score)
    by_axis = defaultdict(list)
    for row, c, r in zip(rows, chosen, rejected, strict=True):
        by_axis["overall"].append(c > r)
        by_axis[row.get("axis", "unknown")].append(c > r)
    # Each axis with its Wilson 95% interval: {"accuracy", "low", "high", "n"}.
    return {axis: _accuracy(proportion(hits)) for axis, hits in sorted(by_axis.items())}


def _accuracy(interval) -> dict:
    return {"accuracy": interval.value, "low": interval.low, "high": interval.high, "n": interval.n}


def reward_dataset(rows: list[dict], reasoning_effort: str = "low") -> Dataset:
    """TRL's conversational preference format (prompt, chosen, rejected, margin) for the RewardTrainer.

    Each row carries `chat_template_kwargs` {"reasoning_effort"}: TRL renders it into a harmony
    template's system message (GPT-OSS, as SFT trained it; the template's default is "medium"); other
    templates ignore it. `clinalign.rewards.score_responses` renders with the same setting.
    """
    columns = ("prompt", "chosen", "rejected", "margin")
    template_kwargs = {"reasoning_effort": reasoning_effort}
    return Dataset.from_list(
        [{**{k: row[k] for k in columns if k in row}, "chat_template_kwargs": template_kwargs} for row in rows]
    )


def main(script_args: RewardScriptArgs, training_args: RewardConfig, model_args: ModelArgs):
    if not model_args.use_peft:
        raise ConfigError("reward/train.py trains a LoRA reward model: set use_peft: true")
    checkpoint = resume_checkpoint(training_args, "reward", model_args.model_name_or_path)
    rows = read_pairs(script_args.pairs, script_args.pairs_config, script_args.pairs_split)
    train_rows, eval_rows = split_pairs(rows, script_args.eval_fraction)
    if script_args.eval_pairs:
        eval_rows += read_pairs(script_args.eval_pairs)
    train_dataset = reward_dataset(train_rows, script_args.reasoning_effort)

    load = model_init_kwargs(model_args)  # dtype and 4-bit settings, as every training stage loads its base
    # Seed before the score head and the LoRA exist: both are initialised before the Trainer seeds,
    # so two identical runs used to train different reward models.
    set_seed(training_args.seed)
    quantization = load.get("quantization_config")
    model = reward_backbone(
        model_args.model_name_or_path, script_args.sft_adapter, dtype=load["dtype"], quantization_config=quantization
    )
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    ensure_pad_token(tokenizer, model)
    # The head is new: it must be trained in full and saved with the adapter, or it is re-initialised on load.
    peft_config = get_peft_config(dataclasses.replace(model_args, lora_task_type="SEQ_CLS"))
    peft_config.modules_to_save = sorted(set(peft_config.modules_to_save or []) | {"score"})
    peft_config.layers_to_transform = top_layers(model, script_args.lora_top_layers)

    trainer = LengthGroupedRewardTrainer(
        model=model, args=training_args, train_dataset=train_dataset, processing_class=tokenizer, peft_config=peft_config
    )
    quantize_after_lora(trainer.model, model_args)  # GPT-OSS 4-bit: experts, now that the LoRA is attached
    restore_score_dtype(trainer.model, load["dtype"])  # TRL made it bf16 for a 4-bit model
    trainer.add_callback(RunIdentity("reward", model_args.model_name_or_path))
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(training_args.output_dir)

    metrics = {"pairs": {"train": len(train_rows), "eval": len(eval_rows)}, "resumed_from": checkpoint,
               "train": trainer.state.log_history}
    # Every process scores all held-out pairs (the same result on each): under ZeRO-3 every rank must
    # take part in each forward pass, or the ranks holding the other parameter shards hang.
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()
    effort = script_args.reasoning_effort
    metrics["eval"] = pairwise_accuracy(model, tokenizer, eval_rows, effort) if eval_rows else {}
    log_measurements(trainer, {"pair_accuracy": metrics["eval"]}, "reward")  # to report_to's trackers
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(training_args.output_dir)
        write_adapter_provenance(
            training_args.output_dir, model_args.model_name_or_path, model, merged_adapter=script_args.sft_adapter,
            quantization=quantization.to_dict() if quantization else None,
        )
        write_json(Path(training_args.output_dir) / "metrics.json", metrics)
        write_resolved_config(training_args.output_dir, script_args, training_args, model_args)
        write_model_card(training_args.output_dir)  # replaces PEFT's placeholder README.md
        for axis, result in metrics["eval"].items():
            print(f"[reward] held-out pairwise accuracy {axis}: {fmt(result['accuracy'], result['low'], result['high'], result['n'], 3)}")
    return metrics


def make_parser() -> Parser:
    return Parser([RewardScriptArgs, RewardConfig, ModelArgs])


if __name__ == "__main__":
    run(main, make_parser(), upstream_patches=True)
