"""SFT training throughput: the original recipe vs sft/run.py's training path, side by side.

    python benchmarks/sft_throughput.py [--quick] [--rounds 3] [--out results.json]
        [--threads N] [--variant NAME 'SFT_OVERRIDES' ...] [-- SFT_OVERRIDES...]

One process, the embedded default model (SmolLM2-135M-Instruct) and the same records: an equal mix
of PubMedQA, MedMCQA and MedQA from clinalign/sample_data (the train side of sft/run.py's
deterministic split, PER_SOURCE records of each, interleaved), rendered in the one prompt format.

(a) The original recipe: HF `transformers.Trainer` (not TRL), the chat-rendered text of every
    example padded to 512 tokens, batch 1 x gradient accumulation 4, fp32 weights and no autocast,
    loss on all tokens (transformers' `DataCollatorForLanguageModeling(mlm=False)`: pads masked),
    LoRA r=4, alpha=8, dropout 0.05 on q_proj/v_proj, lr 5e-5 with the Trainer's linear schedule.
(b) sft/run.py's training path with its defaults: the demo config (configs/sft/smollm2_lora.yaml),
    parsed by sft/run.py's own parser (device defaults included), the model loaded and wrapped as
    sft/run.py does, `stage_examples` + `PlainLossSFTTrainer`. Arguments after `--` are passed to
    that parser; `--variant NAME 'OVERRIDES'` measures another setting of (b) in the same run, e.g.
    `--variant padding_free '--padding_free true --max_length null'` or
    `--variant bfd '--packing true --packing_strategy bfd'`. Checkpoint saving is off (it is I/O).

Each recipe trains one epoch over the same records, so all see exactly the same examples (in their
own order: (a) shuffled, (b) as its sampler orders them). Measured per recipe:

- seconds per optimizer step: the interval between consecutive `on_step_end` callbacks (data
  collation, forward, backward, optimizer and logging included), warm-up steps excluded; median,
  with min and max. "CPU use" is process CPU time / (wall time x threads) over the same steps:
  well under 100% means other processes had the cores (the machine is shared: trust ratios from
  one run, with the recipes alternating over --rounds, more than absolute figures);
- non-pad tokens per second: the attention-mask ones of the batches the collator actually fed
  (every position of a padding-free row is a real token), per timed step divided by its time;
  median over the timed steps; plus the pad share of all positions fed;
- peak memory: the process's resident-set high-water mark (VmHWM of /proc/self/status, reset
  through /proc/self/clear_refs after loading the model, before training), and its rise during
  training over the RSS at the start;
- quality, "no worse": the mean negative log-likelihood of the completion tokens (the answer turn)
  of a fixed held-out set (the held-out side of the same split, equal per source, never trained
  on) after each recipe has seen the same examples, each model evaluated as trained (its own weight
  dtype, no autocast), by the same evaluator. The recipes' own training losses are not comparable:
  (a) averages over prompt and system tokens too. (b) is "no worse" when its held-out loss is at
  most (a)'s. The base model's held-out loss (fp32 and bf16) is printed for reference.

--rounds R repeats the comparison (alternating the order) and reports the median and spread of the
(b)/(a) ratio of non-pad tokens per second. Target: at least 5x on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import runpy
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments, set_seed

from clinalign import tasks
from clinalign.data import load_records
from clinalign.models import ensure_pad_token, load_causal_lm, load_tokenizer, model_init_kwargs
from clinalign.sft import PlainLossSFTTrainer, stage_examples

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "sft" / "smollm2_lora.yaml"
SAMPLES = REPO / "clinalign" / "sample_data"
SOURCES = ("pubmedqa_ori_pqal.json", "medmcqa_train.jsonl", "medqa_us_test.jsonl")
EVAL_FRACTION = 0.2  # the demo's split (configs/sft/smollm2_lora.yaml), so held-out records are never trained on
ORIGINAL_MAX_LENGTH = 512
SEED = 0


# ----------------------------------------------------------------------------------------------
# Data


def mixed_records(per_source: int) -> tuple[list, list]:
    """(train, held_out): `per_source` train records of each source interleaved, and an equal held-out mix."""
    trains, held_outs = [], []
    for name in SOURCES:
        records = [r for r in load_records(str(SAMPLES / name)).records if r.answer is not None]
        train, held_out = tasks.split(records, EVAL_FRACTION)
        if len(train) < per_source:
            raise SystemExit(f"{name} has only {len(train)} train records, fewer than --per-source {per_source}")
        trains.append(train[:per_source])
        held_outs.append(held_out)
    n_held = min(len(h) for h in held_outs)
    interleave = lambda groups: [g[i] for i in range(len(groups[0])) for g in groups]  # noqa: E731
    return interleave(trains), interleave([h[:n_held] for h in held_outs])


def chat_texts(tokenizer, records) -> list[str]:
    """Each record's prompt + completion rendered with the model's chat template (what (b) trains on)."""
    examples = stage_examples(records, "chat")
    return [tokenizer.apply_chat_template(e["prompt"] + e["completion"], tokenize=False) for e in examples]


# ----------------------------------------------------------------------------------------------
# Measuring


class CountingCollator:
    """Wraps a collator and records, per batch fed, the real (non-pad) tokens and all positions."""

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[tuple[int, int]] = []

    def __call__(self, features):
        batch = self.collator(features)
        positions = batch["input_ids"].numel()
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else positions
        self.batches.append((real, positions))
        return batch


class StepClock(TrainerCallback):
    """Wall-clock time of every optimizer step: the interval between consecutive step ends."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # process CPU seconds (all threads) in the same intervals
        self._last = self._last_cpu = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last, self._last_cpu = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        now, cpu = time.perf_counter(), time.process_time()
        self.times.append(now - self._last)
        self.cpu_times.append(cpu - self._last_cpu)
        self._last, self._last_cpu = now, cpu


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> float:
    """Release freed memory, reset the RSS high-water mark to the current RSS; returns that RSS in MiB."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") / 1024


def peak_rss() -> float:
    return _status_kib("VmHWM") / 1024


@torch.no_grad()
def heldout_completion_loss(model, tokenizer, records, batch_size: int = 8) -> float:
    """Mean NLL of the completion tokens of `records` (prompt masked), the same evaluator for every model."""
    rows = []
    for example in stage_examples(records, "chat"):
        prompt = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
        full = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=True, return_dict=True)
        prompt_ids, ids = prompt["input_ids"], full["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids, "chat template does not extend the prompt"
        rows.append((ids, len(prompt_ids)))
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100)
        for i, (ids, n_prompt) in enumerate(chunk):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
        targets = labels[:, 1:]
        mask = targets != -100
        token_nll = torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum")
        nll += float(token_nll)
        count += int(mask.sum())
    model.train(was_training)
    return nll / count


def train_and_measure(trainer, warmup_steps: int) -> dict:
    """Run `trainer.train()` with a step clock and a token-counting collator; the recipe's figures."""
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    clock = StepClock()
    trainer.add_callback(clock)
    rss_start = reset_peak_rss()
    trainer.train()
    peak = peak_rss()

    steps = len(clock.times)
    per_step = len(counter.batches) // steps  # micro-batches per optimizer step (gradient accumulation)
    if steps <= warmup_steps:
        raise SystemExit(f"only {steps} optimizer steps: need more than the {warmup_steps} warm-up steps")
    real = [sum(r for r, _ in counter.batches[k * per_step : (k + 1) * per_step]) for k in range(steps)]
    positions = [sum(p for _, p in counter.batches[k * per_step : (k + 1) * per_step]) for k in range(steps)]
    timed = range(warmup_steps, steps)
    times = [clock.times[k] for k in timed]
    rates = [real[k] / clock.times[k] for k in timed]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "optimizer_steps": steps,
        "timed_steps": len(times),
        "s_per_step_median": statistics.median(times),
        "s_per_step_min": min(times),
        "s_per_step_max": max(times),
        "nonpad_tokens_per_s_median": statistics.median(rates),
        "nonpad_tokens_per_s_min": min(rates),
        "nonpad_tokens_per_s_max": max(rates),
        "nonpad_tokens_per_s_overall": sum(real[k] for k in timed) / sum(times),
        # CPU seconds / (wall seconds x threads): well below 100% means other processes took the cores
        "cpu_utilisation": sum(clock.cpu_times[k] for k in timed) / sum(times) / torch.get_num_threads(),
        "nonpad_tokens_per_step_median": statistics.median(real[k] for k in timed),
        "pad_share": 1 - sum(real[k] for k in timed) / sum(positions[k] for k in timed),
        "examples_seen": len(trainer.train_dataset),
        "peak_rss_mib": round(peak, 1),
        "rss_at_train_start_mib": round(rss_start, 1),
        "rss_rise_mib": round(peak - rss_start, 1),
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
    }


# ----------------------------------------------------------------------------------------------
# The two recipes


def original_trainer(tokenizer, train_records, output_dir: str) -> Trainer:
    """(a): HF Trainer, pad to 512, batch 1 x grad-accum 4, fp32, loss on all tokens, LoRA r4 on q/v."""
    set_seed(SEED)
    model = load_causal_lm("smollm2", dtype=torch.float32)
    ensure_pad_token(tokenizer, model)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    encoded = tokenizer(
        chat_texts(tokenizer, train_records), padding="max_length", truncation=True, max_length=ORIGINAL_MAX_LENGTH
    )
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        learning_rate=5e-5,
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=SEED,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(dict(encoded)),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )


def sft_run_config(overrides: list[str]):
    """sft/run.py's (script_args, training_args, model_args) for the demo config, parsed by its own parser."""
    entry = runpy.run_path(str(REPO / "sft" / "run.py"), run_name="bench")
    return entry["make_parser"]().parse(["--config", str(DEMO_CONFIG), *overrides])


def sft_run_trainer(config, train_records, output_dir: str) -> PlainLossSFTTrainer:
    """(b): the model, adapter and trainer built as sft/run.py builds them for a first stage."""
    from trl import get_peft_config

    _, training_args, model_args = config
    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    model = load_causal_lm(model_args.model_name_or_path, **model_init_kwargs(model_args))
    ensure_pad_token(tokenizer, model)
    model = get_peft_model(model, get_peft_config(model_args))
    args = dataclasses.replace(
        training_args, output_dir=output_dir, max_steps=-1, num_train_epochs=1, save_strategy="no"
    )
    return PlainLossSFTTrainer(
        model=model, args=args, train_dataset=stage_examples(train_records, "chat"), processing_class=tokenizer
    )


def describe_b(config) -> dict:
    _, t, m = config
    return {
        "dtype": str(model_init_kwargs(m)["dtype"]).replace("torch.", ""),
        "bf16_autocast": t.bf16,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_sampling_strategy": str(getattr(t.train_sampling_strategy, "value", t.train_sampling_strategy)),
        "padding_free": t.padding_free,
        "packing": t.packing,
        "max_length": t.max_length,
        "gradient_checkpointing": t.gradient_checkpointing,
        "lora": f"r={m.lora_r} alpha={m.lora_alpha} dropout={m.lora_dropout} on {','.join(m.lora_target_modules or [])}",
        "learning_rate": t.learning_rate,
    }


# ----------------------------------------------------------------------------------------------


def run_recipe(name: str, build, tokenizer, held_out, warmup_steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        trainer = build(out)
        print(f"[bench] {name}: training on {len(trainer.train_dataset)} examples", flush=True)
        load_before = os.getloadavg()[0]
        figures = train_and_measure(trainer, warmup_steps)
        figures["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        figures["heldout_completion_loss"] = heldout_completion_loss(trainer.model, tokenizer, held_out)
        print(f"[bench] {name}: {json.dumps(figures)}", flush=True)
    del trainer
    gc.collect()
    return figures


def _row(label: str, f: dict) -> str:
    return (
        f"| {label} | {f['s_per_step_median']:.2f} [{f['s_per_step_min']:.2f}-{f['s_per_step_max']:.2f}] "
        f"| {f['nonpad_tokens_per_s_median']:.0f} [{f['nonpad_tokens_per_s_min']:.0f}-{f['nonpad_tokens_per_s_max']:.0f}] "
        f"| {f['cpu_utilisation']:.0%} | {f['pad_share']:.1%} | {f['peak_rss_mib']:.0f} ({f['rss_rise_mib']:+.0f}) "
        f"| {f['train_loss_first']:.3f} -> {f['train_loss_last']:.3f} | {f['heldout_completion_loss']:.4f} |"
    )


def report(rounds: list[dict], base: dict, settings: dict) -> dict:
    """Print the side-by-side table and the (b)/(a) ratios; return the summary."""
    names = [k for k in rounds[0] if k != "a"]
    ratios = {k: [r[k]["nonpad_tokens_per_s_median"] / r["a"]["nonpad_tokens_per_s_median"] for r in rounds] for k in names}
    lines = [
        "",
        f"records: {rounds[0]['a']['examples_seen']} train (equal mix of PubMedQA, MedMCQA, MedQA), "
        f"{base['heldout_records']} held out; torch threads {torch.get_num_threads()}",
        *(f"{k} settings: {json.dumps(v)}" for k, v in settings.items()),
        "",
        "| recipe, round | s/step median [min-max] | non-pad tok/s median [min-max] | CPU use | pad share "
        "| peak RSS MiB (rise in training) | train loss first -> last | held-out completion loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in ["a", *names]:
        lines += [_row(f"{key} #{i + 1}", r[key]) for i, r in enumerate(rounds)]
    loss_a = rounds[0]["a"]["heldout_completion_loss"]
    summary = {"heldout_loss_base_fp32": base["fp32"], "heldout_loss_base_bf16": base["bf16"], "heldout_loss_a": loss_a}
    lines += [
        "",
        f"quality: {QUALITY_METHOD}",
        f"held-out completion loss: base model {base['fp32']:.4f} (fp32), {base['bf16']:.4f} (bf16); "
        f"after (a) {loss_a:.4f}",
    ]
    for k in names:
        loss_k = rounds[0][k]["heldout_completion_loss"]
        r = ratios[k]
        summary[k] = {
            "ratio_nonpad_tokens_per_s_median": statistics.median(r),
            "ratio_min": min(r),
            "ratio_max": max(r),
            "ratios": r,
            "heldout_loss": loss_k,
            "no_worse_than_a": loss_k <= loss_a,
            "target_5x_met": statistics.median(r) >= 5,
        }
        lines.append(
            f"({k})/(a) non-pad tokens/s: median {statistics.median(r):.2f}x (min {min(r):.2f}x, max {max(r):.2f}x, "
            f"{len(r)} round(s)); target >= 5x {'met' if statistics.median(r) >= 5 else 'NOT met'}; held-out loss "
            f"{loss_k:.4f} vs (a) {loss_a:.4f}: {'no worse' if loss_k <= loss_a else 'WORSE'}"
        )
    print("\n".join(lines), flush=True)
    return summary


QUALITY_METHOD = (
    "mean NLL of the completion tokens of a fixed held-out set (equal per source, never trained on) after "
    "each recipe has trained one epoch over the same examples, each model evaluated as trained (own dtype)"
)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 records per source, 1 warm-up step")
    parser.add_argument("--per-source", type=int, default=None, help="train records per source (default 32; quick 8)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the comparison, alternating the order")
    parser.add_argument("--warmup-steps", type=int, default=None, help="optimizer steps left out of timing (default 2; quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument(
        "--variant", nargs=2, action="append", default=[], metavar=("NAME", "OVERRIDES"),
        help="also measure (b) with these sft/run.py overrides, e.g. --variant padding_free "
        "'--padding_free true --max_length null' (repeatable)",
    )
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    per_source = args.per_source or (8 if args.quick else 32)
    warmup = args.warmup_steps if args.warmup_steps is not None else (1 if args.quick else 2)
    if args.threads:
        torch.set_num_threads(args.threads)

    configs = {"b": sft_run_config(overrides)}
    configs.update({name: sft_run_config([*overrides, *shlex.split(extra)]) for name, extra in args.variant})
    settings = {k: describe_b(c) for k, c in configs.items()}
    tokenizer = load_tokenizer("smollm2")
    train, held_out = mixed_records(per_source)
    print(f"[bench] quality: {QUALITY_METHOD}", flush=True)

    base_model = load_causal_lm("smollm2", dtype=torch.float32)
    ensure_pad_token(tokenizer, base_model)
    base = {"fp32": heldout_completion_loss(base_model, tokenizer, held_out), "heldout_records": len(held_out)}
    base["bf16"] = heldout_completion_loss(base_model.to(torch.bfloat16), tokenizer, held_out)
    del base_model

    recipes = {"a": lambda out: original_trainer(tokenizer, train, out)}
    recipes.update({k: (lambda out, c=c: sft_run_trainer(c, train, out)) for k, c in configs.items()})
    rounds = []
    for i in range(args.rounds):
        order = list(recipes) if i % 2 == 0 else list(reversed(recipes))
        figures = {k: run_recipe(f"round {i + 1} ({k})", recipes[k], tokenizer, held_out, warmup) for k in order}
        rounds.append({k: figures[k] for k in recipes})

    result = {"settings": settings, "quality_method": QUALITY_METHOD, "base": base, "rounds": rounds}
    result["summary"] = report(rounds, base, settings)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
