"""clinalign.export: merged checkpoints load with plain transformers classes and compute what the
adapter computes (policy, reward model, GPT-OSS with expert LoRA); 4-bit training is said; an
offline push is a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import requires_harmony_vocab
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from clinalign import export, models
from clinalign.adapters import write_adapter_provenance
from clinalign.rewards import load_reward_model, score_responses

PROMPTS = [[{"role": "user", "content": "Is it safe to take ibuprofen with warfarin?"}],
           [{"role": "user", "content": "What is the usual adult dose of paracetamol?"}]]  # fmt: skip
RESPONSES = ["No, ask your doctor first.", "Take 10 g at once."]


def run_export(*args: str) -> dict:
    return export.main(*export.make_parser().parse(list(args)))


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    extra = {"output_router_logits": False} if getattr(model.config, "output_router_logits", False) else {}
    with torch.no_grad():
        return model(input_ids=input_ids, **extra).logits.float()


def assert_standalone(folder: Path) -> None:
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert not (folder / "adapter_config.json").exists()
    card = (folder / "README.md").read_text()
    assert "More Information Needed" not in card and "merge_and_unload" in card


def test_merged_policy_matches_the_adapter(tmp_path, tiny_sft_adapter, capsys):
    out = tmp_path / "merged"
    result = run_export("--adapter", str(tiny_sft_adapter), "--output_dir", str(out), "--dtype", "float32")
    assert_standalone(out)
    merged = AutoModelForCausalLM.from_pretrained(out)  # transformers alone, no PEFT
    peft_model, tokenizer = models.load_policy("tiny-llama", tiny_sft_adapter, dtype="float32")
    base = models.load_causal_lm("tiny-llama", dtype=torch.float32)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    expected = logits(peft_model, ids)
    assert not torch.allclose(logits(base, ids), expected, atol=1e-3)  # the adapter changes the model
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=1e-5)
    assert result["probe_max_abs_diff"] < 1e-4 and result["kind"] == "policy" and not result["trained_in_4bit"]
    # the tokenizer and its chat template travel with it
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == tokenizer.chat_template and saved.pad_token_id == tokenizer.pad_token_id
    card = (out / "README.md").read_text()
    assert "tiny-llama" in card and tiny_sft_adapter.name in card
    assert "load it with AutoModelForCausalLM" in capsys.readouterr().out


def test_adapter_trained_in_4bit_is_merged_on_16bit_weights_and_says_so(tmp_path, tiny_sft_adapter, capsys):
    adapter = tmp_path / "qlora"
    shutil.copytree(tiny_sft_adapter, adapter)
    (adapter / "config.yaml").write_text(yaml.safe_dump({"model_name_or_path": "tiny-llama", "load_in_4bit": True}))
    result = run_export("--adapter", str(adapter), "--output_dir", str(tmp_path / "merged"), "--dtype", "float32")
    assert result["trained_in_4bit"]
    assert "trained on 4-bit base weights: merging it into the 16-bit" in capsys.readouterr().out
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "trained on 4-bit NF4 base weights; this merge used the 16-bit base weights" in card
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_merged_reward_model_scores_like_the_adapter(tmp_path, tiny_reward_model):
    out = tmp_path / "merged_rm"
    result = run_export("--adapter", str(tiny_reward_model), "--output_dir", str(out), "--dtype", "float32")
    assert_standalone(out)
    assert result["kind"] == "reward"
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    adapter_model, adapter_tokenizer = load_reward_model(tiny_reward_model, dtype="float32")
    ours = score_responses(merged, tokenizer, PROMPTS, RESPONSES)
    theirs = score_responses(adapter_model, adapter_tokenizer, PROMPTS, RESPONSES)
    assert ours == pytest.approx(theirs, abs=1e-5) and ours[0] != ours[1]
    card = (out / "README.md").read_text()
    accuracy = json.loads((tiny_reward_model / "metrics.json").read_text())["eval"]["overall"]["accuracy"]
    assert "AutoModelForSequenceClassification" in card and f"| overall | {accuracy:.4g} |" in card


@requires_harmony_vocab
def test_gpt_oss_expert_lora_is_merged_too(tmp_path, tiny_gpt_oss):
    from peft import PeftModel, get_peft_model

    from harmony.gpt_oss import load_gpt_oss, lora_config

    config = lora_config(r=4, alpha=8, experts=True)
    config.init_lora_weights = False  # B != 0: every LoRA, attention and experts, changes the model
    base = load_gpt_oss("tiny-gpt-oss", dtype="float32", load_in_4bit=False)
    adapter = tmp_path / "gpt_oss_adapter"
    get_peft_model(base, config).save_pretrained(adapter)
    write_adapter_provenance(adapter, "tiny-gpt-oss", base)
    assert json.loads((adapter / "adapter_config.json").read_text())["target_parameters"]

    out = tmp_path / "merged"
    run_export("--adapter", str(adapter), "--output_dir", str(out), "--dtype", "float32")
    assert_standalone(out)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    fresh = load_gpt_oss("tiny-gpt-oss", dtype="float32", load_in_4bit=False)
    experts_before = fresh.model.layers[0].mlp.experts.down_proj.detach().clone()
    peft_model = PeftModel.from_pretrained(fresh, adapter).eval()
    ids = torch.randint(0, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(merged, ids), logits(peft_model, ids), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(merged.model.layers[0].mlp.experts.down_proj, experts_before)  # experts merged
    assert AutoTokenizer.from_pretrained(out).chat_template  # the harmony template travels with it


def test_push_to_hub_offline_is_a_one_line_error(tmp_path, tiny_sft_adapter, run_script):
    out = tmp_path / "merged"
    done = run_script("-m", "clinalign.export", "--adapter", tiny_sft_adapter, "--output_dir", out,
                      "--push_to_hub", "someone/clinalign-test", env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]  # (libraries log too)
    assert errors == [done.stderr.strip().splitlines()[-1]]
    assert errors[0].startswith("error: --push_to_hub someone/clinalign-test: HF_HUB_OFFLINE is set")
    assert "Traceback" not in done.stderr and not out.exists()  # refused before merging anything
