"""GPT-OSS 4-bit + LoRA on CUDA (bitsandbytes' CUDA kernels). Collected only where CUDA exists (conftest)."""

from __future__ import annotations

import json

import torch

# A small GPT-OSS (20B's layout, fewer and narrower layers) for the benchmark script.
SMALL_CONFIG = {
    "vocab_size": 201088, "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_local_experts": 8,
    "num_experts_per_tok": 4, "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"],
    "tie_word_embeddings": False, "pad_token_id": 199999, "eos_token_id": 200002,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "original_max_position_embeddings": 4096, "truncate": False},
    "rope_theta": 150000,
}  # fmt: skip


def test_nf4_lora_on_attention_and_experts_trains_on_cuda(tiny_gpt_oss):
    from peft import get_peft_model

    from harmony.gpt_oss import load_gpt_oss, lora_config, quantize_experts

    model = load_gpt_oss(tiny_gpt_oss, dtype="bfloat16", device_map={"": 0})
    model = get_peft_model(model, lora_config(r=4, alpha=8))
    assert quantize_experts(model, torch.bfloat16) == 4
    experts = model.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    assert experts.parametrizations.gate_up_proj.original.is_cuda
    assert experts.parametrizations.gate_up_proj.original.dtype == torch.bfloat16
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids = torch.randint(0, 1000, (2, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
        optimizer.step()
        optimizer.zero_grad()
        assert {name: len(s) for name, s in experts.parametrizations.items()} == {"gate_up_proj": 1, "down_proj": 1}
    assert all(not torch.equal(before[n], p) for n, p in trainable.items())


def test_benchmark_runs_a_small_config_on_cuda(tmp_path, run_script):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMALL_CONFIG))
    out = tmp_path / "results.json"
    result = run_script(
        "benchmarks/gpt_oss_20b_gpu.py", "--config", path, "--seqs", "256", "--steps", "1", "--json", out
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["finite"] and row["allocated_gib"] > 0 and row["tokens_per_s"] > 0
