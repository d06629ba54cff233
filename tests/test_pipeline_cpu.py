"""The whole pipeline on tiny models on the CPU (tests/test_pipeline_gpu.py is its CUDA twin): every
stage runs, and every model any stage loads was given the process's device by the one device rule."""

from __future__ import annotations

from pipeline_run import run_pipeline

from clinalign.devices import device_map


def test_every_stage_runs_and_every_load_follows_the_device_rule(tmp_path, monkeypatch):
    pipeline = run_pipeline(tmp_path, monkeypatch)
    stages = {load.stage for load in pipeline.loads}
    # Models are loaded by training (sft, reward, dpo, ppo: policy and its reward model) and by eval.
    assert {"sft", "reward", "dpo", "ppo", "eval"} <= stages, stages
    assert {"LlamaForCausalLM", "LlamaForSequenceClassification"} <= {load.model_class for load in pipeline.loads}
    for load in pipeline.loads:
        assert load.device_map == device_map() == {"": "cpu"}, load
        assert load.parameter_devices == {"cpu"}, load
    # Eval measured every model of the pipeline, each compared with the one before it.
    assert list(pipeline.metrics) == ["base", "sft", "dpo", "ppo"]
    for name, baseline in (("sft", "base"), ("dpo", "sft"), ("ppo", "dpo")):
        assert pipeline.metrics[name]["comparison"]["baseline"] == baseline
    assert pipeline.metrics["ppo"]["headline"]["rm_score"]["n"] > 0
