"""Memory planner for LoRA training of GPT-OSS: per-GPU memory by part, and whether it fits a card.

    python harmony/plan.py --model ../shared/vendor/gpt-oss-20b/config.json --gpus 1 --zero 0 --bits 4 --lora_r 16 --seq 2048 --batch 1
    python harmony/plan.py --model openai/gpt-oss-20b --gpus 8 --zero 3 --bits 4 --lora_r 16 --seq 4096 --batch 1 --card h100-80gb
    python harmony/plan.py --model tiny-gpt-oss --gpus 2 --zero 2 --bits 16 --lora_r 8 --seq 512 --batch 4 --json

`--model` is a config.json, a model folder, a built-in name (tiny-gpt-oss) or a hub id. `--zero 0`
means no DeepSpeed (one process, torch AdamW: the benchmark's setup). The model is the training
setup of `harmony.gpt_oss`: NF4 attention projections and expert stacks (`--bits 4`; bitsandbytes'
packing, double-quantized statistics and codebooks counted byte for byte), or all 16-bit
(`--bits 16`); 16-bit embeddings, lm_head, norms, biases, router; LoRA on attention and experts;
bf16 compute; gradient checkpointing at each decoder layer; eager attention.

Parts (bytes per GPU):
- weights: the frozen base. ZeRO-3 shards parameters over GPUs (the packed 4-bit data included)
  but keeps 4-bit statistics whole, and gathers one unit at a time: the largest of a MoE block,
  the embeddings or lm_head.
- lora+optimizer: LoRA parameters (16-bit), AdamW moments; under DeepSpeed also fp32 master weights;
  ZeRO-2/3 shard moments and master weights over GPUs (ZeRO-3 the 16-bit LoRA copy too).
- gradients: of the LoRA parameters (fp32 partitions under DeepSpeed, 16-bit without).
- activations: the checkpointed layer inputs; one layer's recompute and backward (eager attention
  scores and softmax, the routed expert activations); the logits (16-bit, fp32 log-probs, fp32 gradients).
- buffers: the dequantized expert stacks of the layer being computed, the copy with the LoRA delta
  folded in and its gradient; the CUDA context and allocator slack (`--overhead_gib`, 0 on `--card cpu`).
The activation terms are estimates; compare them with `benchmarks/gpt_oss_20b_gpu.py` output.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

GIB = 1024**3
BLOCKSIZE = 64  # NF4 block (harmony.gpt_oss.BLOCKSIZE)
NESTED_BLOCKSIZE = 256  # bitsandbytes' double quantization of the absmax values
# Per 4-bit tensor: NF4 codebook (16 fp32) + the 8-bit codebook of the nested absmax (256 fp32) + offset (fp32).
QUANT_STATE_CONSTANT = 16 * 4 + 256 * 4 + 4
# Usable memory per card as torch reports it (total minus what the driver keeps).
CARDS_GIB = {
    "h100-80gb": 79.1,
    "h200-141gb": 139.8,
    "a100-80gb": 79.1,
    "a100-40gb": 39.4,
    "l40s-48gb": 44.4,
    "a10-24gb": 22.1,
    "rtx4090-24gb": 23.6,
    "cpu": math.inf,
}
# Transient tensors per element of one attention-score matrix (batch x heads x seq x (seq + 1 sink)):
# the raw scores, the sink-concatenated logits, their max-shifted copy, the probabilities (kept for
# backward), and one gradient of the same size in backward.
ATTENTION_SCORE_COPIES = 5


@dataclass
class Shape:
    """The sizes of a GPT-OSS config that memory depends on."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    tied: bool


def model_shape(config: dict) -> Shape:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return Shape(
        vocab=config["vocab_size"],
        hidden=config["hidden_size"],
        intermediate=config["intermediate_size"],
        layers=config["num_hidden_layers"],
        heads=config["num_attention_heads"],
        kv_heads=config["num_key_value_heads"],
        head_dim=head_dim,
        experts=config.get("num_local_experts", 1),
        top_k=config.get("num_experts_per_tok") or config.get("experts_per_token", 1),
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def nf4_bytes(numel: int, storage_bytes: int = 2) -> int:
    """Bytes bitsandbytes holds for one NF4 tensor with double quantization (data + statistics)."""
    packed = math.ceil(numel / 2)
    packed = math.ceil(packed / storage_bytes) * storage_bytes  # stored as a storage-dtype tensor
    blocks = math.ceil(numel / BLOCKSIZE)
    nested = math.ceil(blocks / NESTED_BLOCKSIZE)
    return packed + blocks + 4 * nested + QUANT_STATE_CONSTANT


def _attention_weights(s: Shape) -> list[int]:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return [s.hidden * q, s.hidden * kv, s.hidden * kv, q * s.hidden]


def _expert_weights(s: Shape) -> list[int]:
    return [s.experts * s.hidden * 2 * s.intermediate, s.experts * s.intermediate * s.hidden]


def _sixteen_bit_numel(s: Shape) -> int:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    per_layer = (
        2 * s.hidden  # input and post-attention norms
        + q + 2 * kv + s.hidden  # attention biases
        + s.heads  # attention sinks
        + s.experts * s.hidden + s.experts  # router
        + s.experts * 2 * s.intermediate + s.experts * s.hidden  # expert biases
    )  # fmt: skip
    return s.vocab * s.hidden * (1 if s.tied else 2) + s.layers * per_layer + s.hidden


def weight_bytes(s: Shape, bits: int, dtype_bytes: int = 2) -> dict[str, int]:
    """The frozen base weights: `sharded` (parameters) and `whole` (4-bit statistics, rotary buffers)."""
    quantized = _attention_weights(s) + _expert_weights(s)
    rotary = 2 * (s.head_dim // 2) * 4  # inv_freq and original_inv_freq, fp32 buffers
    sixteen = _sixteen_bit_numel(s) * dtype_bytes
    if bits == 16:
        sharded, whole = sixteen + s.layers * sum(quantized) * dtype_bytes, rotary
    else:
        per_layer = [nf4_bytes(n, dtype_bytes) for n in quantized]
        packed = [math.ceil(math.ceil(n / 2) / dtype_bytes) * dtype_bytes for n in quantized]
        sharded = sixteen + s.layers * sum(packed)
        whole = rotary + s.layers * (sum(per_layer) - sum(packed))
    return {"sharded": sharded, "whole": whole, "total": sharded + whole}


def lora_numel(s: Shape, r: int, experts: bool = True) -> int:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    attention = r * (s.hidden + q) + 2 * r * (s.hidden + kv) + r * (q + s.hidden)
    expert = s.experts * r * (s.hidden + 2 * s.intermediate) + s.experts * r * (s.intermediate + s.hidden)
    return s.layers * (attention + (expert if experts else 0))


def _largest_gathered_unit(s: Shape, bits: int, dtype_bytes: int) -> int:
    """What ZeRO-3 gathers at once: a MoE block (a leaf module) or the embeddings / lm_head."""
    experts = sum(_expert_weights(s))
    moe = (math.ceil(experts / 2) if bits == 4 else experts * dtype_bytes) + s.experts * (s.hidden + 1) * dtype_bytes
    return max(moe, s.vocab * s.hidden * dtype_bytes)


def estimate(
    config: dict,
    *,
    gpus: int = 1,
    zero: int = 0,
    bits: int = 4,
    lora_r: int = 16,
    seq: int = 2048,
    batch: int = 1,
    lora_experts: bool = True,
    overhead_gib: float = 0.75,
    dtype_bytes: int = 2,
) -> dict[str, int]:
    """Bytes per GPU by part (see the module docstring) and their total."""
    if zero not in (0, 2, 3) or bits not in (4, 16) or gpus < 1 or (zero == 0 and gpus != 1):
        raise ValueError("need zero in {0, 2, 3} (0: one GPU, no DeepSpeed), bits in {4, 16}, gpus >= 1")
    s = model_shape(config)
    w = weight_bytes(s, bits, dtype_bytes)
    weights = w["whole"] + (
        w["sharded"] // gpus + _largest_gathered_unit(s, bits, dtype_bytes) if zero == 3 else w["sharded"]
    )

    n_lora = lora_numel(s, lora_r, lora_experts)
    if zero == 0:  # torch AdamW keeps its moments in the parameters' (16-bit) dtype
        lora_optimizer, gradients = n_lora * dtype_bytes * 3, n_lora * dtype_bytes
    else:  # DeepSpeed: fp32 master weights + fp32 moments, sharded; the 16-bit copy whole except ZeRO-3
        lora_optimizer = n_lora * 12 // gpus + n_lora * dtype_bytes // (gpus if zero == 3 else 1)
        gradients = n_lora * 4 // gpus + (n_lora * dtype_bytes if zero == 2 else 0)

    tokens = batch * seq
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    checkpoints = s.layers * tokens * s.hidden * dtype_bytes
    attention = ATTENTION_SCORE_COPIES * batch * s.heads * seq * (seq + 1) * dtype_bytes
    attention += 3 * tokens * (2 * q + 2 * kv + 2 * s.hidden) * dtype_bytes  # q, k, v, output, norms; fwd + grad
    routed = tokens * s.top_k
    moe = 3 * routed * (s.hidden + 2 * s.intermediate + s.intermediate + s.hidden) * dtype_bytes
    moe += tokens * s.experts * (dtype_bytes + 4 + 8)  # router logits, softmax, one-hot routing mask
    logits = tokens * s.vocab * (dtype_bytes + 3 * 4)  # 16-bit logits, saved fp32 log-probs, two fp32 gradients
    activations = checkpoints + max(attention + moe, logits)

    expert_stacks = sum(_expert_weights(s)) * dtype_bytes  # one layer's experts, dequantized
    # 4-bit: the dequantized stacks; LoRA on experts: the copy with the LoRA delta folded in, and in
    # backward the gradient with respect to that copy (from which the LoRA factors' gradients come).
    buffers = ((bits == 4) + 2 * lora_experts) * expert_stacks
    subtotal = weights + lora_optimizer + gradients + activations + buffers
    buffers += int(overhead_gib * GIB + 0.05 * subtotal) if overhead_gib else 0
    parts = {
        "weights": weights,
        "lora+optimizer": lora_optimizer,
        "gradients": gradients,
        "activations": activations,
        "buffers": buffers,
    }
    parts["total"] = sum(parts.values())
    parts["lora_params"] = n_lora
    return parts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="config.json, model folder, built-in name or hub id")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--zero", type=int, choices=[0, 2, 3], default=3)
    parser.add_argument("--bits", type=int, choices=[4, 16], default=4)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1, help="micro-batch per GPU")
    parser.add_argument("--no_lora_experts", action="store_true", help="LoRA on attention only")
    parser.add_argument("--card", choices=sorted(CARDS_GIB), default="h100-80gb")
    parser.add_argument("--overhead_gib", type=float, default=None, help="CUDA context + slack (default 0.75, cpu 0)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from clinalign.errors import ClinalignError
    from harmony.gpt_oss import config_dict

    try:
        config = config_dict(args.model)
    except (ClinalignError, OSError, ValueError) as e:
        print(f"error: cannot read a model config from {args.model}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    overhead = args.overhead_gib if args.overhead_gib is not None else (0.0 if args.card == "cpu" else 0.75)
    try:
        parts = estimate(
            config, gpus=args.gpus, zero=args.zero, bits=args.bits, lora_r=args.lora_r, seq=args.seq,
            batch=args.batch, lora_experts=not args.no_lora_experts, overhead_gib=overhead,
        )  # fmt: skip
    except (KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    capacity = CARDS_GIB[args.card]
    fits = parts["total"] / GIB <= capacity
    if args.json:
        print(json.dumps({**parts, "card": args.card, "capacity_gib": capacity, "fits": fits}))
        return 0
    print(
        f"{args.model}: {args.gpus} GPU(s), ZeRO-{args.zero}, {args.bits}-bit base, LoRA r={args.lora_r} "
        f"({parts['lora_params'] / 1e6:.1f}M params), seq {args.seq} x batch {args.batch}"
    )
    for name in ("weights", "lora+optimizer", "gradients", "activations", "buffers", "total"):
        print(f"  {name:<15} {parts[name] / GIB:8.2f} GiB")
    verdict = "fits" if fits else "does NOT fit"
    print(f"  {args.card}: {capacity:.1f} GiB usable -> {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
