"""Hostile run inputs (issue: nothing deleted outside a run): names that become paths, stage lengths,
the curriculum's type, and seeded LoRA initialisation."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from safetensors.torch import load_file

from clinalign.config import ConfigError
from clinalign.run_dir import remove_inside, safe_name
from clinalign.sft import parse_curriculum

TINY = str(REPO / "configs/sft/tiny.yaml")
DATA = "clinalign/sample_data/medqa_us_test.jsonl"


@pytest.mark.parametrize(
    "name", ["x/../../../victim", "../up", "/abs", "a\\b", "..", ".", "", ".hidden", "a\x00b", "tab\tname", 3]
)
def test_names_that_could_leave_a_folder_are_refused(name):
    with pytest.raises(ConfigError, match="cannot name a folder"):
        safe_name(name, "stage name")


@pytest.mark.parametrize("name", ["medqa", "1-pubmedqa", "stage_2.v1", "MedMCQA-all"])
def test_ordinary_names_pass(name):
    assert safe_name(name, "stage name") == name


def test_remove_inside_refuses_a_folder_outside_its_root(tmp_path):
    root, victim = tmp_path / "run", tmp_path / "victim"
    (root / "checkpoints" / "a").mkdir(parents=True)
    victim.mkdir()
    with pytest.raises(ConfigError, match="not inside"):
        remove_inside(root / "checkpoints" / ".." / ".." / "victim", root)
    with pytest.raises(ConfigError):
        remove_inside(root, root)
    assert victim.is_dir()
    remove_inside(root / "checkpoints" / "a", root)
    assert not (root / "checkpoints" / "a").exists()


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"name": "x/../../../victim", "data": DATA}, "cannot name a folder"),
        ({"name": "s", "data": DATA, "max_steps": 0}, "max_steps must be -1"),
        ({"name": "s", "data": DATA, "max_steps": -5}, "max_steps must be -1"),
        ({"name": "s", "data": DATA, "num_train_epochs": -1}, "num_train_epochs must be above 0"),
        ({"name": "s", "data": DATA, "num_train_epochs": 0}, "num_train_epochs must be above 0"),
    ],
)
def test_bad_stages_are_config_errors(stage, message):
    with pytest.raises(ConfigError, match=message):
        parse_curriculum([stage], None)


def test_curriculum_must_be_a_list():
    with pytest.raises(ConfigError, match="curriculum must be a list"):
        parse_curriculum("notalist", None)


def _config(tmp_path, stage_name):
    config = yaml.safe_load(Path(TINY).read_text())
    config["curriculum"] = [{"name": stage_name, "data": str(REPO / DATA), "max_steps": 1}]
    path = tmp_path / f"sft_{abs(hash(stage_name))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_traversing_stage_name_exits_2_and_deletes_nothing(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    out = tmp_path / "a" / "b" / "out"
    config = _config(tmp_path, "x/../../../victim")
    done = subprocess.run(
        [sys.executable, str(REPO / "sft/run.py"), "--config", str(config), "--output_dir", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: curriculum[0] name")
    assert "Traceback" not in done.stderr
    assert (victim / "keep.txt").read_text() == "precious"


def _sft(tmp_path, name):
    entry = runpy.run_path(str(REPO / "sft" / "run.py"), run_name="sft_seed_test")
    out = tmp_path / name
    config = _config(tmp_path, "medqa")
    entry["main"](*entry["make_parser"]().parse(["--config", str(config), "--output_dir", str(out)]))
    return load_file(str(next(out.glob("stages/*/adapter_model.safetensors"))))


def test_seed_makes_sft_reproducible(tmp_path):
    # LoRA used to be initialised before the Trainer seeded: lora_A differed by up to 0.24 run to run.
    first, second = _sft(tmp_path, "one"), _sft(tmp_path, "two")
    assert first.keys() == second.keys() and any("lora_A" in k for k in first)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)
