"""Staged LoRA SFT on the tiny model: adapters per stage, masks, resume after a kill, reload, subsets."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clinalign import models
from clinalign.errors import ClinalignError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "sft" / "tiny.yaml")
STAGES = ["1-pubmedqa", "2-medmcqa", "3-medqa"]


def run_sft(*args: str):
    """Run sft/run.py in this process (as `python sft/run.py ...` would), returning main's summary."""
    entry = runpy.run_path(str(REPO / "sft" / "run.py"), run_name="sft_test")
    return entry["main"](*entry["make_parser"]().parse(["--config", TINY, *args]))


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    summary = run_sft("--output_dir", str(out))
    return out, summary


def lora_weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(stage_dir / "adapter_model.safetensors"))


def test_every_stage_saves_its_own_adapter(curriculum):
    out, summary = curriculum
    assert [m["stage"] for m in summary] == STAGES
    for name in STAGES:
        stage = out / "stages" / name
        for artifact in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "metrics.json",
                         "config.yaml", "COMPLETE", "clinalign_base.json"):
            assert (stage / artifact).is_file(), f"{name} lacks {artifact}"
        metrics = json.loads((stage / "metrics.json").read_text())
        assert metrics["global_step"] == 2
        assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("train_loss_first", "train_loss_last", "eval_loss"))
        assert metrics["data"]["read"] == metrics["data"]["kept"] + sum(metrics["data"]["skipped"].values())
    assert not (out / "checkpoints" / STAGES[0]).exists()  # removed once the adapter is published
    top = json.loads((out / "metrics.json").read_text())
    assert [m["stage"] for m in top["stages"]] == STAGES


def test_each_stage_continues_and_changes_the_previous_adapter(curriculum):
    out, summary = curriculum
    weights = [lora_weights(out / "stages" / name) for name in STAGES]
    assert summary[0]["started_from"] == "base"
    assert summary[1]["started_from"].endswith(STAGES[0]) and summary[2]["started_from"].endswith(STAGES[1])
    for before, after in zip(weights, weights[1:]):
        assert before.keys() == after.keys()
        assert any(not torch.equal(before[k], after[k]) for k in before), "a stage left its adapter unchanged"
    # A fresh LoRA has B == 0; after stage 1 it must have moved.
    assert any(k.endswith("lora_B.weight") and weights[0][k].abs().sum() > 0 for k in weights[0])


def test_base_weights_are_unchanged(curriculum):
    out, _ = curriculum
    base_file = load_file(str(Path(models.resolve_model("tiny-llama")) / "model.safetensors"))
    model, _ = models.load_policy("tiny-llama", out / "stages" / STAGES[-1], dtype="float32")
    base_state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                  for k, v in model.state_dict().items() if "lora_" not in k}
    for name, tensor in base_file.items():
        assert torch.equal(base_state[name], tensor), name


def test_labels_mask_exactly_the_prompt(tiny_llama, tmp_path):
    from trl import SFTConfig

    from clinalign.data import load_records
    from clinalign.sft import PlainLossSFTTrainer, stage_examples

    records = load_records(str(REPO / "clinalign/sample_data/medqa_us_test.jsonl")).records[:3]
    tokenizer = models.load_tokenizer("tiny-llama")
    model = models.load_causal_lm("tiny-llama")
    models.ensure_pad_token(tokenizer, model)
    examples = stage_examples(records, "chat")
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_length=4096)
    trainer = PlainLossSFTTrainer(model=model, args=args, train_dataset=examples, processing_class=tokenizer)
    for example, row in zip(examples, trainer.train_dataset):
        prompt_ids = tokenizer.apply_chat_template(
            example["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        n_prompt = len(prompt_ids)
        labels, input_ids = row["labels"], row["input_ids"]
        assert input_ids[:n_prompt] == prompt_ids
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == input_ids[n_prompt:]  # every completion token, <|im_end|> included
        completion = tokenizer.decode(input_ids[n_prompt:])
        assert completion.startswith(example["completion"][0]["content"])


def test_small_stages_are_length_grouped(tiny_llama, tmp_path):
    """A demo-sized stage (48 examples, batch 8) gets buckets of several batches, hence less padding."""
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl import SFTConfig

    from clinalign.data import load_records
    from clinalign.sampling import BucketedLengthSampler
    from clinalign.sft import PlainLossSFTTrainer, stage_examples

    records = load_records(str(REPO / "clinalign/sample_data/pubmedqa_ori_pqal.json")).records[:48]
    tokenizer = models.load_tokenizer("tiny-llama")
    model = models.load_causal_lm("tiny-llama")
    models.ensure_pad_token(tokenizer, model)
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_length=4096,
                     per_device_train_batch_size=8, train_sampling_strategy="group_by_length")
    trainer = PlainLossSFTTrainer(model=model, args=args, train_dataset=stage_examples(records, "chat"),
                                  processing_class=tokenizer)
    sampler = trainer._get_train_sampler()
    assert type(sampler) is BucketedLengthSampler
    lengths = sampler.lengths
    assert sorted(lengths) == sorted(len(row["input_ids"]) for row in trainer.train_dataset)

    def padded_positions(order):
        batches = [order[i : i + 8] for i in range(0, len(order), 8)]
        return sum(len(b) * max(lengths[j] for j in b) - sum(lengths[j] for j in b) for b in batches)

    torch.manual_seed(0)  # the sampler draws from torch's generator, as the Trainer seeds it
    order = list(sampler)
    assert sorted(order) == list(range(48))  # every example once per epoch
    plain = list(LengthGroupedSampler(8, lengths=lengths, generator=torch.Generator().manual_seed(0)))
    assert padded_positions(order) < padded_positions(plain)  # transformers' default groups nothing at 48


def test_reload_an_adapter_and_generate(curriculum):
    out, _ = curriculum
    model, tokenizer = models.load_policy("tiny-llama", out / "stages" / STAGES[1])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which nerve causes winging of the scapula?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_adapter_from_another_base_is_refused(curriculum, tiny_gpt_oss):
    out, _ = curriculum
    with pytest.raises(ClinalignError, match="was trained on base model 'tiny-llama'"):
        models.load_policy("tiny-gpt-oss", out / "stages" / STAGES[0])


def test_a_subset_of_stages_starts_from_the_stage_before(curriculum, tmp_path):
    out, _ = curriculum
    # Reuse stages 1-2 of the finished run; run only medqa into a fresh stage folder.
    target = tmp_path / "subset"
    (target / "stages").mkdir(parents=True)
    for name in STAGES[:2]:
        os.symlink(out / "stages" / name, target / "stages" / name)
    summary = run_sft("--output_dir", str(target), "--stages", "medqa")
    assert [m["stage"] for m in summary] == ["3-medqa"]
    assert summary[0]["started_from"].endswith("2-medmcqa")


def test_unknown_stage_name_is_a_clear_error(tmp_path):
    from clinalign.errors import ConfigError

    with pytest.raises(ConfigError, match="--stages names unknown stage 'medqaa'"):
        run_sft("--output_dir", str(tmp_path), "--stages", "medqaa")


def test_kill_in_stage_two_then_resume(tmp_path):
    """SIGKILL the run in the middle of stage 2; the same command skips stage 1 and resumes stage 2."""
    config = yaml.safe_load(Path(TINY).read_text())
    config["curriculum"] = config["curriculum"][1:]  # the short-prompt stages: medmcqa, medqa
    config["curriculum"][0]["max_steps"] = 1
    config["curriculum"][1]["max_steps"] = 6
    config["eval_max_records"] = 2
    (tmp_path / "kill.yaml").write_text(yaml.safe_dump(config))
    config = tmp_path / "kill.yaml"
    command = [sys.executable, "sft/run.py", "--config", str(config), "--output_dir", str(tmp_path / "run")]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "run" / "checkpoints" / "2-medqa" / "checkpoint-2"
    deadline = time.time() + 300
    while not checkpoint.is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    stage1 = tmp_path / "run" / "stages" / "1-medmcqa"
    assert (stage1 / "COMPLETE").is_file()
    assert not (tmp_path / "run" / "stages" / "2-medqa").exists()  # never a half-published adapter
    complete = [int(p.parent.name.split("-")[1]) for p in checkpoint.parent.glob("checkpoint-*/trainer_state.json")]
    stage1_weights = lora_weights(stage1)
    stage1_mtime = (stage1 / "adapter_model.safetensors").stat().st_mtime_ns

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "stage 1-medmcqa: complete, skipped" in rerun.stdout
    assert (stage1 / "adapter_model.safetensors").stat().st_mtime_ns == stage1_mtime
    assert all(torch.equal(v, lora_weights(stage1)[k]) for k, v in stage1_weights.items())
    metrics = json.loads((tmp_path / "run" / "stages" / "2-medqa" / "metrics.json").read_text())
    # The newest checkpoint the kill left complete (a half-written one is discarded, not loaded).
    assert metrics["resumed_from_step"] == max(complete)
    assert metrics["global_step"] == 6


def test_a_kill_after_training_resumes_without_an_extra_step(tmp_path, monkeypatch):
    """Killed after the last step (during the stage's eval or publishing), the rerun restores the final
    checkpoint instead of training: it used to run step 3 of max_steps 2. The restored run's tracker
    writes under the run's folder: it used to write runs/<date>_<host>/ in the working directory."""
    import shutil

    config = yaml.safe_load(Path(TINY).read_text())
    medqa = str(REPO / "clinalign" / "sample_data" / "medqa_us_test.jsonl")
    config["curriculum"] = [{"name": "medqa", "data": medqa, "max_steps": 2}]
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    config.update(eval_max_records=2, keep_checkpoints=True, output_dir=str(tmp_path / "run"), report_to="tensorboard")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    entry = runpy.run_path(str(REPO / "sft" / "run.py"), run_name="sft_test")
    entry["main"](*entry["make_parser"]().parse(["--config", str(tmp_path / "c.yaml")]))
    stage = tmp_path / "run" / "stages" / "1-medqa"
    trained = lora_weights(stage)
    # The stage's own measurements reached the tracker beside its loss.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "run").glob("checkpoints/1-medqa/runs/*"))))
    events.Reload()
    metrics = json.loads((stage / "metrics.json").read_text())
    for layout in ("chat", "lm_eval"):
        after = metrics[f"{layout}_accuracy_after"]
        assert events.Scalars(f"eval/sft/1-medqa/{layout}_accuracy_after/acc")[-1].value == pytest.approx(after["acc"])
    def event_files():
        return list((tmp_path / "run").glob("checkpoints/1-medqa/runs/*/events.out.tfevents.*"))

    trained_run_events = len(event_files())
    shutil.rmtree(stage)  # what a kill before publishing leaves: the checkpoints, no stage
    entry["main"](*entry["make_parser"]().parse(["--config", str(tmp_path / "c.yaml")]))
    metrics = json.loads((stage / "metrics.json").read_text())
    assert (metrics["resumed_from_step"], metrics["global_step"]) == (2, 2)
    assert list(workdir.iterdir()) == []  # nothing outside the run's output folder
    assert len(event_files()) > trained_run_events  # the restored run's measurements reached the tracker
    assert all(torch.equal(v, lora_weights(stage)[k]) for k, v in trained.items())


def test_the_chat_layout_scores_the_answer_in_the_format_sft_trains_on():
    # SFT's before/after accuracy was lm-eval's layout only; its chat layout is the trained prompt + "Answer:".
    from clinalign.data import load_records
    from clinalign.mc_eval import chat_context, score_multiple_choice
    from clinalign.prompts import to_chat_example

    tokenizer = models.load_tokenizer("tiny-llama")
    model = models.load_causal_lm("tiny-llama", dtype=torch.float32)
    record = next(r for r in load_records(str(REPO / "clinalign/sample_data/medqa_us_test.jsonl")).records if r.answer)
    example = to_chat_example(record)
    trained = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
    context = chat_context(tokenizer, record)
    assert trained.startswith(context) and trained[len(context) :].startswith(f" {record.answer}. ")

    (prediction,) = score_multiple_choice(model, tokenizer, [record], layout="chat", progress=False)
    n_context = len(tokenizer.encode(context, add_special_tokens=False))
    with torch.no_grad():
        for letter, loglikelihood in zip(prediction.choices, prediction.loglikelihoods, strict=True):
            ids = tokenizer.encode(f"{context} {letter}", add_special_tokens=False)
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            by_hand = sum(logp[i - 1, ids[i]].item() for i in range(n_context, len(ids)))
            assert loglikelihood == pytest.approx(by_hand, abs=1e-4)
    (lm_eval,) = score_multiple_choice(model, tokenizer, [record], progress=False)
    assert lm_eval.choices == prediction.choices and lm_eval.loglikelihoods != pytest.approx(prediction.loglikelihoods)


def test_completion_nll_is_the_loss_sft_minimises_per_record(tmp_path):
    # eval's `nll`: each held-out record's SFT loss; with one example per evaluation it must equal
    # TRL's eval_loss on that example, and batching (right padding) must not change it.
    from trl import SFTConfig

    from clinalign.data import load_records
    from clinalign.evaluation import completion_nll
    from clinalign.sft import PlainLossSFTTrainer, stage_examples

    records = [r for f in ("pubmedqa_ori_pqal.json", "medqa_us_test.jsonl")
               for r in load_records(str(REPO / "clinalign/sample_data" / f)).records[:2]]  # fmt: skip
    tokenizer = models.load_tokenizer("tiny-llama")
    model = models.load_causal_lm("tiny-llama", dtype=torch.float32)
    models.ensure_pad_token(tokenizer, model)
    nll = completion_nll(model, tokenizer, records, batch_size=4)
    assert nll == pytest.approx(completion_nll(model, tokenizer, records, batch_size=1), abs=1e-5)
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_length=4096,
                     per_device_eval_batch_size=1)  # fmt: skip
    for record, value in zip(records, nll, strict=True):
        trainer = PlainLossSFTTrainer(model=model, args=args, train_dataset=stage_examples([record], "chat"),
                                      eval_dataset=stage_examples([record], "chat"), processing_class=tokenizer)  # fmt: skip
        assert trainer.evaluate()["eval_loss"] == pytest.approx(value, abs=1e-4)
