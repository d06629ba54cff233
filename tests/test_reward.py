"""Reward model: training moves the head and the LoRA weights, it reloads, and score.py scores files."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clinalign.rewards import load_reward_model, reward_backbone, score_responses
from clinalign.stats import wilson

REPO = Path(__file__).resolve().parents[1]


def test_training_changes_head_and_lora_and_reports_per_axis(tiny_reward_model, tiny_pairs, tiny_heldout_pairs):
    saved = load_file(str(tiny_reward_model / "adapter_model.safetensors"))
    head = [k for k in saved if "score" in k]
    lora_b = [k for k in saved if "lora_B" in k]
    assert head, "the score head must be saved with the adapter (modules_to_save)"
    assert lora_b and any(saved[k].abs().sum() > 0 for k in lora_b), "LoRA B starts at zero and must move"
    fresh_head = reward_backbone("tiny-llama").score.weight  # the base's head: a fresh random init
    assert not torch.equal(saved[head[0]].float(), fresh_head.float())

    metrics = json.loads((tiny_reward_model / "metrics.json").read_text())
    assert set(metrics["eval"]) >= {"overall", "factuality", "safety"}
    assert metrics["eval"]["overall"]["n"] == metrics["pairs"]["eval"]
    for axis, result in metrics["eval"].items():  # each accuracy with its Wilson interval
        expected = wilson(round(result["accuracy"] * result["n"]), result["n"])
        assert (result["low"], result["high"]) == pytest.approx((expected.low, expected.high)), axis
        assert result["low"] <= result["accuracy"] <= result["high"]
    # held out: the eval_fraction split of the pairs file plus every pair of the eval_pairs file
    n_pairs, n_heldout = (len(path.read_text().splitlines()) for path in (tiny_pairs, tiny_heldout_pairs))
    assert metrics["pairs"]["train"] + metrics["pairs"]["eval"] == n_pairs + n_heldout
    assert metrics["pairs"]["eval"] > n_heldout > 0
    losses = [h["loss"] for h in metrics["train"] if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_reloaded_reward_model_scores_like_the_trained_one(tiny_reward_model):
    model, tokenizer = load_reward_model(tiny_reward_model, dtype="float32")
    prompt = [{"role": "user", "content": "Is it safe to take ibuprofen with warfarin?"}]
    first = score_responses(model, tokenizer, [prompt, prompt], ["No, ask your doctor.", "Yes, take lots."])
    again = score_responses(*load_reward_model(tiny_reward_model, dtype="float32"), [prompt], ["No, ask your doctor."])
    assert first[0] != first[1]
    assert abs(first[0] - again[0]) < 1e-6  # the head was restored, not re-initialised
    # Batched scoring pads; it must not change a score.
    assert abs(score_responses(model, tokenizer, [prompt], ["No, ask your doctor."], batch_size=1)[0] - first[0]) < 1e-5


def test_score_script_scores_lines_and_skips_bad_ones(tiny_reward_model, tmp_path, capsys):
    lines = [
        {"prompt": "I have crushing chest pain, what should I do?", "response": "Rest at home, it will pass."},
        {"prompt": [{"role": "user", "content": "What is the usual adult dose of paracetamol?"}],
         "response": [{"role": "assistant", "content": "Take 10 g at once."}]},
        "not json",
        {"response": "no prompt here"},
        {"prompt": "Which nerve causes winging of the scapula?", "chosen": "Answer: A. Long thoracic nerve",
         "rejected": "Answer: B. Axillary nerve",
         "record": {"id": "q1", "source": "medmcqa", "question": "Winging of the scapula?", "context": None,
                    "options": {"A": "Long thoracic nerve", "B": "Axillary nerve"}, "answer": "A",
                    "answer_text": "Long thoracic nerve"}},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    entry = runpy.run_path(str(REPO / "reward" / "score.py"), run_name="score_test")
    args = ["--reward_model", str(tiny_reward_model), "--input", str(source), "--output", str(tmp_path / "out.jsonl")]
    summary = entry["main"](*entry["make_parser"]().parse(args))

    assert summary["lines"] == 3 and summary["skipped"] == 2 and summary["responses"] == 4
    assert [s["line"] for s in summary["skipped_lines"]] == [3, 4]
    assert "missing 'prompt'" in summary["skipped_lines"][1]["error"]
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert "emergency_escalation" in out[0]["failed_checks"] and out[0]["safety"] < 1
    assert "dosing_without_caveats" in out[1]["failed_checks"]
    pair = out[2]["scores"]
    assert pair["chosen"]["factuality"] == 1.0 and pair["rejected"]["factuality"] == 0.0
    assert all(isinstance(r["reward"], float) for r in (out[0], out[1], pair["chosen"], pair["rejected"]))
    assert json.loads((tmp_path / "out.jsonl.summary.json").read_text())["responses"] == 4
    # Means carry their bootstrap interval and n; pair accuracy its Wilson interval (1 pair here).
    rewards = [out[0]["reward"], out[1]["reward"], pair["chosen"]["reward"], pair["rejected"]["reward"]]
    mean_reward = summary["mean_reward"]
    assert mean_reward["n"] == 4 and mean_reward["value"] == pytest.approx(sum(rewards) / 4)
    assert mean_reward["low"] <= mean_reward["value"] <= mean_reward["high"]
    accuracy = summary["pair_accuracy"]
    assert accuracy["n"] == 1 and accuracy["value"] == float(pair["chosen"]["reward"] > pair["rejected"]["reward"])
    expected = wilson(round(accuracy["value"]), 1)
    assert (accuracy["low"], accuracy["high"]) == pytest.approx((expected.low, expected.high))
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("[score] {")


def test_a_bare_string_prompt_is_scored_in_the_trained_format(tiny_reward_model, tmp_path):
    # Pairs (and so the reward model) always carry the clinical system turn: reward/score.py and PPO's
    # reward function once scored a bare string as a lone user turn, a format the model never saw.
    from clinalign.prompts import free_text_messages
    from clinalign.rewards import RewardModelReward

    model, tokenizer = load_reward_model(tiny_reward_model, dtype="float32")
    question, answer = "Can I double my warfarin dose if I missed one?", "No. Take the next dose as usual."
    trained_format = score_responses(model, tokenizer, [free_text_messages(question)], [answer])
    lone_user_turn = score_responses(model, tokenizer, [[{"role": "user", "content": question}]], [answer])
    assert trained_format != pytest.approx(lone_user_turn)  # the system turn matters to the score
    reward = RewardModelReward(model, tokenizer)([question], [[{"role": "assistant", "content": answer}]])
    assert reward == pytest.approx(trained_format)

    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": question, "response": answer}) + "\n")
    entry = runpy.run_path(str(REPO / "reward" / "score.py"), run_name="score_format")
    args = ["--reward_model", str(tiny_reward_model), "--input", str(source), "--output", str(tmp_path / "o.jsonl"),
            "--dtype", "float32"]
    entry["main"](*entry["make_parser"]().parse(args))
    assert json.loads((tmp_path / "o.jsonl").read_text())["reward"] == pytest.approx(trained_format[0])


def test_pairs_are_grouped_by_their_padded_length(tiny_pairs, tmp_path):
    """group_by_length on a preference dataset: lengths are prompt + longer side; each pair once per epoch."""
    from datasets import Dataset
    from trl import RewardConfig

    from clinalign.models import ensure_pad_token, load_tokenizer
    from clinalign.rewards import LengthGroupedRewardTrainer
    from clinalign.sampling import BucketedLengthSampler, pair_lengths

    rows = [json.loads(line) for line in tiny_pairs.read_text().splitlines()]
    model, tokenizer = reward_backbone("tiny-llama"), load_tokenizer("tiny-llama")
    ensure_pad_token(tokenizer, model)
    args = RewardConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                        per_device_train_batch_size=4, train_sampling_strategy="group_by_length")
    data = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    trainer = LengthGroupedRewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(data),
                                         processing_class=tokenizer)
    sampler = trainer._get_train_sampler()
    assert type(sampler) is BucketedLengthSampler
    dataset = trainer.train_dataset
    expected = [max(len(c), len(r)) for c, r in zip(dataset["chosen_ids"], dataset["rejected_ids"], strict=True)]
    assert sampler.lengths == pair_lengths(dataset) == expected  # the RM's chosen_ids already hold the prompt
    torch.manual_seed(0)
    order = list(sampler)
    assert sorted(order) == list(range(len(rows)))

    def padded(order):
        batches = [order[i : i + 4] for i in range(0, len(order), 4)]
        return sum(len(b) * max(expected[j] for j in b) - sum(expected[j] for j in b) for b in batches)

    shuffled = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    assert padded(order) < padded(shuffled)


def test_pair_accuracy_per_axis_reaches_tensorboard(tiny_pairs, tiny_heldout_pairs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    entry = runpy.run_path(str(REPO / "reward" / "train.py"), run_name="rm_tensorboard")
    args = ["--config", str(REPO / "configs/reward/tiny.yaml"), "--pairs", str(tiny_pairs), "--output_dir",
            str(tmp_path), "--max_steps", "1", "--eval_pairs", str(tiny_heldout_pairs), "--report_to", "tensorboard"]
    metrics = entry["main"](*entry["make_parser"]().parse(args))
    values = {}
    for folder in {p.parent for p in tmp_path.glob("runs/*/events.out.tfevents.*")}:
        accumulator = EventAccumulator(str(folder))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values[tag] = accumulator.Scalars(tag)[-1].value
    assert "train/loss" in values
    assert {"overall", "factuality"} <= set(metrics["eval"])
    for axis in metrics["eval"]:
        assert values[f"eval/reward/pair_accuracy/{axis}/accuracy"] == pytest.approx(metrics["eval"][axis]["accuracy"])
        assert values[f"eval/reward/pair_accuracy/{axis}/n"] == metrics["eval"][axis]["n"]


def test_two_identical_runs_train_the_same_reward_model(tiny_pairs, tmp_path):
    # The score head and the LoRA are initialised before the Trainer seeds; whatever the process did
    # before (here: a different global RNG state), the same config must give the same weights.
    entry = runpy.run_path(str(REPO / "reward" / "train.py"), run_name="rm_seeded")
    weights = []
    for run, disturb in enumerate((1, 2)):
        torch.manual_seed(disturb)
        out = tmp_path / str(run)
        args = ["--config", str(REPO / "configs/reward/tiny.yaml"), "--pairs", str(tiny_pairs),
                "--output_dir", str(out), "--max_steps", "1"]  # fmt: skip
        entry["main"](*entry["make_parser"]().parse(args))
        weights.append(load_file(str(out / "adapter_model.safetensors")))
    assert weights[0].keys() == weights[1].keys() and any("score" in k for k in weights[0])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_length_sorted_scoring_keeps_each_score_with_its_response(tiny_reward_model):
    # score_responses batches by length, not in input order: every score must still land on its own row.
    model, tokenizer = load_reward_model(str(tiny_reward_model), dtype="float32")
    prompts = [[{"role": "user", "content": "dose " * n}] for n in (3, 40, 1, 25, 8)]
    responses = ["take it " * m for m in (30, 2, 12, 5, 1)]
    one_by_one = [score_responses(model, tokenizer, [p], [r], batch_size=1)[0] for p, r in zip(prompts, responses)]
    batched = score_responses(model, tokenizer, prompts, responses, batch_size=2)
    assert batched == pytest.approx(one_by_one, abs=1e-4)
    assert score_responses(model, tokenizer, prompts[::-1], responses[::-1], batch_size=2)[::-1] == pytest.approx(batched, abs=1e-4)
    assert len(set(round(s, 4) for s in batched)) > 1  # distinct inputs, distinct scores: a mix-up would show


def test_reward_scoring_benchmark_scores_the_same_sequences_both_ways(monkeypatch, capsys):
    # benchmarks/reward_scoring.py on the tiny model: both paths run and agree score for score.
    monkeypatch.setattr("sys.argv", ["reward_scoring.py", "--model", "tiny-llama", "--repeat", "1", "--batch_size", "8"])
    runpy.run_path(str(REPO / "benchmarks" / "reward_scoring.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[reward_scoring] 119 sequences")  # 40 held-out questions + 79 safety prompts
    assert float(lines[-1].rsplit(" ", 1)[-1]) < 0.05  # largest score difference: rounding only


def test_lora_top_layers_trains_the_last_layers_only_and_reloads(tiny_pairs, tmp_path):
    from clinalign.errors import ConfigError

    entry = runpy.run_path(str(REPO / "reward" / "train.py"), run_name="rm_top_layers")
    args = ["--config", str(REPO / "configs/reward/tiny.yaml"), "--pairs", str(tiny_pairs), "--output_dir",
            str(tmp_path), "--max_steps", "2", "--learning_rate", "1e-2", "--lora_top_layers", "1"]  # fmt: skip
    entry["main"](*entry["make_parser"]().parse(args))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    lora = {k: v for k, v in saved.items() if "lora_" in k}
    assert lora and all(".layers.1." in k for k in lora)  # the tiny Llama has layers 0 and 1
    assert all(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at zero: it moved
    assert json.loads((tmp_path / "adapter_config.json").read_text())["layers_to_transform"] == [1]
    load_reward_model(str(tmp_path), dtype="float32")  # rebuilds with the saved layer choice
    with pytest.raises(ConfigError, match="lora_top_layers must be between 1 and the model's 2 layers, got 3"):
        entry["main"](*entry["make_parser"]().parse(args[:-1] + ["3"]))
