"""GPT-OSS-20B LoRA training in the 4-bit setup on one GPU: peak memory and tokens/s beside the planner.

    python benchmarks/gpt_oss_20b_gpu.py                       # GPT-OSS-20B, seq 1024 and 2048
    python benchmarks/gpt_oss_20b_gpu.py --config path/to/config.json --seqs 512 --steps 2 --device cpu   # smoke run

The model is built from its config with random weights (no hub, no checkpoint): bf16 on the
device, then the setup of `harmony.gpt_oss`: NF4 attention projections (`quantize_linear`), LoRA on
attention and both expert stacks (`lora_config`), NF4 experts (`quantize_experts`), eager attention,
gradient checkpointing, AdamW on the LoRA weights (bf16, as TRL keeps them for a 4-bit base). For each
sequence length: one warm-up step, then `--steps` timed steps of batch 1. Printed per length: peak
memory allocated / reserved (CUDA; on CPU the peak RSS over the RSS after imports), tokens/s, and the planner's prediction
(`harmony/plan.py --gpus 1 --zero 0 --bits 4`: its total without the CUDA-context overhead, to set
beside "allocated", and with it, to set beside "reserved"). Takes about 2-4 minutes on one H100.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

GIB = 1024**3
# GPT-OSS-20B's architecture, as in its config.json (../shared/vendor/gpt-oss-20b/config.json), so the
# benchmark needs no file on the GPU machine.
GPT_OSS_20B = {
    "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 24,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32,
    "num_experts_per_tok": 4, "experts_per_token": 4, "sliding_window": 128, "attention_bias": True,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05, "swiglu_limit": 7.0, "router_aux_loss_coef": 0.9, "output_router_logits": False,
    "tie_word_embeddings": False, "pad_token_id": 199999, "eos_token_id": 200002, "initializer_range": 0.02,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "original_max_position_embeddings": 4096, "truncate": False},
    "rope_theta": 150000,
}  # fmt: skip


def build(config_dict: dict, device: torch.device, lora_r: int):
    """Random-weight GPT-OSS from a config, in the 4-bit + LoRA training setup."""
    from peft import get_peft_model
    from transformers import GptOssConfig, GptOssForCausalLM

    from harmony.gpt_oss import keep_bnb_gradients_on_cpu, lora_config, quantize_experts, quantize_linear

    config = GptOssConfig(**{k: v for k, v in config_dict.items() if k != "quantization_config"})
    config._attn_implementation = "eager"
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = GptOssForCausalLM._from_config(config, dtype=torch.bfloat16)  # initialised on the device
    quantize_linear(model, torch.bfloat16)
    model = get_peft_model(model, lora_config(r=lora_r, alpha=2 * lora_r))
    quantize_experts(model, torch.bfloat16)
    keep_bnb_gradients_on_cpu(model)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    return model


def _proc_status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS


def peak_memory(device: torch.device, baseline_gib: float) -> tuple[float, float]:
    """(allocated, reserved) peak GiB since `reset_peak`; on CPU both are peak RSS minus the RSS after imports."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB, torch.cuda.max_memory_reserved(device) / GIB
    rss = _proc_status_gib("VmHWM") - baseline_gib
    return rss, rss


def run_length(model, optimizer, device, vocab: int, seq: int, steps: int, baseline_gib: float) -> dict:
    """One warm-up step and `steps` timed steps at batch 1 x `seq`."""
    generator = torch.Generator(device="cpu").manual_seed(seq)
    ids = torch.randint(0, vocab, (1, seq), generator=generator).to(device)
    reset_peak(device)
    losses, started = [], None
    for step in range(steps + 1):
        if step == 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    allocated, reserved = peak_memory(device, baseline_gib)
    finite = all(torch.isfinite(torch.tensor(losses)).tolist())
    return {"seq": seq, "tokens_per_s": steps * seq / elapsed, "step_s": elapsed / steps, "allocated_gib": allocated,
            "reserved_gib": reserved, "losses": losses, "finite": finite}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="a GPT-OSS config.json (default: GPT-OSS-20B's)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from harmony.plan import GIB as PLAN_GIB
    from harmony.plan import estimate

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --device cpu for a smoke run")
    config = json.loads(Path(args.config).read_text()) if args.config else GPT_OSS_20B
    baseline_gib = 0.0 if device.type == "cuda" else _proc_status_gib("VmRSS")
    started = time.perf_counter()
    model = build(config, device, args.lora_r)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    built_s = time.perf_counter() - started
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; config {args.config or 'GPT-OSS-20B (built in)'}")
    print(
        f"built + quantized in {built_s:.1f} s; LoRA r={args.lora_r}: {sum(p.numel() for p in trainable) / 1e6:.1f}M trainable"
    )
    if device.type == "cuda":
        print(f"after build: {torch.cuda.memory_allocated(device) / GIB:.2f} GiB allocated")

    results = []
    header = f"{'seq':>6} {'tok/s':>9} {'s/step':>7} {'alloc GiB':>10} {'plan GiB':>9} {'resv GiB':>9} {'plan+ovh':>9}  losses"
    print(header)
    for seq in args.seqs:
        row = run_length(model, optimizer, device, config["vocab_size"], seq, args.steps, baseline_gib)
        plan = estimate(config, gpus=1, zero=0, bits=4, lora_r=args.lora_r, seq=seq, batch=1, overhead_gib=0)
        plan_overhead = estimate(config, gpus=1, zero=0, bits=4, lora_r=args.lora_r, seq=seq, batch=1)
        row["plan_gib"], row["plan_with_overhead_gib"] = plan["total"] / PLAN_GIB, plan_overhead["total"] / PLAN_GIB
        row["plan_parts_gib"] = {k: v / PLAN_GIB for k, v in plan.items() if k not in ("total", "lora_params")}
        results.append(row)
        print(
            f"{seq:>6} {row['tokens_per_s']:>9.0f} {row['step_s']:>7.2f} {row['allocated_gib']:>10.2f} "
            f"{row['plan_gib']:>9.2f} {row['reserved_gib']:>9.2f} {row['plan_with_overhead_gib']:>9.2f}  "
            + " ".join(f"{x:.3f}" for x in row["losses"]),
            flush=True,
        )
        print("        plan parts (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in row["plan_parts_gib"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "built_s": built_s, "results": results}, indent=2))
    if not all(r["finite"] for r in results):
        print("error: a loss was not finite")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
