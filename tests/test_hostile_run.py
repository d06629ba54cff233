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

from clinalign.errors import ConfigError
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


# ---- config values: every numeric option range-checked in the one parser --------------------------------

_ENTRY: dict[str, dict] = {}


def _parser(script="sft/run.py"):
    if script not in _ENTRY:
        _ENTRY[script] = runpy.run_path(str(REPO / script), run_name=f"parser_{script.replace('/', '_')}")
    return _ENTRY[script]["make_parser"]()


def _parse_yaml(tmp_path, text: str | bytes, script="sft/run.py", *extra):
    path = tmp_path / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return _parser(script).parse(["--config", str(path), *extra])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("learning_rate: -0.001", "'learning_rate' must be in (0, inf)"),
        ("lora_r: 0", "'lora_r' must be in [1, inf)"),
        ("per_device_train_batch_size: 0", "'per_device_train_batch_size' must be in [1, inf)"),
        ("max_steps: 0", "'max_steps' must be -1"),
        ("max_steps: -3", "'max_steps' must be -1"),
        ("num_train_epochs: -1", "'num_train_epochs' must be in (0, inf)"),
        ("eval_fraction: 1.5", "'eval_fraction' must be in [0, 1)"),
        ("env: {LD_PRELOAD: /tmp/x.so}", "unknown config key 'env'"),
    ],
)
def test_out_of_range_values_are_one_line_errors(tmp_path, line, message):
    with pytest.raises(ConfigError) as error:
        _parse_yaml(tmp_path, f"model_name_or_path: tiny-llama\n{line}\n")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_dpo_beta_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="'beta' must be in"):
        _parse_yaml(tmp_path, "beta: -1\n", "rl/dpo.py")


def test_duplicate_keys_non_utf8_and_a_file_as_output_dir(tmp_path):
    with pytest.raises(ConfigError, match="duplicate key 'lora_r'"):
        _parse_yaml(tmp_path, "lora_r: 4\nlora_r: 8\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        _parse_yaml(tmp_path, b"lora_r: 4\n# caf\xe9\n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        _parse_yaml(tmp_path, f"output_dir: {afile}\n")


def test_the_parser_never_raises_anything_but_a_one_line_config_error(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    keys = ["learning_rate", "lora_r", "max_steps", "num_train_epochs", "eval_fraction", "curriculum", "seed",
            "per_device_train_batch_size", "dtype", "lora_target_modules", "output_dir", "bogus_key", "bf16"]  # fmt: skip
    values = st.one_of(
        st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=20),
        st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    )  # fmt: skip

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(st.sampled_from(keys), values, max_size=5))
    def check(mapping):
        path = tmp_path / "fuzz.yaml"
        path.write_text(yaml.safe_dump(mapping))
        try:
            _parser().parse(["--config", str(path), "--output_dir", str(tmp_path / "out")])
        except ConfigError as e:
            assert str(e) and "\n" not in str(e).strip()

    check()


# ---- adapter provenance: required, and read without tracebacks ---------------------------------------------


@pytest.fixture()
def unverified_adapter(tmp_path, tiny_sft_adapter):
    import shutil

    copy = tmp_path / "adapter"
    shutil.copytree(tiny_sft_adapter, copy)
    return copy


def test_an_adapter_without_provenance_is_refused_unless_overridden(unverified_adapter, monkeypatch):
    from clinalign.adapters import PROVENANCE_FILE
    from clinalign.errors import ClinalignError
    from clinalign.models import load_policy

    (unverified_adapter / PROVENANCE_FILE).unlink()
    monkeypatch.delenv("CLINALIGN_ALLOW_UNVERIFIED_ADAPTER", raising=False)
    with pytest.raises(ClinalignError, match="cannot be checked"):
        load_policy("tiny-llama", unverified_adapter)
    monkeypatch.setenv("CLINALIGN_ALLOW_UNVERIFIED_ADAPTER", "1")
    model, _ = load_policy("tiny-llama", unverified_adapter)
    assert model is not None


@pytest.mark.parametrize("content", ['{"base": "tiny-llama", "finger', '{"base": "tiny-llama"}', "[1, 2]", "\xff"])
def test_a_truncated_or_keyless_provenance_is_a_one_line_error(unverified_adapter, content):
    from clinalign.adapters import PROVENANCE_FILE
    from clinalign.errors import ClinalignError
    from clinalign.models import load_policy

    (unverified_adapter / PROVENANCE_FILE).write_text(content)
    with pytest.raises(ClinalignError, match="unreadable or has no 'fingerprint'"):
        load_policy("tiny-llama", unverified_adapter)


# ---- defect 8: two runs on one output_dir ----------------------------------------------------------------


def test_a_second_run_on_a_busy_output_dir_is_refused_naming_the_first(tmp_path, run_script):
    import subprocess
    import sys

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom clinalign.run_dir import output_dir_lock\n"
         f"with output_dir_lock({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(120)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = run_script("reward/pairs.py", "--config", "configs/reward/tiny_pairs.yaml", "--output_dir", str(out))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: output_dir {out} is in use by another run (pid {holder.pid}); wait for it to finish or "
            "choose another output_dir"
        )
        assert not (out / "pairs.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale, and the next run takes the folder over.
    assert (out / ".clinalign.lock").read_text() == str(holder.pid)
    result = run_script("reward/pairs.py", "--config", "configs/reward/tiny_pairs.yaml", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "pairs.jsonl").is_file() and not (out / ".clinalign.lock").exists()


# ---- safetensors only ------------------------------------------------------------------------------------


def test_pickled_weights_are_refused_everywhere_a_model_or_adapter_loads(
    tmp_path, tiny_llama, tiny_sft_adapter, tiny_reward_model
):
    import shutil

    from clinalign.errors import ClinalignError
    from clinalign.models import load_causal_lm, load_policy
    from clinalign.rewards import load_reward_model

    def pickle_weights(folder: Path, name: str) -> None:
        weights = load_file(str(folder / f"{name}.safetensors"))
        (folder / f"{name}.safetensors").unlink()
        torch.save(weights, folder / f"{'pytorch_model' if name == 'model' else name}.bin")

    model_dir = tmp_path / "pickled-model"
    shutil.copytree(tiny_llama, model_dir)
    pickle_weights(model_dir, "model")
    assert (model_dir / "pytorch_model.bin").is_file() and not list(model_dir.glob("*.safetensors"))
    with pytest.raises(ClinalignError, match=r"pickled-model holds pickled weights \(pytorch_model.bin\)"):
        load_causal_lm(str(model_dir))
    adapter_dir = tmp_path / "pickled-adapter"
    shutil.copytree(tiny_sft_adapter, adapter_dir)
    pickle_weights(adapter_dir, "adapter_model")
    with pytest.raises(ClinalignError, match=r"pickled-adapter holds pickled weights \(adapter_model.bin\)"):
        load_policy("tiny-llama", adapter_dir)
    reward_dir = tmp_path / "pickled-reward"
    shutil.copytree(tiny_reward_model, reward_dir)
    pickle_weights(reward_dir, "adapter_model")
    with pytest.raises(ClinalignError, match=r"pickled-reward holds pickled weights \(adapter_model.bin\)"):
        load_reward_model(str(reward_dir))
