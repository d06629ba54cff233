"""The reward model, DPO and PPO resume after a kill; PPO's adaptive KL coefficient comes back with
the checkpoint; a checkpoint from another run is refused with one line."""

from __future__ import annotations

import json
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clinalign.errors import ClinalignError

REPO = Path(__file__).resolve().parents[1]
STEPS = 12  # enough steps that the kill lands mid-run; each one is a fraction of a second on the tiny model
SAVE = ["--save_strategy", "steps", "--save_steps", "1", "--max_steps", str(STEPS), "--logging_steps", "1"]


def reward_command(out: Path, pairs: Path, sft: Path, reward: Path) -> list[str]:
    return ["reward/train.py", "--config", "configs/reward/tiny.yaml", "--pairs", str(pairs), "--output_dir", str(out)]


def dpo_command(out: Path, pairs: Path, sft: Path, reward: Path) -> list[str]:
    return ["rl/dpo.py", "--config", "configs/rl/tiny_dpo.yaml", "--pairs", str(pairs), "--sft_adapter", str(sft),
            "--output_dir", str(out), "--eval_max_records", "1", "--eval_max_safety_prompts", "1",
            "--per_device_train_batch_size", "2"]


def ppo_command(out: Path, pairs: Path, sft: Path, reward: Path) -> list[str]:
    return ["rl/ppo.py", "--config", "configs/rl/tiny_ppo.yaml", "--sft_adapter", str(sft), "--reward_model",
            str(reward), "--output_dir", str(out), "--kl_target", "0.5", "--kl_horizon", "10"]


def kill_after_second_checkpoint(command: list[str], out: Path) -> list[int]:
    """Run the script, SIGKILL it once checkpoint-2 is complete; the steps of the complete checkpoints."""
    log = out.parent / f"{out.name}.killed.log"  # a file, not a pipe: a full pipe would stall the run
    process = subprocess.Popen([sys.executable, *command], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=log.open("w"))
    marker = out / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {log.read_text()[-2000:]}"
    complete = []
    for path in out.glob("checkpoint-*/trainer_state.json"):
        try:
            json.loads(path.read_text())
            complete.append(int(path.parent.name.split("-")[1]))
        except ValueError:
            pass  # half-written by the kill: the rerun must discard it
    return sorted(complete)


@pytest.mark.parametrize("script", ["reward", "dpo", "ppo"])
def test_kill_then_resume_continues_the_step_history(script, tmp_path, tiny_pairs, tiny_sft_adapter, tiny_reward_model):
    out = tmp_path / script
    command = {"reward": reward_command, "dpo": dpo_command, "ppo": ppo_command}[script](
        out, tiny_pairs, tiny_sft_adapter, tiny_reward_model) + SAVE
    complete = kill_after_second_checkpoint(command, out)
    last = max(complete)
    saved_state = json.loads((out / f"checkpoint-{last}" / "trainer_state.json").read_text())

    rerun = subprocess.run([sys.executable, *command, "--resume_from_checkpoint", "true"], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(out / f"checkpoint-{last}")  # the newest complete one
    history = metrics["train"] if script == "reward" else metrics["log_history"]
    logged = [e["step"] for e in history if "loss" in e]
    assert logged == list(range(1, STEPS + 1))  # the killed run's steps, then the resumed ones: no repeat, no gap
    final_state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert final_state["global_step"] == STEPS
    assert final_state["log_history"][:last] == saved_state["log_history"][:last]

    if script == "ppo":
        # The coefficient the controller had reached at the checkpoint, not the configured 0.05.
        kl_saved = saved_state["stateful_callbacks"]["KLControlCallback"]["attributes"]
        assert kl_saved["kl_coef"] != 0.05
        resumed = [b for b in metrics["kl_controller"] if b["step"] >= last]
        assert resumed[0]["kl_coef"] == pytest.approx(kl_saved["kl_coef"], rel=1e-12)
        assert metrics["kl_controller"][: len(kl_saved["history"])] == kl_saved["history"]


def run_main(script: str, *args: str):
    module = runpy.run_path(str(REPO / script), run_name="resume_test")
    return module["main"](*module["make_parser"]().parse(list(args)))


def test_a_checkpoint_of_another_stage_or_base_is_refused(tmp_path, tiny_pairs, tiny_sft_adapter):
    out = tmp_path / "rm"
    run_main("reward/train.py", "--config", str(REPO / "configs/reward/tiny.yaml"), "--pairs", str(tiny_pairs),
             "--output_dir", str(out), "--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1")
    checkpoint = out / "checkpoint-1"
    assert checkpoint.is_dir()
    dpo = ["--config", str(REPO / "configs/rl/tiny_dpo.yaml"), "--pairs", str(tiny_pairs),
           "--sft_adapter", str(tiny_sft_adapter), "--output_dir", str(tmp_path / "dpo")]
    with pytest.raises(ClinalignError, match=f"{checkpoint} is from a reward run on 'tiny-llama', not this dpo run"):
        run_main("rl/dpo.py", *dpo, "--resume_from_checkpoint", str(checkpoint))
    rm = ["--config", str(REPO / "configs/reward/tiny.yaml"), "--pairs", str(tiny_pairs), "--output_dir", str(out)]
    with pytest.raises(ClinalignError, match="not this reward run on 'tiny-gpt-oss'"):
        run_main("reward/train.py", *rm, "--model_name_or_path", "tiny-gpt-oss", "--resume_from_checkpoint", "true")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "trainer_state.json").write_text(json.dumps({"global_step": 3, "stateful_callbacks": {}}))
    with pytest.raises(ClinalignError, match="was not written by a clinalign reward run"):
        run_main("reward/train.py", *rm, "--resume_from_checkpoint", str(foreign))
    with pytest.raises(ClinalignError, match="holds no complete checkpoint"):
        run_main("rl/dpo.py", *dpo, "--resume_from_checkpoint", "true")
    with pytest.raises(ClinalignError, match="no checkpoint folder"):
        run_main("rl/dpo.py", *dpo, "--resume_from_checkpoint", str(tmp_path / "missing"))


def test_the_refusal_is_one_line_and_exit_2(tmp_path, tiny_pairs):
    missing = tmp_path / "missing"
    result = subprocess.run([sys.executable, "reward/train.py", "--config", "configs/reward/tiny.yaml", "--pairs",
                             str(tiny_pairs), "--output_dir", str(tmp_path), "--resume_from_checkpoint", str(missing)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: resume_from_checkpoint: no checkpoint folder {missing}"
