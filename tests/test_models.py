"""Model resolution, the embedded default's cache, tiny models, pad tokens, adapters and their base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clinalign import devices, model_store, models
from clinalign.adapters import write_adapter_provenance
from clinalign.errors import ClinalignError


def test_default_model_cache_matches_gguf_and_generates():
    """The cached safetensors checkpoint is the GGUF model, exactly, and it answers a question."""
    from transformers import AutoModelForCausalLM

    cached_path = models.resolve_model("smollm2")
    assert (cached_path and (model_store.home() / "models").exists())
    model, tokenizer = models.load_policy("smollm2", dtype="float32")
    gguf = model_store.smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)

    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()
    assert "Paris" in text


HUB_LOAD = r"""
import sys
from clinalign.models import load_policy
model, _ = load_policy(sys.argv[1])
print(model.config.hidden_size)
"""


def test_smollm2_hub_id_means_the_hub_weights_not_the_embedded_gguf(tmp_path, tiny_llama):
    """`smollm2` is the embedded GGUF; the hub id loads the hub's weights from the local hub cache,
    and offline without them is a one-line error, never a silent swap for the GGUF."""
    import shutil

    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id not in model_store.BUILTIN_NAMES
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    missing = subprocess.run([sys.executable, "-c", HUB_LOAD, hub_id], capture_output=True, text=True,
                             env={**os.environ, **env})  # fmt: skip
    assert missing.returncode != 0
    assert f"model {hub_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1" in missing.stderr
    assert "'smollm2'" in missing.stderr

    # The hub cache's own layout (models--org--name/snapshots/<commit>, refs/main), holding tiny-llama.
    repo = tmp_path / "hf" / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    commit = "0" * 40
    shutil.copytree(tiny_llama, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    found = subprocess.run([sys.executable, "-c", HUB_LOAD, hub_id], capture_output=True, text=True,
                           env={**os.environ, **env})  # fmt: skip
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.split()[-1] == "64"  # the cached hub weights (tiny-llama's width), not the GGUF's 576


def test_cache_build_is_atomic(tmp_path, monkeypatch):
    """A build that dies leaves nothing a later run would load; the next call builds it cleanly."""
    monkeypatch.setenv("CLINALIGN_HOME", str(tmp_path))

    def broken(out):
        (out / "config.json").write_text("{}")  # half-written...
        raise KeyboardInterrupt  # ...then killed

    with pytest.raises(KeyboardInterrupt):
        model_store.cached("thing", broken)
    assert not (tmp_path / "models" / "thing").exists()
    assert not any(p.name.startswith(".thing.tmp") for p in (tmp_path / "models").iterdir())

    def good(out):
        (out / "config.json").write_text('{"ok": true}')

    path = model_store.cached("thing", good)
    assert json.loads((path / "config.json").read_text()) == {"ok": True}


def test_killed_conversion_leaves_no_model(tmp_path):
    """SIGKILL in the middle of a real build: the cache entry does not exist afterwards."""
    code = (
        "import os, signal\n"
        "from clinalign import model_store\n"
        "def build(out):\n"
        "    (out / 'config.json').write_text('{}')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "model_store.cached('victim', build)\n"
    )
    env = {"CLINALIGN_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert result.returncode == -9
    assert not (tmp_path / "models" / "victim").exists()


def test_tiny_models_are_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINALIGN_HOME", str(tmp_path / "a"))
    first = models.resolve_model("tiny-llama")
    monkeypatch.setenv("CLINALIGN_HOME", str(tmp_path / "b"))
    second = models.resolve_model("tiny-llama")
    from safetensors.torch import load_file

    a, b = load_file(f"{first}/model.safetensors"), load_file(f"{second}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_gpt_oss_uses_the_harmony_vocabulary(tiny_gpt_oss):
    from transformers import AutoConfig

    from harmony.vocab import VOCAB_SIZE, vocab_file

    config = AutoConfig.from_pretrained(tiny_gpt_oss)
    assert config.model_type == "gpt_oss"
    if vocab_file() is not None:
        assert config.vocab_size == VOCAB_SIZE


def test_pad_token_added_without_resizing(tiny_llama):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(tiny_llama)
    assert raw.pad_token is None  # the tiny tokenizer, like many real ones, has none
    tokenizer = models.load_tokenizer("tiny-llama")
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == len(raw)  # an existing special token serves: no new embedding row


def test_default_model_pad_is_not_eos():
    tokenizer = models.load_tokenizer("smollm2")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_missing_model_path_is_a_clear_error():
    with pytest.raises(ClinalignError, match="model not found: ./nowhere"):
        models.resolve_model("./nowhere")


def test_adapter_from_another_base_is_refused(tmp_path, tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    write_adapter_provenance(adapter, "tiny-llama", peft_model)

    # Same architecture and shapes, different weights: only the provenance check can tell.
    torch.manual_seed(99)
    other = LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_llama))
    other_dir = tmp_path / "other-base"
    other.save_pretrained(other_dir)
    models.load_tokenizer("tiny-llama").save_pretrained(other_dir)

    model, _ = models.load_policy("tiny-llama", adapter)  # its own base: fine
    assert model.peft_config["default"].r == 2
    with pytest.raises(ClinalignError, match="was trained on base model 'tiny-llama'"):
        models.load_policy(str(other_dir), adapter)


def test_resolve_dtype():
    assert devices.resolve_dtype("float32") is torch.float32
    assert devices.resolve_dtype("auto") in (torch.bfloat16, torch.float32)
    with pytest.raises(ClinalignError):
        devices.resolve_dtype("fp8")
