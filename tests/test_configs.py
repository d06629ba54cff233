"""Every shipped config parses with its entry script's parser (catches typos and renamed TRL fields)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "sft": "sft/run.py",
    "eval": "eval/run.py",
    "reward/pairs": "reward/pairs.py",
    "reward": "reward/train.py",
    "rl/dpo": "rl/dpo.py",
    "rl/ppo": "rl/ppo.py",
    "rl/tune_kl": "rl/tune_kl.py",
}


def script_for(config: Path) -> str:
    stage, name = config.parent.name, config.stem
    if stage == "reward":
        return SCRIPTS["reward/pairs"] if name.endswith("pairs") else SCRIPTS["reward"]
    if stage == "rl":
        return SCRIPTS[f"rl/{name.rsplit('_', 1)[-1]}" if not name.endswith("tune_kl") else "rl/tune_kl"]
    return SCRIPTS[stage]


CONFIGS = sorted(p for p in (REPO / "configs").glob("*/*.yaml") if p.parent.name != "accelerate")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses(config):
    entry = runpy.run_path(str(REPO / script_for(config)), run_name="config_check")
    parsed = entry["make_parser"]().parse(["--config", str(config)])
    assert parsed


def test_every_stage_has_a_tiny_config():
    names = {f"{p.parent.name}/{p.name}" for p in CONFIGS}
    for expected in ("sft/tiny.yaml", "reward/tiny.yaml", "rl/tiny_dpo.yaml", "rl/tiny_ppo.yaml",
                     "rl/tiny_tune_kl.yaml", "eval/tiny.yaml"):
        assert expected in names


def test_accelerate_configs_name_their_backend():
    import yaml

    for name, kind in {"cpu": "NO", "multi_gpu": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}.items():
        config = yaml.safe_load((REPO / "configs/accelerate" / f"{name}.yaml").read_text())
        assert config["distributed_type"] == kind
    assert yaml.safe_load((REPO / "configs/accelerate/zero3.yaml").read_text())["deepspeed_config"]["zero_stage"] == 3
