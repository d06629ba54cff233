"""GPT-OSS 4-bit + LoRA on CUDA (bitsandbytes' CUDA kernels). Collected only where CUDA exists (conftest)."""

from __future__ import annotations

import json
import math

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


def test_4bit_reward_model_trains_reloads_and_scores_on_cuda(tiny_gpt_oss, tmp_path):
    """reward/train.py on GPT-OSS in 4-bit (as tests/test_gpt_oss_paths.py on CPU), then load_reward_model:
    the whole rebuilt model on the GPU (its experts are quantized there), scores as trained."""
    import runpy
    from pathlib import Path

    from clinalign.rewards import load_reward_model, score_responses

    rows = [
        {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": f"Answer: A. {a}"}],
         "rejected": [{"role": "assistant", "content": f"Answer: B. {b}"}], "margin": 1.0}
        for q, a, b in [("Which vitamin deficiency causes scurvy?", "Vitamin C", "Vitamin D"),
                        ("Which organ secretes insulin?", "Pancreas", "Liver")]
    ]  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    repo = Path(__file__).resolve().parents[1]
    entry = runpy.run_path(str(repo / "reward" / "train.py"), run_name="gpu_check")
    args = ["--model_name_or_path", "tiny-gpt-oss", "--dtype", "bfloat16", "--load_in_4bit", "true",
            "--use_bnb_nested_quant", "true", "--bnb_4bit_quant_storage", "bfloat16", "--lora_r", "4",
            "--lora_alpha", "8", "--lora_dropout", "0.0", "--lora_target_modules", "q_proj", "k_proj", "v_proj",
            "o_proj", "--lora_target_parameters", "mlp.experts.gate_up_proj", "mlp.experts.down_proj",
            "--pairs", str(tmp_path / "pairs.jsonl"), "--eval_fraction", "0.0", "--output_dir", str(tmp_path / "rm"),
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "512",
            "--save_strategy", "no", "--report_to", "none"]  # fmt: skip
    metrics = entry["main"](*entry["make_parser"]().parse(args))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in metrics["train"] if "loss" in h)
    model, tokenizer = load_reward_model(tmp_path / "rm")
    assert all(p.is_cuda for p in model.parameters())
    scores = score_responses(model, tokenizer, [r["prompt"] for r in rows], [r["chosen"][0]["content"] for r in rows])
    assert all(map(math.isfinite, scores)) and scores[0] != scores[1]
