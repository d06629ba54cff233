"""The staged-SFT training path, shared by `sft/run.py` and `benchmarks/sft_throughput.py`.

A curriculum is a list of stages (default PubMedQA -> MedMCQA -> MedQA). Each stage continues the
previous stage's LoRA adapter on its own data and saves its own adapter. What lives here:

- `Stage`: one curriculum entry, validated strictly (a typo in a stage key names the key);
- `stage_examples`: records -> a TRL dataset in the one prompt format (conversational
  prompt/completion, or pre-tokenized harmony examples for GPT-OSS);
- `PlainLossSFTTrainer`: TRL's SFTTrainer with the model's own loss (see its docstring for why);
- the stage folder protocol: an adapter folder appears (atomic rename) only once fully written.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTTrainer

from clinalign.compat import model_own_loss, require
from clinalign.errors import ConfigError
from clinalign.prompts import to_chat_example
from clinalign.records import Record
from clinalign.run_dir import remove_inside, safe_name
from clinalign.sampling import BucketedLengthSampler

COMPLETE_MARKER = "COMPLETE"


@dataclasses.dataclass
class Stage:
    """One curriculum stage: its data and its length (steps or epochs)."""

    name: str
    data: str  # a local file or a hub id, read by clinalign.data.load_records
    dataset: str = "auto"  # converter family: auto, pubmedqa, medmcqa, medqa
    max_steps: int = -1  # > 0 wins over num_train_epochs, as in TrainingArguments
    num_train_epochs: float = 1.0
    eval_data: str | None = None  # held-out file; default: a deterministic eval_fraction of `data`
    learning_rate: float | None = None  # default: the config's learning_rate
    hub_config: str | None = None  # hub dataset config name (e.g. pqa_labeled)
    split: str | None = None  # hub split (default: train)

    @classmethod
    def parse(cls, index: int, raw: Any) -> Stage:
        where = f"curriculum[{index}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a mapping with at least name and data, got {raw!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"unknown key '{unknown[0]}' in {where} (valid: {', '.join(sorted(names))})")
        missing = [k for k in ("name", "data") if k not in raw]
        if missing:
            raise ConfigError(f"{where} needs '{missing[0]}'")
        stage = cls(**raw)
        safe_name(stage.name, f"{where} name")
        if not isinstance(stage.max_steps, int) or isinstance(stage.max_steps, bool) or not isinstance(
            stage.num_train_epochs, (int, float)
        ):
            raise ConfigError(f"{where}: max_steps must be an int and num_train_epochs a number")
        # 0 or negative would train nothing (or one step) yet publish an adapter marked COMPLETE.
        if stage.max_steps != -1 and stage.max_steps < 1:
            raise ConfigError(f"{where}: max_steps must be -1 (use epochs) or at least 1, got {stage.max_steps}")
        if stage.max_steps == -1 and not stage.num_train_epochs > 0:
            raise ConfigError(f"{where}: num_train_epochs must be above 0, got {stage.num_train_epochs}")
        return stage


def parse_curriculum(raw: list[Any], selected: list[str] | None) -> list[tuple[int, Stage]]:
    """Validate the curriculum and pick the stages to run, as (1-based position, Stage) pairs."""
    if not isinstance(raw, list):
        raise ConfigError(f"curriculum must be a list of stages (name, data), got {type(raw).__name__}")
    if not raw:
        raise ConfigError("curriculum is empty: list at least one stage (name, data)")
    stages = [Stage.parse(i, s) for i, s in enumerate(raw)]
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"curriculum stage names must be unique, got {names}")
    if selected:
        unknown = [n for n in selected if n not in names]
        if unknown:
            raise ConfigError(f"--stages names unknown stage '{unknown[0]}' (curriculum: {', '.join(names)})")
    return [(k, s) for k, s in enumerate(stages, start=1) if not selected or s.name in selected]


def stage_dir(output_dir: str | Path, position: int, stage: Stage) -> Path:
    return Path(output_dir) / "stages" / f"{position}-{stage.name}"


def checkpoint_dir(output_dir: str | Path, position: int, stage: Stage) -> Path:
    return Path(output_dir) / "checkpoints" / f"{position}-{stage.name}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def publish_stage(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written stage folder into place, then mark it complete.

    The rename is atomic, so `final_dir` either does not exist or holds the whole adapter; the marker
    is written last, so a folder without it (a crash between the two) is redone on resume.
    """
    remove_inside(final_dir, Path(tmp_dir).parent) if Path(final_dir).exists() else None
    os.replace(tmp_dir, final_dir)
    (final_dir / COMPLETE_MARKER).write_text("adapter, tokenizer, metrics and config fully written\n")


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest `checkpoint-N` that was fully written, removing any a kill left half-written.

    The Trainer writes a checkpoint's trainer_state.json last; a folder without a readable one was
    interrupted (resuming from it would fail on a missing optimizer or RNG file).
    """
    if not folder.is_dir():
        return None
    checkpoints = sorted(
        (p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for checkpoint in checkpoints:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
            return str(checkpoint)
        except (OSError, ValueError):
            remove_inside(checkpoint, folder)
    return None


def restore_finished_checkpoint(trainer, checkpoint: str | None) -> bool:
    """Where `checkpoint` is a finished run (its global step reached its max_steps: a kill came after
    training, during the stage's eval or publishing), load its adapter weights and trainer state instead
    of training: resuming it with `Trainer.train` would run one step past max_steps. True if restored."""
    if checkpoint is None:
        return False
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    if not state.max_steps or state.global_step < state.max_steps:
        return False
    set_peft_model_state_dict(trainer.model, load_peft_weights(checkpoint, device=str(trainer.args.device)))
    trainer.state = state
    return True


def stage_examples(records: list[Record], chat_format: str, reasoning_effort: str = "low") -> Dataset:
    """Records -> SFT examples in the one prompt format.

    `chat`: TRL's conversational prompt/completion (SFTTrainer renders it with the model's chat
    template and trains on the completion only). `harmony`: pre-tokenized GPT-OSS examples from
    openai-harmony (`input_ids` + `completion_mask`), which SFTTrainer uses as they are.
    """
    labeled = [r for r in records if r.answer is not None]
    if chat_format == "harmony":
        from harmony.render import render_for_training

        return Dataset.from_list([render_for_training(r, reasoning_effort=reasoning_effort) for r in labeled])
    return Dataset.from_list([to_chat_example(r) for r in labeled])


class PlainLossSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is the model's own cross-entropy, with logits only where labels are.

    TRL 1.16 replaces the LM head with a chunked "fused" head that also returns per-token entropy
    and top-1 hits for its `entropy` / `mean_token_accuracy` metrics. On a CPU that head scores every
    position of the batch. Here the model's own forward and loss run instead (TRL's patched forward
    passes straight through without `fused_lm_head=True`), and the LM head projects only the
    positions whose next token is a label (`logits_to_keep` as a boolean mask): with the prompt
    masked, a small share of the batch, where full logits over the vocabulary plus their fp32
    log-softmax are a large part of a step (benchmarks/sft_throughput.py measures both, side by side).
    The loss is the same: the collator's labels are -100 on prompt and padding tokens, and the
    model's loss averages over the remaining tokens (over `num_items_in_batch` across gradient
    accumulation, like TRL's). TRL's `entropy` / `mean_token_accuracy` metrics are not logged.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs["use_cache"] = False
        if self.aux_loss_enabled:  # MoE: the model adds router_aux_loss_coef * aux_loss to its own loss
            inputs["output_router_logits"] = True
        if not return_outputs and "labels" in inputs and _accepts_logits_to_keep(self.accelerator.unwrap_model(model)):
            inputs = _completion_logits_only(inputs)  # callers of the outputs (return_outputs) expect full logits
        # transformers' Trainer.compute_loss: model(**inputs).loss, normalised by num_items_in_batch
        # across gradient accumulation and devices, without TRL's fused head.
        return model_own_loss(self, model, inputs, return_outputs, num_items_in_batch)

    def _get_train_sampler(self, train_dataset=None):
        require("trainer_sampler_hooks")  # overrides a private transformers hook
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:  # train_sampling_strategy: group_by_length
            sampler = BucketedLengthSampler(sampler.batch_size, lengths=sampler.lengths, generator=sampler.generator)
        return sampler


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _completion_logits_only(inputs: dict) -> dict:
    """Ask the model for logits only at positions that predict a label, with those labels pre-shifted.

    transformers' causal LMs accept a boolean (batch, seq) `logits_to_keep` and then return logits
    for the True positions only, flattened; `shift_labels` (the next-token label of each kept
    position) tells the loss they are already aligned. Positions predicting -100 never reach the loss,
    so the loss and its gradient equal the full-logits ones.
    """
    labels = inputs["labels"]
    next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    keep = next_labels != -100
    kept = next_labels[keep]
    return {**inputs, "labels": kept, "shift_labels": kept, "logits_to_keep": keep}
