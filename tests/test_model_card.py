"""Model cards: the base by its hub id (never a cache path), the stages and data with their counts, the
held-out metrics the run measured, the config; PEFT's placeholder card is gone."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest
import yaml

from clinalign.model_card import describe_base, write_model_card

REPO = Path(__file__).resolve().parents[1]


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture(scope="module")
def hub_snapshot(tmp_path_factory, tiny_llama) -> Path:
    """The tiny Llama laid out as a Hugging Face cache snapshot, as `hf download` leaves a hub model."""
    snapshot = tmp_path_factory.mktemp("hub") / "models--clinalign-tests--tiny-llama" / "snapshots" / ("ab12" * 10)
    shutil.copytree(tiny_llama, snapshot)
    return snapshot


@pytest.fixture(scope="module")
def sft_stage(tmp_path_factory, hub_snapshot) -> Path:
    """One SFT stage (2 steps) by sft/run.py on the snapshot: its card as the script writes it."""
    out = tmp_path_factory.mktemp("sft")
    entry = runpy.run_path(str(REPO / "sft" / "run.py"), run_name="sft_card_test")
    args = ["--config", str(REPO / "configs/sft/tiny.yaml"), "--output_dir", str(out), "--stages", "medmcqa",
            "--model_name_or_path", str(hub_snapshot), "--save_strategy", "no"]  # fmt: skip
    entry["main"](*entry["make_parser"]().parse(args))
    return out / "stages" / "2-medmcqa"


def test_sft_stage_card_names_the_hub_id_data_counts_and_metrics(sft_stage, hub_snapshot):
    card = (sft_stage / "README.md").read_text()
    metrics = json.loads((sft_stage / "metrics.json").read_text())
    assert "More Information Needed" not in card
    meta = front_matter(card)
    assert meta["base_model"] == "clinalign-tests/tiny-llama" and meta["library_name"] == "peft"
    assert str(hub_snapshot) not in card and "snapshots" not in card  # no machine-local path
    assert "revision ab12ab12ab12" in card
    report = metrics["data"]
    assert "`clinalign/sample_data/medmcqa_train.jsonl`" in card
    assert f"{report['kept']} of {report['read']} records kept" in card
    assert f"{metrics['train_examples']} trained on, {metrics['eval_examples']} held-out measured" in card
    assert f"held-out eval loss: {metrics['eval_loss']:.4g}" in card
    assert f"{metrics['chat_accuracy_after']['acc']:.4g} after" in card and "the chat format this stage trained on" in card
    assert f"{metrics['lm_eval_accuracy_after']['acc']:.4g} after" in card
    after = metrics["chat_accuracy_after"]
    assert f"(95% interval [{after['acc_low']:.3f}, {after['acc_high']:.3f}]; acc_norm" in card
    assert "curriculum:" in card and "lora_r: 4" in card  # the resolved config


def test_reward_card_reports_pairs_and_held_out_accuracy(tiny_reward_model, tiny_pairs):
    card = (tiny_reward_model / "README.md").read_text()
    metrics = json.loads((tiny_reward_model / "metrics.json").read_text())
    assert "More Information Needed" not in card
    meta = front_matter(card)
    assert "base_model" not in meta  # tiny-llama has no hub id: none is invented
    assert meta["pipeline_tag"] == "text-classification" and "reward-model" in meta["tags"]
    assert "clinalign's built-in `tiny-llama`" in card
    assert f"`{tiny_pairs}`" in card
    assert f"preference pairs: {metrics['pairs']['train']} trained on, {metrics['pairs']['eval']} held out" in card
    for axis, result in metrics["eval"].items():
        assert f"| {axis} | {result['accuracy']:.4g} | [{result['low']:.3f}, {result['high']:.3f}] | {result['n']} |" in card
    assert "`score` head" in card


def test_a_rewritten_card_replaces_peft_placeholder(tiny_sft_adapter, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_sft_adapter, adapter)
    assert "More Information Needed" in (adapter / "README.md").read_text()  # what PEFT writes
    card = write_model_card(adapter).read_text()
    assert "More Information Needed" not in card and "This run recorded no held-out metrics." in card


@pytest.mark.parametrize(
    ("base", "hub_id", "phrase"),
    [
        ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "dequantized"),
        ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf", "huggingface.co/meta-llama/Llama-2-7b-hf"),
        ("/data/hf/hub/models--openai--gpt-oss-20b/snapshots/0123456789abcdef", "openai/gpt-oss-20b", "0123456789ab"),
        ("tiny-gpt-oss", None, "tiny random model"),
    ],
)
def test_describe_base(base, hub_id, phrase):
    found, text = describe_base(base)
    assert found == hub_id and phrase in text


def test_a_local_folder_is_named_as_a_local_folder(tmp_path):
    folder = tmp_path / "my-base"
    folder.mkdir()
    hub_id, text = describe_base(str(folder))
    assert hub_id is None and text.startswith("a local folder, `my-base`") and str(tmp_path) not in text
