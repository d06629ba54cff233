"""`--help` on every entry script prints its options with their help and exits 0 (it used to be
"error: unknown config key 'help'", exit 2: the first command most users type)."""

from __future__ import annotations

import runpy
import sys

import pytest
from conftest import REPO

SCRIPTS = {
    "sft/run.py": ["curriculum", "eval_fraction"],
    "reward/pairs.py": ["records", "preference_files"],
    "reward/train.py": ["pairs", "eval_pairs"],
    "reward/score.py": ["reward_model", "input"],
    "rl/dpo.py": ["sft_adapter", "beta"],
    "rl/ppo.py": ["reward_model", "kl_target"],
    "rl/tune_kl.py": ["grid", "kl_budget"],
    "eval/run.py": ["models", "safety_prompts"],
}


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_prints_options_and_exits_0(script, flag, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script, flag])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    for option in SCRIPTS[script]:
        assert f"--{option}" in out, option


def test_help_among_other_options_still_wins(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["sft/run.py", "--config", "configs/sft/tiny.yaml", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "sft/run.py"), run_name="__main__")
    assert exit_.value.code == 0 and "--curriculum" in capsys.readouterr().out
