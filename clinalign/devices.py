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
    from transformers.integrations import deepspeed

    saved = deepspeed._hf_deepspeed_config_weak_ref
    deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        deepspeed._hf_deepspeed_config_weak_ref = saved
