"""The whole pipeline on tiny models on CUDA (collected only where CUDA exists: conftest). The CPU twin
is tests/test_pipeline_cpu.py; the stages are tests/pipeline_run.py."""

from __future__ import annotations

import torch
from pipeline_run import run_pipeline

from clinalign.devices import device_map, process_device


def test_every_stage_runs_on_cuda_and_every_model_lands_there(tmp_path, monkeypatch):
    assert process_device().type == "cuda"
    pipeline = run_pipeline(tmp_path, monkeypatch, dtype="bfloat16")
    assert {"sft", "reward", "dpo", "ppo", "eval"} <= {load.stage for load in pipeline.loads}
    for load in pipeline.loads:
        assert load.device_map == device_map(), load
        assert load.parameter_devices == {f"cuda:{torch.cuda.current_device()}"}, load
    assert list(pipeline.metrics) == ["base", "sft", "dpo", "ppo"]
    for name in pipeline.metrics:
        assert pipeline.metrics[name]["headline"]["mc_acc"]["n"] > 0
