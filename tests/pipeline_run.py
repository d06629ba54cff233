"""The whole pipeline on the tiny models, in this process, for tests/test_pipeline_cpu.py and
tests/test_pipeline_gpu.py: data -> SFT (2 stages) -> pairs -> reward model -> DPO -> PPO -> eval.

Every `PreTrainedModel.from_pretrained` call goes through a call-through spy (the real method runs)
that records the `device_map` it was given and the devices of the parameters it returned: the device
rule (clinalign.devices) is then checked on what each stage actually loaded.
"""

from __future__ import annotations

import dataclasses
import json
import runpy
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "clinalign" / "sample_data"


@dataclasses.dataclass
class Load:
    stage: str
    model_class: str
    device_map: object
    parameter_devices: set[str]


@dataclasses.dataclass
class Pipeline:
    root: Path
    loads: list[Load]
    metrics: dict


def _main(script: str, args: list[str]):
    module = runpy.run_path(str(REPO / script), run_name="pipeline_test")
    return module["main"](*module["make_parser"]().parse(args))


def _config(path: Path, base: str, **changes) -> str:
    config = yaml.safe_load((REPO / base).read_text())
    config.update(changes)
    path.write_text(yaml.safe_dump(config))
    return str(path)


def run_pipeline(root: Path, monkeypatch, dtype: str = "float32") -> Pipeline:
    """Runs every stage under `root` with tiny configs (1-2 steps each) and returns what was loaded."""
    from transformers import PreTrainedModel

    from clinalign.data.__main__ import main as data_main

    loads: list[Load] = []
    stage = {"name": "data"}
    original = PreTrainedModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        devices = {str(p.device) for p in model.parameters()}
        loads.append(Load(stage["name"], cls.__name__, kwargs.get("device_map"), devices))
        return model

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))

    data = root / "data"
    for name, source in (("pubmedqa", "pubmedqa_ori_pqal.json"), ("medmcqa", "medmcqa_train.jsonl")):
        assert data_main(["convert", str(SAMPLE / source), "--out", str(data / f"{name}.jsonl")]) == 0
    common = {"dtype": dtype}

    stage["name"] = "sft"
    curriculum = [{"name": "pubmedqa", "data": str(data / "pubmedqa.jsonl"), "max_steps": 1},
                  {"name": "medmcqa", "data": str(data / "medmcqa.jsonl"), "max_steps": 1}]  # fmt: skip
    sft_dir = root / "sft"
    _main("sft/run.py", ["--config", _config(root / "sft.yaml", "configs/sft/tiny.yaml", curriculum=curriculum,
                                             output_dir=str(sft_dir), save_strategy="no", eval_max_records=4,
                                             **common)])  # fmt: skip
    sft_adapter = sft_dir / "stages" / "2-medmcqa"

    stage["name"] = "pairs"
    pairs_dir = root / "pairs"
    _main(
        "reward/pairs.py",
        [
            "--config",
            _config(
                root / "pairs.yaml",
                "configs/reward/tiny_pairs.yaml",
                records=[str(data / "medmcqa.jsonl")],
                output_dir=str(pairs_dir),
            ),
        ],
    )
    pairs = pairs_dir / "pairs.jsonl"

    stage["name"] = "reward"
    reward_dir = root / "reward"
    _main(
        "reward/train.py",
        [
            "--config",
            _config(
                root / "rm.yaml",
                "configs/reward/tiny.yaml",
                pairs=str(pairs),
                output_dir=str(reward_dir),
                max_steps=1,
                **common,
            ),
        ],
    )

    stage["name"] = "dpo"
    dpo_dir = root / "dpo"
    _main("rl/dpo.py", ["--config", _config(root / "dpo.yaml", "configs/rl/tiny_dpo.yaml", pairs=str(pairs),
                                            sft_adapter=str(sft_adapter), eval_data=[str(data / "medmcqa.jsonl")],
                                            output_dir=str(dpo_dir), max_steps=1, eval_max_records=2,
                                            eval_max_safety_prompts=2, **common)])  # fmt: skip

    stage["name"] = "ppo"
    ppo_dir = root / "ppo"
    _main("rl/ppo.py", ["--config", _config(root / "ppo.yaml", "configs/rl/tiny_ppo.yaml",
                                            data=[str(data / "medmcqa.jsonl")], sft_adapter=str(sft_adapter),
                                            reward_model=str(reward_dir), output_dir=str(ppo_dir), max_steps=1,
                                            max_prompts=8, **common)])  # fmt: skip

    stage["name"] = "eval"
    eval_dir = root / "eval"
    models = [{"name": "base", "base": "tiny-llama"}, {"name": "sft", "base": "tiny-llama", "adapter": str(sft_adapter)},
              {"name": "dpo", "base": "tiny-llama", "adapter": str(dpo_dir)},
              {"name": "ppo", "base": "tiny-llama", "adapter": str(ppo_dir)}]  # fmt: skip
    _main(
        "eval/run.py",
        [
            "--config",
            _config(
                root / "eval.yaml",
                "configs/eval/tiny.yaml",
                models=models,
                data=[str(data / "medmcqa.jsonl")],
                reward_model=str(reward_dir),
                reference={"base": "tiny-llama", "adapter": str(sft_adapter)},
                max_records_per_dataset=3,
                output_dir=str(eval_dir),
                **common,
            ),
        ],
    )
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    return Pipeline(root, loads, metrics)
