"""Staged LoRA SFT: a curriculum (PubMedQA -> MedMCQA -> MedQA), one adapter per stage.

    accelerate launch --config_file configs/accelerate/cpu.yaml sft/run.py --config configs/sft/smollm2_lora.yaml
    accelerate launch sft/run.py --config configs/sft/llama2-7b_lora.yaml
    accelerate launch --config_file configs/accelerate/zero3.yaml sft/run.py --config configs/sft/gpt-oss-20b_qlora.yaml
    python sft/run.py --config configs/sft/tiny.yaml --stages medqa

Stage k loads the base model plus stage k-1's adapter and keeps training that adapter on its own
data (converted by clinalign.data, rendered in the one prompt format of clinalign/prompts.py, loss
on the completion only), then saves it to OUTPUT_DIR/stages/<k>-<name>/ with its tokenizer,
metrics.json and config.yaml. A killed run started again with the same command skips finished
stages and resumes the unfinished one from its last checkpoint (OUTPUT_DIR/checkpoints/<k>-<name>/).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from accelerate.utils import broadcast_object_list
from transformers import set_seed
from trl import SFTConfig

from clinalign import tasks
from clinalign.adapters import write_adapter_provenance
from clinalign.config import ModelArgs, Parser, eval_fraction_field, run, write_resolved_config
from clinalign.data import load_records
from clinalign.errors import ConfigError
from clinalign.json_io import write_json
from clinalign.model_card import write_model_card
from clinalign.models import ensure_pad_token, load_tokenizer, load_trainable_policy, quantize_after_lora
from clinalign.run_dir import remove_inside
from clinalign.sft import (
    PlainLossSFTTrainer,
    checkpoint_dir,
    is_complete,
    last_complete_checkpoint,
    parse_curriculum,
    publish_stage,
    restore_finished_checkpoint,
    stage_dir,
    stage_examples,
)
from clinalign.stats import fmt
from clinalign.tables import markdown_table
from clinalign.tracking import log_measurements, open_trackers


@dataclasses.dataclass
class SFTScriptArgs:
    curriculum: list[dict] = dataclasses.field(
        default_factory=list,
        metadata={
            "help": "Stages in order: each {name, data, [dataset, max_steps | num_train_epochs, eval_data, ...]}."
        },
    )
    stages: list[str] | None = dataclasses.field(
        default=None, metadata={"help": "Run only these stages (by name); each starts from the stage before it."}
    )
    eval_fraction: float = eval_fraction_field()
    eval_max_records: int = dataclasses.field(
        default=64, metadata={"help": "At most this many held-out records for the multiple-choice accuracy check."}
    )
    chat_format: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "auto (harmony for GPT-OSS, else the model's chat template), chat or harmony.",
            "choices": ["auto", "chat", "harmony"],
        },
    )
    reasoning_effort: str = dataclasses.field(
        default="low",
        metadata={"help": "Harmony system message reasoning effort.", "choices": ["low", "medium", "high"]},
    )
    keep_checkpoints: bool = dataclasses.field(
        default=False, metadata={"help": "Keep a stage's intermediate checkpoints once its adapter is published."}
    )


def mc_accuracies(model, tokenizer, records) -> dict[str, dict | None]:
    """Held-out multiple-choice accuracy in the format the stage trains on (`chat`) and in
    lm-evaluation-harness's layout (`lm_eval`, what published numbers use); None without labels."""
    from clinalign.mc_eval import mc_accuracy, score_multiple_choice

    labeled = [r for r in records if r.answer is not None]
    return {
        layout: mc_accuracy(score_multiple_choice(model, tokenizer, labeled, progress=False, layout=layout))
        if labeled
        else None
        for layout in ("chat", "lm_eval")
    }


def main(script_args: SFTScriptArgs, training_args: SFTConfig, model_args: ModelArgs):
    if not model_args.use_peft:
        raise ConfigError("sft/run.py trains one LoRA adapter per stage: set use_peft: true")
    output_dir = Path(training_args.output_dir)
    plan = parse_curriculum(script_args.curriculum, script_args.stages)
    all_stages = parse_curriculum(script_args.curriculum, None)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    summary = []

    for position, stage in plan:
        final_dir = stage_dir(output_dir, position, stage)
        if is_complete(final_dir):
            print(f"[sft] stage {position}-{stage.name}: complete, skipped ({final_dir})")
            summary.append({"stage": f"{position}-{stage.name}", **_read_metrics(final_dir)})
            continue

        records = load_records(stage.data, stage.dataset, split=stage.split, config_name=stage.hub_config)
        if stage.eval_data:
            train_records = records.records
            eval_records = load_records(stage.eval_data, stage.dataset).records
        else:
            train_records, eval_records = tasks.split(records.records, script_args.eval_fraction)
        eval_records = eval_records[: script_args.eval_max_records]

        previous = _previous_adapter(output_dir, all_stages, position)
        # Seed before the LoRA weights exist: the Trainer seeds only after they are initialised, so two
        # identical runs used to start from different adapters.
        set_seed(training_args.seed)
        model = load_trainable_policy(model_args, previous, training_args.gradient_checkpointing)
        chat_format = script_args.chat_format
        if chat_format == "auto":
            chat_format = "harmony" if model.config.model_type == "gpt_oss" else "chat"
        ensure_pad_token(tokenizer, model)
        quantize_after_lora(model, model_args)

        args = dataclasses.replace(
            training_args,
            output_dir=str(checkpoint_dir(output_dir, position, stage)),
            max_steps=stage.max_steps,
            num_train_epochs=stage.num_train_epochs,
            learning_rate=stage.learning_rate or training_args.learning_rate,
            # Pre-tokenized harmony examples carry their own completion_mask: train on it.
            completion_only_loss=True if chat_format == "harmony" else training_args.completion_only_loss,
        )
        train_examples = stage_examples(train_records, chat_format, script_args.reasoning_effort)
        trainer = PlainLossSFTTrainer(
            model=model,
            args=args,
            train_dataset=train_examples,
            eval_dataset=stage_examples(eval_records, chat_format, script_args.reasoning_effort)
            if eval_records
            else None,
            processing_class=tokenizer,
        )
        accuracy_before = mc_accuracies(trainer.model, tokenizer, eval_records) if chat_format == "chat" else None
        last = last_complete_checkpoint(Path(args.output_dir)) if trainer.accelerator.is_main_process else None
        last = broadcast_object_list([last])[0]  # every process resumes from the same step
        if restore_finished_checkpoint(trainer, last):
            runtime = None  # trained before the kill: nothing to run again
            open_trackers(trainer)  # train() would have: the stage's measurements go under output_dir
        else:
            runtime = trainer.train(resume_from_checkpoint=last).metrics.get("train_runtime")
        metrics = {
            "stage": f"{position}-{stage.name}",
            "data": records.report,
            "train_examples": len(train_examples),
            # TRL drops examples whose completion max_length truncated away entirely
            "train_examples_dropped_by_max_length": len(train_examples) - len(trainer.train_dataset),
            "eval_examples": len(eval_records),
            "resumed_from_step": int(last.rsplit("-", 1)[-1]) if last else None,
            "started_from": str(previous) if previous else "base",
            "train_loss_first": _first_loss(trainer),
            "train_loss_last": _last_loss(trainer),
            "train_runtime_s": runtime,
            "global_step": trainer.state.global_step,
        }
        if eval_records:
            metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
            if chat_format == "chat":
                accuracy_after = mc_accuracies(trainer.model, tokenizer, eval_records)
                for layout in ("chat", "lm_eval"):
                    metrics[f"{layout}_accuracy_before"] = accuracy_before[layout]
                    metrics[f"{layout}_accuracy_after"] = accuracy_after[layout]

        # Beside the loss in every report_to tracker (eval/sft/<stage>/...), at the stage's last step.
        measured = ["eval_loss"] + [f"{layout}_accuracy_{when}" for layout in ("chat", "lm_eval") for when in ("before", "after")]
        log_measurements(trainer, {k: metrics.get(k) for k in measured}, f"sft/{position}-{stage.name}")
        tmp_dir = final_dir.with_name(f".{final_dir.name}.tmp")
        trainer.save_model(str(tmp_dir))  # every process takes part (ZeRO-3 gathers the adapter)
        if trainer.accelerator.is_main_process:
            tokenizer.save_pretrained(tmp_dir)
            write_adapter_provenance(tmp_dir, model_args.model_name_or_path, trainer.model)
            write_json(tmp_dir / "metrics.json", metrics)
            write_resolved_config(tmp_dir, script_args, args, model_args)
            write_model_card(tmp_dir)  # replaces PEFT's placeholder README.md
            publish_stage(tmp_dir, final_dir)
            if not script_args.keep_checkpoints:
                remove_inside(args.output_dir, output_dir)
        trainer.accelerator.wait_for_everyone()
        summary.append(metrics)
        print(f"[sft] stage {position}-{stage.name}: adapter saved to {final_dir}")

    if training_args.process_index == 0:
        write_json(output_dir / "metrics.json", {"stages": summary})
        write_resolved_config(output_dir, script_args, training_args, model_args)
        print(_table(summary))
    return summary


def _previous_adapter(output_dir: Path, all_stages, position: int) -> Path | None:
    """The adapter of the stage just before `position`, when it finished; None for the first stage."""
    for k, stage in reversed(all_stages[: position - 1]):
        path = stage_dir(output_dir, k, stage)
        if is_complete(path):
            return path
        print(f"[sft] stage {k}-{stage.name} has no finished adapter; stage {position} starts from it if it runs")
        return None
    return None


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and math.isfinite(h["loss"])]


def _first_loss(trainer) -> float | None:
    return (_losses(trainer) or [None])[0]


def _last_loss(trainer) -> float | None:
    return (_losses(trainer) or [None])[-1]


def _read_metrics(path: Path) -> dict:
    metrics_file = path / "metrics.json"
    return json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}


def _table(summary: list[dict]) -> str:
    def number(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    def acc(value):
        return "-" if not value else fmt(value["acc"], value["acc_low"], value["acc_high"], value["n"], 3)

    rows = [
        [m.get("stage"), number(m.get("train_loss_first")), number(m.get("train_loss_last")), number(m.get("eval_loss")),
         acc(m.get("chat_accuracy_before")), acc(m.get("chat_accuracy_after")),
         acc(m.get("lm_eval_accuracy_before")), acc(m.get("lm_eval_accuracy_after"))]
        for m in summary
    ]  # fmt: skip
    header = ["stage", "train loss first", "train loss last", "eval loss", "acc before (trained format)",
              "acc after (trained format)", "acc before (lm-eval layout)", "acc after (lm-eval layout)"]  # fmt: skip
    return markdown_table(header, rows)


def make_parser() -> Parser:
    return Parser([SFTScriptArgs, SFTConfig, ModelArgs])


if __name__ == "__main__":
    run(main, make_parser(), upstream_patches=True)
