"""eval/run.py on two tiny models: every output file, the table, and clear errors for bad model specs."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from clinalign.errors import ClinalignError, ConfigError
from clinalign.safety import load_checks

REPO = Path(__file__).resolve().parents[1]


def run_eval(config: str):
    entry = runpy.run_path(str(REPO / "eval" / "run.py"), run_name="eval_test")
    return entry["main"](*entry["make_parser"]().parse(["--config", config]))


def write_config(tmp_path, adapter, **extra) -> str:
    import yaml

    config = yaml.safe_load((REPO / "configs/eval/tiny.yaml").read_text())
    config["models"] = [{"name": "base", "base": "tiny-llama"},
                        {"name": "sft", "base": "tiny-llama", "adapter": str(adapter)}]
    config["reference"] = {"base": "tiny-llama", "adapter": str(adapter)}
    config.update(output_dir=str(tmp_path / "eval"), **extra)
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_two_models_side_by_side(tmp_path, tiny_sft_adapter, tiny_reward_model, capsys):
    results = run_eval(write_config(tmp_path, tiny_sft_adapter, reward_model=str(tiny_reward_model)))
    out = tmp_path / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["base", "sft"]
    for name in metrics:
        assert {"medmcqa", "pubmedqa", "safety", "overall"} <= set(metrics[name])
        for dataset in ("medmcqa", "pubmedqa"):
            assert {"mc_acc", "mc_acc_norm", "gen_acc", "exact_match", "no_answer", "rougeL", "bleu"} <= set(
                metrics[name][dataset])
            assert 0 <= metrics[name][dataset]["mc_acc"] <= 1
        assert set(metrics[name]["safety"]["check_pass_rate"]) <= set(load_checks().names)
        assert isinstance(metrics[name]["overall"]["rm_score"], float)
    # The adapter model IS the reference: its KL is exactly zero; the base differs from it.
    assert metrics["sft"]["overall"]["kl_k1"] == pytest.approx(0, abs=1e-6)
    assert metrics["base"]["overall"]["kl_k3"] > 0
    # Every headline metric carries its interval and n; the shares' n is the pooled held-out count.
    n_mc = sum(metrics["sft"][d]["n_mc"] for d in ("medmcqa", "pubmedqa"))
    acc = metrics["sft"]["headline"]["mc_acc"]
    assert acc["n"] == n_mc and acc["method"] == "wilson" and acc["low"] <= acc["value"] <= acc["high"]
    assert metrics["sft"]["headline"]["safety_score"]["method"].startswith("bootstrap")
    assert set(metrics["sft"]["items"]["medmcqa"]["mc_acc"]) == {
        k for k in metrics["base"]["items"]["medmcqa"]["mc_acc"]}  # same items for both models: paired
    # sft is compared with the model listed before it, item by item.
    comparison = metrics["sft"]["comparison"]
    assert comparison["baseline"] == "base" and "comparison" not in metrics["base"]
    mc = comparison["metrics"]["mc_acc"]
    assert mc["n"] == n_mc and mc["test"] == "mcnemar-exact"
    assert mc["difference"] == pytest.approx(acc["value"] - metrics["base"]["headline"]["mc_acc"]["value"])
    assert mc["verdict"] in ("better", "worse", "no detectable change")
    letters = metrics["sft"]["medmcqa"]["letters"]
    assert sum(letters["predicted"].values()) == sum(letters["gold"].values()) == letters["n"]
    report = (out / "report.md").read_text()
    assert "| base |" in report and "| sft |" in report
    assert "## Paired comparisons" in report and "| sft | base | mc_acc |" in report
    assert f"n={n_mc} |" in report and "## Multiple-choice answer letters" in report
    assert (out / "headline.png").stat().st_size > 0 and (out / "config.yaml").is_file()
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("| sft |") and printed[-4].startswith("| model |")
    assert results == metrics


def test_a_missing_adapter_fails_before_any_work(tmp_path):
    config = write_config(tmp_path, tmp_path / "no-such-adapter")
    with pytest.raises(ClinalignError, match="adapter not found"):
        run_eval(config)


def test_a_typo_in_a_model_spec_names_the_key(tmp_path, tiny_sft_adapter):
    import yaml

    config = write_config(tmp_path, tiny_sft_adapter)
    data = yaml.safe_load(Path(config).read_text())
    data["models"][1] = {"name": "sft", "base": "tiny-llama", "adaptor": str(tiny_sft_adapter)}
    Path(config).write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="unknown key 'adaptor' in models\\[1\\]"):
        run_eval(config)


def test_baselines_are_configurable_and_checked(tmp_path, tiny_sft_adapter):
    import yaml

    config = write_config(tmp_path, tiny_sft_adapter, max_records_per_dataset=2, safety_prompts=None)
    data = yaml.safe_load(Path(config).read_text())
    data["models"][1]["baseline"] = None
    Path(config).write_text(yaml.safe_dump(data))
    results = run_eval(config)
    assert "comparison" not in results["sft"]
    data["models"][1]["baseline"] = "sfft"
    Path(config).write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="baseline 'sfft' is not another listed model"):
        run_eval(config)


def test_generation_cap_leaves_multiple_choice_uncapped(tmp_path, tiny_sft_adapter):
    config = write_config(tmp_path, tiny_sft_adapter, max_records_per_dataset=None, max_generated_per_dataset=2,
                          safety_prompts=None, reference=None)
    results = run_eval(config)
    for dataset in ("medmcqa", "pubmedqa"):
        assert results["sft"][dataset]["n"] == 2
        assert results["sft"][dataset]["n_mc"] > 2
        assert len(results["sft"]["items"][dataset]["mc_acc"]) == results["sft"][dataset]["n_mc"]


def test_nll_cap_scores_the_first_labelled_records_and_nothing_else(tmp_path, tiny_sft_adapter):
    config = write_config(tmp_path, tiny_sft_adapter, max_records_per_dataset=None, max_generated_per_dataset=1,
                          max_nll_per_dataset=3, safety_prompts=None, reference=None)  # fmt: skip
    results = run_eval(config)
    groups = [g for g, items in results["sft"]["items"].items() if "nll" in items]
    assert {"medmcqa", "pubmedqa"} <= set(groups)
    for dataset in groups:
        items = results["sft"]["items"][dataset]
        assert len(items["mc_acc"]) > 3
        assert list(items["nll"]) == list(items["mc_acc"])[:3]  # the first three; multiple choice uncapped
    assert results["sft"]["headline"]["nll"]["n"] == 3 * len(groups)


def test_headline_metrics_reach_tensorboard(tmp_path, tiny_sft_adapter):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_config(tmp_path, tiny_sft_adapter, max_records_per_dataset=2, safety_prompts=None,
                          report_to="tensorboard")  # fmt: skip
    results = run_eval(config)
    events = EventAccumulator(str(tmp_path / "eval" / "runs" / "eval"))
    events.Reload()
    acc = results["sft"]["headline"]["mc_acc"]
    assert events.Scalars("eval/sft/mc_acc/value")[-1].value == pytest.approx(acc["value"])
    assert events.Scalars("eval/sft/mc_acc/low")[-1].value == pytest.approx(acc["low"])


def test_test_data_is_evaluated_whole_and_never_twice(tmp_path, tiny_sft_adapter):
    from clinalign.data import load_records

    config = write_config(tmp_path, tiny_sft_adapter, max_generated_per_dataset=1, safety_prompts=None,
                          reference=None, max_records_per_dataset=None, data=[], test_data=[str(REPO / "clinalign/sample_data/medqa_us_test.jsonl")])
    results = run_eval(config)
    labelled = [r for r in load_records(str(REPO / "clinalign/sample_data/medqa_us_test.jsonl")).records if r.answer]
    assert results["sft"]["medqa"]["n_mc"] == len(labelled)  # every record, not a held-out share
    assert len(results["sft"]["items"]["medqa"]["nll"]) == len(labelled)
    assert "nll" in results["sft"]["comparison"]["metrics"]
    twice = write_config(tmp_path, tiny_sft_adapter, safety_prompts=None, reference=None,
                         data=[], test_data=[str(REPO / "clinalign/sample_data/medqa_us_test.jsonl")] * 2)
    with pytest.raises(ConfigError, match="is evaluated twice"):
        run_eval(twice)


def test_generation_batch_benchmark_runs_every_width_on_eval_s_prompts(monkeypatch, capsys):
    # benchmarks/generation_batch.py on the tiny model: eval's 103 demo generations, each width timed.
    monkeypatch.setattr("sys.argv", ["generation_batch.py", "--model", "tiny-llama", "--widths", "24", "52",
                                     "--max_new_tokens", "4"])  # fmt: skip
    runpy.run_path(str(REPO / "benchmarks" / "generation_batch.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[generation_batch] 103 answers")  # first 8 held-out questions x 3 + 79 safety
    widths = [line for line in lines if line.startswith("width")]
    # each width timed and compared answer by answer with the first (the second may differ: padding)
    assert [w.split(":")[0] for w in widths] == ["width  24", "width  52"]
    assert all("answers/s" in w and "/103 answers identical" in w for w in widths)
