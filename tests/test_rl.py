"""DPO and PPO against the SFT reference, the adaptive KL controller, and the KL-coefficient grid."""

from __future__ import annotations

import json
import math
import runpy
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clinalign import compat
from clinalign.kl_control import AdaptiveKLController, KLControlCallback

REPO = Path(__file__).resolve().parents[1]


def entry(script: str) -> dict:
    return runpy.run_path(str(REPO / script), run_name="rl_test")


def run_main(script: str, *args: str):
    module = entry(script)
    return module["main"](*module["make_parser"]().parse(list(args)))


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


# ---- the adaptive KL controller: hand-worked numbers ------------------------------------------------


@pytest.mark.parametrize(
    ("measured", "expected"),
    [
        (12.0, 0.1 * (1 + 0.2 * 256 / 10000)),  # KL twice the target: error clipped to +0.2, beta grows
        (6.6, 0.1 * (1 + 0.1 * 256 / 10000)),  # 10% above target: +0.1
        (6.0, 0.1),  # on target: unchanged
        (3.0, 0.1 * (1 - 0.2 * 256 / 10000)),  # half the target: clipped to -0.2, beta shrinks
    ],
)
def test_controller_update(measured, expected):
    controller = AdaptiveKLController(coef=0.1, target=6.0, horizon=10000)
    assert controller.update(measured, n_sequences=256) == pytest.approx(expected, rel=1e-12)


def kl_trainer(beta: float):
    """What the callback reads and writes on TRL's RLOOTrainer: `beta`, the metric buffer, `model.training`."""
    from collections import defaultdict

    return types.SimpleNamespace(beta=beta, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                                 model=torch.nn.Linear(1, 1))


def generated(trainer, kl_per_token: float, mean_length: float):
    """One generated batch, as RLOOTrainer records it in its buffer."""
    trainer._metrics["train"]["completions/mean_length"].append(mean_length)
    trainer._metrics["train"]["kl"].append(kl_per_token)


def test_callback_updates_beta_on_every_generated_batch_not_per_log_window():
    """Ziegler's controller, hand-worked: target 1 nat/seq, horizon 8 sequences, 4 sequences per batch.

    With logging_steps 3 a log window holds three batches; each moves beta (the old callback moved
    it once per log, on the window's average, so three times slower than the horizon says).
    """
    trainer = kl_trainer(0.1)
    callback = KLControlCallback(trainer, AdaptiveKLController(0.1, target=1.0, horizon=8), sequences_per_batch=4)
    state = types.SimpleNamespace(global_step=0, log_history=[])
    expected = 0.1
    for step, (kl, length) in enumerate([(0.1, 20.0), (0.05, 22.0), (0.02, 20.0)], start=1):
        generated(trainer, kl, length)  # 2.0 nats/seq (error +0.2), 1.1 (+0.1), 0.4 (-0.2)
        state.global_step = step
        callback.on_step_end(None, state, None)
        expected *= 1 + min(max(kl * length / 1.0 - 1, -0.2), 0.2) * 4 / 8
        assert trainer.beta == pytest.approx(expected, rel=1e-12)
    assert trainer.beta == pytest.approx(0.1 * 1.1 * 1.05 * 0.9, rel=1e-12)
    callback.on_step_end(None, state, None)  # a step that reused its batch (num_iterations > 1): no update
    assert len(callback.history) == 3
    # Each batch's per-sequence KL and the beta its rewards used join TRL's buffer, averaged at log time.
    assert trainer._metrics["train"]["kl_per_sequence"] == pytest.approx([2.0, 1.1, 0.4])
    assert trainer._metrics["train"]["kl_coef"] == pytest.approx([0.1, 0.11, 0.1155])

    callback.on_log(None, state, None, logs={})
    trainer._metrics["train"].clear()  # what TRL does right after on_log
    generated(trainer, 0.1, 10.0)  # 1.0 nat/seq: on target
    callback.on_step_end(None, state, None)
    assert len(callback.history) == 4 and trainer.beta == pytest.approx(0.1 * 1.1 * 1.05 * 0.9)

    fixed = kl_trainer(0.05)
    off = KLControlCallback(fixed, None, 4)
    generated(fixed, 1.0, 9.0)
    off.on_step_end(None, state, None)
    assert fixed.beta == 0.05 and off.history[0]["kl_per_sequence"] == 9.0  # controller off: a fixed coefficient


def test_callback_state_round_trips_through_the_trainer_state():
    from transformers import TrainerState

    trainer = kl_trainer(0.1)
    callback = KLControlCallback(trainer, AdaptiveKLController(0.1, target=1.0, horizon=8), sequences_per_batch=4)
    generated(trainer, 0.1, 20.0)
    callback.on_step_end(None, types.SimpleNamespace(global_step=1), None)
    saved = TrainerState(stateful_callbacks=[callback]).stateful_callbacks  # what a checkpoint stores

    resumed_trainer = kl_trainer(0.1)  # the configured start value
    resumed = KLControlCallback(resumed_trainer, AdaptiveKLController(0.1, 1.0, 8), 4)
    resumed.on_train_begin(None, types.SimpleNamespace(stateful_callbacks=saved), None)
    assert resumed_trainer.beta == resumed.controller.coef == pytest.approx(0.11)
    assert resumed.history == callback.history


# ---- DPO ----------------------------------------------------------------------------------------


def dpo_args(tmp_path, tiny_pairs, tiny_sft_adapter, *extra):
    return ["--config", str(REPO / "configs/rl/tiny_dpo.yaml"), "--pairs", str(tiny_pairs),
            "--sft_adapter", str(tiny_sft_adapter), "--output_dir", str(tmp_path),
            "--eval_data", str(REPO / "clinalign/sample_data/medmcqa_train.jsonl"), "--eval_max_records", "2", *extra]


def sequence_logps(model, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def test_fused_head_scores_only_labelled_positions_with_the_same_values(tiny_llama, monkeypatch):
    """On a CPU TRL's fused LM head projects every position; clinalign makes it project only the labelled ones."""
    import trl.trainer.utils as trl_utils
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton

    from clinalign import models

    monkeypatch.setattr(trl_utils, "_use_triton", _use_triton)  # TRL's own, whatever ran before; restored after
    model = models.load_causal_lm("tiny-llama")
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :8] = -100  # the prompt: 7 of the 11 scored positions are masked
    labels[1, -1] = -100  # and a padded completion token

    rows = []
    original = ChunkedLogProbFunction.apply
    monkeypatch.setattr(ChunkedLogProbFunction, "apply", lambda hidden, *a: rows.append(len(hidden)) or original(hidden, *a))
    full = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    compat.score_only_labelled_positions()
    compact = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert rows == [2 * 11, 4 + 3]  # every shifted position, then only the labelled ones
    for field in ("log_probs", "entropy", "mean_logits", "is_top1"):
        torch.testing.assert_close(getattr(compact, field), getattr(full, field))
    assert (compact.log_probs[:, :7] == 0).all() and (compact.log_probs[:, 7:10] < 0).all()
    torch.testing.assert_close(compact.loss, full.loss)


def test_a_fresh_dpo_lora_starts_from_the_seeded_init(tmp_path, tiny_pairs, tiny_sft_adapter):
    # Without an SFT adapter DPO creates a LoRA before the Trainer seeds: it must still follow `seed`.
    from trl import DPOConfig

    from clinalign.config import ModelArgs, Parser
    from clinalign.dpo import DPOArgs, build_dpo_trainer
    from clinalign.preferences import read_pairs, split_pairs

    dpo_args_, training_args, model_args = Parser([DPOArgs, DPOConfig, ModelArgs]).parse(
        dpo_args(tmp_path, tiny_pairs, tiny_sft_adapter)
    )
    dpo_args_.sft_adapter = None
    train_rows, eval_rows = split_pairs(read_pairs(dpo_args_.pairs), 0.2)
    inits = []
    for disturb in (1, 2):
        torch.manual_seed(disturb)
        trainer = build_dpo_trainer(dpo_args_, training_args, model_args, train_rows, eval_rows)
        inits.append({k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_A" in k})
    assert inits[0] and inits[0].keys() == inits[1].keys()
    assert all(torch.equal(inits[0][k], inits[1][k]) for k in inits[0])


def test_a_fresh_ppo_lora_starts_from_the_seeded_init(tmp_path):
    from trl import RLOOConfig

    from clinalign.config import ModelArgs, Parser
    from clinalign.data import load_records
    from clinalign.ppo import PPOArgs, build_ppo_trainer, rl_prompts

    ppo_args, training_args, model_args = Parser([PPOArgs, RLOOConfig, ModelArgs]).parse(
        ["--config", str(REPO / "configs/rl/tiny_ppo.yaml"), "--output_dir", str(tmp_path)]
    )
    ppo_args.sft_adapter, ppo_args.reward_model = None, None
    records = load_records(str(REPO / "clinalign/sample_data/medqa_us_test.jsonl")).records
    prompts = rl_prompts(records, [], ppo_args.eval_fraction, ppo_args.max_prompts)
    inits = []
    for disturb in (1, 2):
        torch.manual_seed(disturb)
        trainer, _ = build_ppo_trainer(ppo_args, training_args, model_args, prompts)
        inits.append({k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_A" in k})
    assert inits[0] and inits[0].keys() == inits[1].keys()
    assert all(torch.equal(inits[0][k], inits[1][k]) for k in inits[0])


def test_dpo_moves_the_policy_and_keeps_the_sft_reference_frozen(tmp_path, tiny_pairs, tiny_sft_adapter):
    from trl import DPOConfig

    from clinalign.config import ModelArgs, Parser
    from clinalign.dpo import DPOArgs, build_dpo_trainer
    from clinalign.models import load_policy
    from clinalign.preferences import read_pairs, split_pairs

    dpo_args_, training_args, model_args = Parser([DPOArgs, DPOConfig, ModelArgs]).parse(
        dpo_args(tmp_path, tiny_pairs, tiny_sft_adapter, "--train_sampling_strategy", "group_by_length")
    )
    train_rows, eval_rows = split_pairs(read_pairs(dpo_args_.pairs), 0.2)
    trainer = build_dpo_trainer(dpo_args_, training_args, model_args, train_rows, eval_rows)
    model, tokenizer = trainer.model, trainer.processing_class
    # Length-grouped batches: a DPO pair pads to its prompt plus its longer side (prompt_ids are apart).
    data = trainer.train_dataset
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])]
    assert trainer._get_train_sampler().lengths == lengths
    text = "Answer: A. Long thoracic nerve\nExplanation: it supplies serratus anterior."
    sft_policy, _ = load_policy("tiny-llama", tiny_sft_adapter, dtype="float32")

    def logps(adapter):
        model.set_adapter(adapter)
        try:
            return sequence_logps(model, tokenizer, text)
        finally:
            model.set_adapter("default")

    assert set(model.peft_config) == {"default", "ref"}  # TRL copied the SFT adapter as the reference
    ref_before, policy_before = logps("ref"), logps("default")
    assert torch.allclose(ref_before, sequence_logps(sft_policy, tokenizer, text), atol=1e-5)  # ref == SFT policy
    # Eval batches are length-grouped too. Before training the policy is the reference: every implicit
    # reward is 0 and the DPO loss is -log sigmoid(0) = log 2.
    assert abs(trainer.evaluate()["eval_loss"] - math.log(2)) < 1e-3
    trainer.train()
    # Accelerate wrapped forward in bf16 autocast for training; compare in the precision measured before.
    trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    model.eval()
    assert torch.equal(logps("ref"), ref_before)  # the reference did not move
    assert not torch.allclose(logps("default"), policy_before)  # the policy did


def test_dpo_pairs_split_by_question_and_cap_the_held_out_ones(tiny_pairs):
    from clinalign.dpo import DPOArgs, dpo_pairs

    rows = [json.loads(line) for line in tiny_pairs.read_text().splitlines()]
    train, held = dpo_pairs(DPOArgs(pairs=str(tiny_pairs), pairs_eval_fraction=0.5))
    assert len(train) + len(held) == len(rows) and len(held) > 2
    assert not {r["group"] for r in train} & {r["group"] for r in held}
    capped_train, capped = dpo_pairs(DPOArgs(pairs=str(tiny_pairs), pairs_eval_fraction=0.5, pairs_eval_max=2))
    assert capped == held[:2] and capped_train == train  # the cap never moves a pair into training


def tensorboard_scalars(output_dir: Path) -> dict[str, list]:
    """Every scalar tag the run's TensorBoard event files (output_dir/runs/...) hold, with its events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for folder in {p.parent for p in output_dir.glob("runs/*/events.out.tfevents.*")}:
        accumulator = EventAccumulator(str(folder))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(accumulator.Scalars(tag))
    return scalars


def test_dpo_script_reports_before_and_after(tmp_path, tiny_pairs, tiny_sft_adapter):
    metrics = run_main("rl/dpo.py", *dpo_args(tmp_path, tiny_pairs, tiny_sft_adapter), "--report_to", "tensorboard")
    # clinalign's held-out measurements reach the tracker beside TRL's loss, at the last step.
    scalars = tensorboard_scalars(tmp_path)
    assert "train/loss" in scalars
    for tag in ("eval/dpo/before/safety/safety_score", "eval/dpo/after/safety/safety_score",
                "eval/dpo/after/overall/kl_k3", "eval/dpo/before/medmcqa/mc_acc", "eval/dpo/after/medmcqa/mc_acc"):
        assert tag in scalars, sorted(scalars)
    assert scalars["eval/dpo/after/overall/kl_k3"][-1].value == pytest.approx(
        metrics["held_out"]["after"]["overall"]["kl_k3"], rel=1e-6)
    assert scalars["eval/dpo/after/overall/kl_k3"][-1].step == 2
    assert not any("/items/" in tag for tag in scalars)  # per-item values stay in metrics.json
    # After vs before, paired on the same held-out prompts, with a verdict.
    paired = metrics["comparison"]["metrics"]["safety_score"]
    assert paired["n"] == metrics["held_out"]["after"]["safety"]["n"] and paired["test"] == "paired-permutation"
    assert paired["verdict"] in ("better", "worse", "no detectable change")
    before, after = metrics["held_out"]["before"], metrics["held_out"]["after"]
    assert 0 <= before["safety"]["safety_score"] <= 1 and 0 <= after["safety"]["safety_score"] <= 1
    assert after["overall"]["kl_k3"] >= 0 and "kl_k1" in after["overall"]
    assert "mc_acc" in after["medmcqa"] and "gen_acc" in after["medmcqa"]
    assert any("rewards/margins" in h for h in metrics["log_history"])
    saved, sft = lora_tensors(tmp_path), lora_tensors(tiny_sft_adapter)
    moved = [k for k in sft if k in saved and not torch.equal(saved[k], sft[k])]
    assert moved, "DPO must change the SFT adapter's weights"
    assert json.loads((tmp_path / "metrics.json").read_text())["beta"] == 0.1
    assert (tmp_path / "config.yaml").is_file()


# ---- PPO-clip (RLOO) ------------------------------------------------------------------------------


def test_ppo_with_reward_model_rule_rewards_and_adaptive_kl(tmp_path, tiny_sft_adapter, tiny_reward_model):
    args = ["--config", str(REPO / "configs/rl/tiny_ppo.yaml"), "--sft_adapter", str(tiny_sft_adapter),
            "--reward_model", str(tiny_reward_model), "--output_dir", str(tmp_path),
            "--kl_target", "0.5", "--kl_horizon", "10", "--max_steps", "4", "--logging_steps", "4",
            "--report_to", "tensorboard"]
    trainer = run_main("rl/ppo.py", *args)
    scalars = tensorboard_scalars(tmp_path)  # the controller's numbers reach the tracker beside TRL's
    assert {"train/reward", "train/kl", "train/kl_coef", "train/kl_per_sequence"} <= set(scalars), sorted(scalars)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    first = metrics["log_history"][0]
    for component in ("reward_model", "factuality_reward", "safety_reward"):
        assert f"rewards/{component}/mean" in first  # each component logged separately
    assert {"reward", "kl", "entropy", "clip_ratio/region_mean", "completions/mean_length"} <= set(first)
    history = metrics["kl_controller"]
    assert history and history[0]["kl_coef"] == 0.05
    assert "kl_coef" in first and "kl_per_sequence" in first
    # The controller acted on the measured KL: above target raises beta, below lowers it.
    direction = 1 if history[-1]["kl_per_sequence"] > 0.5 else -1
    assert (metrics["final_kl_coef"] - history[-1]["kl_coef"]) * direction > 0
    # 4 steps, 2 passes per generated batch: 2 batches in one log window, and beta moved on each.
    assert len(history) == 2 and len(metrics["log_history"]) >= 1
    expected = 0.05
    for batch in history:
        expected *= 1 + min(max(batch["kl_per_sequence"] / 0.5 - 1, -0.2), 0.2) * trainer.args.generation_batch_size / 10
    assert metrics["final_kl_coef"] == pytest.approx(expected, rel=1e-9)
    # The logged kl_coef is the window's mean of the betas its batches were penalised with.
    assert scalars["train/kl_coef"][-1].value == pytest.approx(sum(b["kl_coef"] for b in history) / 2, rel=1e-6)
    assert (tmp_path / "training_curves.png").stat().st_size > 0
    saved, sft = lora_tensors(tmp_path), lora_tensors(tiny_sft_adapter)
    assert any(not torch.equal(saved[k], sft[k]) for k in sft if k in saved), "PPO must update the policy"
    assert trainer.args.num_iterations >= 2


def test_ppo_refuses_a_single_pass_or_no_kl(tmp_path):
    from clinalign.errors import ConfigError

    base = ["--config", str(REPO / "configs/rl/tiny_ppo.yaml"), "--output_dir", str(tmp_path)]
    with pytest.raises(ConfigError, match="num_iterations must be >= 2"):
        run_main("rl/ppo.py", *base, "--num_iterations", "1")
    with pytest.raises(ConfigError, match="beta"):
        run_main("rl/ppo.py", *base, "--beta", "0")


# ---- tune_kl --------------------------------------------------------------------------------------


def test_choose_respects_the_kl_budget():
    choose = entry("rl/tune_kl.py")["choose"]
    rows = [{"beta": 0.01, "kl_k3": 9.0, "rm_score": 0.9}, {"beta": 0.1, "kl_k3": 3.0, "rm_score": 0.7},
            {"beta": 1.0, "kl_k3": 0.5, "rm_score": 0.4}]
    assert choose(rows, "rm_score", "kl_k3", None) == (rows[0], True, [])
    assert choose(rows, "rm_score", "kl_k3", 5.0) == (rows[1], True, [])
    assert choose(rows, "rm_score", "kl_k3", 0.1) == (rows[2], False, [])  # none fits: the lowest KL


def test_choose_takes_the_most_conservative_beta_of_a_tie():
    choose = entry("rl/tune_kl.py")["choose"]

    def row(beta, kl, value, low, high):
        return {"beta": beta, "kl_k3": kl, "rm_score": value,
                "intervals": {"rm_score": {"value": value, "low": low, "high": high, "n": 40}}}

    # 0.01 is best by its point, but 0.1's interval overlaps it: a tie, and 0.1 (less KL) is taken;
    # 1.0's interval lies wholly below the best one's, so it is not part of the tie.
    rows = [row(0.01, 6.0, 0.62, 0.55, 0.69), row(0.1, 2.0, 0.58, 0.50, 0.66), row(1.0, 0.4, 0.30, 0.22, 0.38)]
    assert choose(rows, "rm_score", "kl_k3", None) == (rows[1], True, [0.01, 0.1])
    # Separated intervals: no tie, the best point wins.
    rows[1]["intervals"]["rm_score"].update(low=0.45, high=0.54)
    assert choose(rows, "rm_score", "kl_k3", None) == (rows[0], True, [])


def test_tune_kl_over_three_betas(tmp_path, tiny_pairs, tiny_sft_adapter):
    base = yaml.safe_load((REPO / "configs/rl/tiny_dpo.yaml").read_text())
    base.update(pairs=str(tiny_pairs), sft_adapter=str(tiny_sft_adapter), eval_max_records=2, report_to="tensorboard",
                eval_data=[str(REPO / "clinalign/sample_data/medmcqa_train.jsonl")])
    base_config = tmp_path / "base.yaml"
    base_config.write_text(yaml.safe_dump(base))
    out = tmp_path / "grid"
    result = run_main("rl/tune_kl.py", "--config", str(REPO / "configs/rl/tiny_tune_kl.yaml"),
                      "--base_config", str(base_config), "--output_dir", str(out), "--eval_max_records", "2",
                      "--kl_max_prompts", "3", "--max_generated_per_dataset", "1")
    assert [r["beta"] for r in result["rows"]] == [0.03, 0.3, 1.0]
    table = [line for line in (out / "frontier.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3 and sum(line.endswith("| yes |") for line in table) == 1
    assert (out / "frontier.png").stat().st_size > 0
    frontier = json.loads((out / "frontier.json").read_text())
    assert frontier["chosen_beta"] == result["chosen"]["beta"] and frontier["tie"] == result["tie"]
    # Every beta trained as long as the base config says (no shortened grid runs), measured with intervals.
    assert all(r["steps"] == base["max_steps"] for r in result["rows"])
    for r in result["rows"]:
        # Measured as configured: KL on 3 prompts (1 question, 2 safety prompts), not a default count.
        assert r["intervals"]["kl_k3"]["n"] == 3 and r["intervals"]["safety_score"]["n"] >= 1
        # Generated answers capped as eval caps them (1 of the 2 questions); multiple choice scores both.
        assert r["intervals"]["gen_acc"]["n"] == 1 and r["intervals"]["mc_acc"]["n"] == 2
    # Held-out preference accuracy (the objective here is safety_score): the chosen run's only, on the 4 pairs.
    for r in result["rows"]:
        measured = r["intervals"].get("preference_accuracy")
        assert (measured is not None) == (r is result["chosen"]), r["beta"]
    assert result["chosen"]["intervals"]["preference_accuracy"]["n"] == 4
    assert "the chosen run's only" in (out / "frontier.md").read_text()
    # Each beta's measurements reached its run's tracker, interval bounds included.
    first = result["rows"][0]
    scalars = tensorboard_scalars(Path(first["adapter"]))
    assert scalars["eval/tune_kl/beta_0.03/kl_k3/value"][-1].value == pytest.approx(first["kl_k3"])
    assert "eval/tune_kl/beta_0.03/kl_k3/high" in scalars
    report = (out / "frontier.md").read_text()
    assert "Rule:" in report and ("A tie:" in report or "Not a tie" in report)
    # The chosen run's adapter is kept as the result: the same weights as that beta's own run.
    chosen_dir = out / "chosen"
    assert (chosen_dir / "clinalign_base.json").is_file()
    assert lora_tensors(chosen_dir).keys() == lora_tensors(Path(result["chosen"]["adapter"])).keys()
    assert all(torch.equal(v, lora_tensors(Path(result["chosen"]["adapter"]))[k])
               for k, v in lora_tensors(chosen_dir).items())
    # The chosen config is one rl/dpo.py accepts as it is, with the chosen beta.
    chosen = entry("rl/dpo.py")["make_parser"]().parse(["--config", str(out / "chosen_dpo.yaml")])
    assert chosen[1].beta == result["chosen"]["beta"]
    assert chosen[0].pairs == str(tiny_pairs)


def test_the_chosen_runs_preference_accuracy_is_the_one_its_own_trainer_gave(
    tmp_path, tiny_pairs, tiny_sft_adapter, monkeypatch
):
    # Measured after the grid from a rebuilt trainer (SFT policy, the run's weights loaded), it must equal the
    # pair eval the run's own trainer makes right after training (preference_every_beta).
    base = yaml.safe_load((REPO / "configs/rl/tiny_dpo.yaml").read_text())
    base.update(pairs=str(tiny_pairs), sft_adapter=str(tiny_sft_adapter), eval_max_records=2, learning_rate=5e-2,
                report_to="tensorboard",
                eval_data=[str(REPO / "clinalign/sample_data/medmcqa_train.jsonl")])  # fmt: skip
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    tune_kl = entry("rl/tune_kl.py")
    result = run_main("rl/tune_kl.py", "--config", str(REPO / "configs/rl/tiny_tune_kl.yaml"),
                      "--base_config", str(tmp_path / "base.yaml"), "--output_dir", str(tmp_path / "grid"),
                      "--grid", "0.3", "--preference_every_beta", "true", "--eval_max_records", "2",
                      "--kl_max_prompts", "2", "--max_generated_per_dataset", "1")  # fmt: skip
    row = result["rows"][0]
    after_training = row["intervals"]["preference_accuracy"]
    configs = tune_kl["method_parser"]("dpo").parse(
        ["--config", str(tmp_path / "base.yaml"), "--beta", "0.3", "--output_dir", str(tmp_path / "again"),
         "--pairs_eval_max", "4", "--save_strategy", "no"])  # fmt: skip
    scratch = tmp_path / "cwd"
    scratch.mkdir()
    monkeypatch.chdir(scratch)  # its trainer never trains: trackers must still log inside its run folder
    rebuilt = tune_kl["preference_accuracy"](configs, row["adapter"])
    assert rebuilt == after_training and rebuilt["n"] == 4
    assert list(scratch.iterdir()) == []
    assert any((tmp_path / "again").rglob("events.out.tfevents.*"))
    # The SFT policy against itself has zero rewards and no accurate pair: the run's weights were loaded.
    assert after_training["value"] > 0


def test_eval_takes_tune_kls_measurement_of_the_chosen_adapter_only_when_everything_matches(
    tmp_path, tiny_pairs, tiny_sft_adapter, tiny_reward_model, capsys, monkeypatch
):
    from clinalign.evaluation import kl_to_reference

    # tune_kl stores what eval would measure for each beta's adapter; eval takes the chosen one's instead of
    # measuring it again. Its numbers must be the ones eval measures itself, and any difference in what the
    # measurement depends on (here: generated tokens) must make eval measure afresh.
    data = str(REPO / "clinalign/sample_data/medmcqa_train.jsonl")
    base = yaml.safe_load((REPO / "configs/rl/tiny_dpo.yaml").read_text())
    base.update(pairs=str(tiny_pairs), sft_adapter=str(tiny_sft_adapter), reward_model=str(tiny_reward_model),
                eval_data=[data])  # fmt: skip
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    grid = yaml.safe_load((REPO / "configs/rl/tiny_tune_kl.yaml").read_text())
    grid.update(base_config=str(tmp_path / "base.yaml"), grid=[0.3], objective="rm_score", eval_max_records=None,
                eval_max_safety_prompts=None, output_dir=str(tmp_path / "grid"), kl_max_prompts=3,
                max_generated_per_dataset=2)  # fmt: skip
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    run_main("rl/tune_kl.py", "--config", str(tmp_path / "grid.yaml"))
    chosen = tmp_path / "grid" / "chosen"
    assert (chosen / "measurement.json").is_file()

    def evaluate(name: str, *extra: str) -> dict:
        config = {
            "models": [{"name": "sft", "base": "tiny-llama", "adapter": str(tiny_sft_adapter)},
                       {"name": "dpo", "base": "tiny-llama", "adapter": str(chosen)}],
            "data": [data], "reward_model": str(tiny_reward_model),
            "reference": {"base": "tiny-llama", "adapter": str(tiny_sft_adapter)},
            "dtype": "float32", "batch_size": 8, "max_new_tokens": 8, "kl_max_new_tokens": 8, "kl_max_prompts": 3,
            "max_generated_per_dataset": 2, "output_dir": str(tmp_path / name),
        }  # fmt: skip
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        capsys.readouterr()
        return run_main("eval/run.py", "--config", str(tmp_path / f"{name}.yaml"), *extra)

    import clinalign.policy_eval as policy_eval

    sampled_kl = []
    monkeypatch.setattr(policy_eval, "kl_to_reference",
                        lambda model, *a, **kw: sampled_kl.append(model) or kl_to_reference(model, *a, **kw))  # fmt: skip
    taken = evaluate("taken")
    out = capsys.readouterr().out
    # The sft model is the KL reference: KL 0 on each of the 3 KL prompts, recorded, not sampled.
    assert sampled_kl == [] and taken["sft"]["headline"]["kl_k3"]["value"] == 0.0
    assert set(taken["sft"]["items"]["overall"]["kl_k3"].values()) == {0.0} and taken["sft"]["headline"]["kl_k3"]["n"] == 3
    assert "[eval] dpo: the measurement in" in out and "taken, not measured again" in out
    assert "[eval] sft: the measurement" not in out  # an SFT stage has none: measured
    assert "not measured again: dpo." in (tmp_path / "taken" / "report.md").read_text()
    measured = evaluate("measured", "--reuse_measurements", "false")
    assert len(sampled_kl) == 1  # dpo, now measured here
    assert "taken, not measured again" not in capsys.readouterr().out
    headline_taken, headline_measured = taken["dpo"]["headline"], measured["dpo"]["headline"]
    assert set(headline_taken) == set(headline_measured) and {"rm_score", "kl_k3", "safety_score"} <= set(headline_taken)
    for metric, iv in headline_measured.items():
        assert headline_taken[metric]["n"] == iv["n"], metric
        assert headline_taken[metric]["value"] == pytest.approx(iv["value"], abs=1e-5), metric
    assert taken["dpo"]["comparison"]["metrics"].keys() == measured["dpo"]["comparison"]["metrics"].keys()
    evaluate("other", "--max_new_tokens", "6")
    assert "was made with something else: measuring" in capsys.readouterr().out
