"""The one device rule: where every model the toolkit loads is placed.

Every loader (`clinalign.models.load_causal_lm`, the reward model's `clinalign.rewards.reward_backbone`,
GPT-OSS's `harmony.gpt_oss.load_gpt_oss`) passes `device_map()` to `from_pretrained`, so a model
lands on this process's device as it loads: accelerate's `PartialState().device`, i.e. the local
rank's GPU under `accelerate launch`, `cuda:0` (or mps/xpu) in a plain `python` process with one,
else the CPU. 4-bit weights are quantized by bitsandbytes where they land, so the same map places them.

Under DeepSpeed ZeRO-3 a model being trained is loaded with no device map (DeepSpeed refuses one; its
`zero.Init` shards the weights and the engine places them). A model that is only scored (the reward
model inside PPO's reward function, eval's reference) is loaded outside `zero.Init` as a whole,
unsharded copy on every rank's device (`whole_on_every_rank`), so each rank scores its own batch
without waiting on the others.
"""

from __future__ import annotations

import contextlib

import torch

from clinalign.compat import cpu_has_avx512_bf16
from clinalign.errors import ClinalignError


def process_device() -> torch.device:
    """This process's compute device, as accelerate assigns it (the local rank's under a launch)."""
    from accelerate import PartialState

    return PartialState().device


def device_map() -> dict[str, str] | None:
    """`from_pretrained`'s `device_map` for this process: the whole model on `process_device()`;
    None under ZeRO-3 while it shards (DeepSpeed places the weights itself)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return None
    return {"": str(process_device())}


@contextlib.contextmanager
def whole_on_every_rank():
    """Load without DeepSpeed's `zero.Init`: each rank gets the whole model on its own device.

    For models that are merged into, quantized, or only scored: all need every weight on the rank
    that uses it. (DeepSpeed still shards a trained model when the trainer prepares it.)
    """
    from clinalign.compat import without_deepspeed_config

    with without_deepspeed_config():
        yield


# ----------------------------------------------------------------------------------------------
# The compute dtype


def has_fast_bf16() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_avx512_bf16()


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """'auto' -> bfloat16 where bf16 matmuls are fast (CUDA with bf16, AVX512-BF16 CPUs), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if has_fast_bf16() else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    except KeyError:
        raise ClinalignError(f"unknown dtype '{dtype}' (use auto, bfloat16, float16 or float32)") from None
