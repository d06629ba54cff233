"""One held-out split: on defaults no stage trains on a record or safety prompt that eval holds out.

SFT's `eval_fraction` used to default to 0.1 while pairs, DPO, PPO and eval used 0.2, so SFT trained
on records eval held out; every stage now takes its default from clinalign.data.records.EVAL_FRACTION.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import pytest
from conftest import REPO

from clinalign.data import load_records, sample_path
from clinalign.data.records import EVAL_FRACTION
from clinalign.policy_eval import held_out_records, held_out_safety_prompts
from clinalign.preferences import load_safety_prompts
from clinalign.sft import split_records


def _dataclass(path: str, name: str):
    spec = importlib.util.spec_from_file_location(path.replace("/", "_"), REPO / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return getattr(module, name)


def _default(cls) -> float:
    return next(f.default for f in dataclasses.fields(cls) if f.name == "eval_fraction")


@pytest.fixture(scope="module")
def defaults() -> dict[str, float]:
    from clinalign.dpo import DPOArgs
    from clinalign.ppo import PPOArgs

    return {
        "sft": _default(_dataclass("sft/run.py", "SFTScriptArgs")),
        "pairs": _default(_dataclass("reward/pairs.py", "PairsArgs")),
        "dpo": _default(DPOArgs),
        "ppo": _default(PPOArgs),
        "eval": _default(_dataclass("eval/run.py", "EvalArgs")),
    }


def test_every_stage_defaults_to_the_one_fraction(defaults):
    assert set(defaults.values()) == {EVAL_FRACTION}, defaults


def test_on_defaults_sft_trains_on_nothing_eval_holds_out(defaults):
    records = [r for family in ("pubmedqa", "medmcqa", "medqa") for r in load_records(sample_path(family)).records]
    trained, _ = split_records(records, defaults["sft"])
    held = held_out_records(records, defaults["eval"])
    assert held and not {(r.source, r.id) for r in trained} & {(r.source, r.id) for r in held}
    safety = load_safety_prompts()
    held_safety = held_out_safety_prompts(None, defaults["eval"])
    assert 0 < len(held_safety) < len(safety)


def test_the_configs_of_one_model_hold_out_one_split():
    import yaml

    by_model: dict[str, dict[str, float]] = {}
    for path in sorted((REPO / "configs").glob("*/*.yaml")):
        if path.parent.name in ("accelerate", "reward") or path.name.startswith("tiny"):
            continue  # reward configs' eval_fraction splits pairs, not records; tiny configs are tests'
        config = yaml.safe_load(path.read_text()) or {}
        model = path.stem.split("_")[0]
        by_model.setdefault(model, {})[str(path.relative_to(REPO))] = config.get("eval_fraction", EVAL_FRACTION)
    assert {"smollm2", "llama2-7b", "gpt-oss-20b"} <= set(by_model)
    for model, fractions in by_model.items():
        assert len(set(fractions.values())) == 1, (model, fractions)
