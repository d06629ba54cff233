"""Every upstream patch and private-API use of clinalign, in one module.

Each function below rebinds, bypasses or reads something that TRL, transformers, PEFT, torch or
bitsandbytes does not promise to keep. Each first checks the installed versions of the libraries it
touches against the range it was written and tested for (`SUPPORTED`; pyproject.toml has the same
upper bounds) and, outside it, raises a one-line `ClinalignError` naming the library, its version and
the patch: an upgrade fails where the patch lives instead of silently changing results downstream.
tests/test_compat.py pins, for each patch, the upstream behaviour it relies on or works around, so a
test fails when upstream changes it; widen a range in `SUPPORTED` only once those tests pass.

Nothing is patched on import. The two patches that rebind upstream code process-wide are applied by
explicit, idempotent calls where they are needed (or both at once by `apply()` at a script's start):

- `score_only_labelled_positions()`: TRL's fused LM head (DPO, RLOO/PPO) on a CPU;
- `patch_peft_param_wrapper()`: PEFT's parameter LoRA on 4-bit GPT-OSS experts.

The others act on one object or one call: `keep_bnb_gradients_on_cpu(model)` (every loader),
`without_deepspeed_config()` (`clinalign.devices.whole_on_every_rank`), `model_own_loss(...)`
(`clinalign.sft.PlainLossSFTTrainer`), `require("trainer_sampler_hooks")` (the sampler overrides),
`cpu_has_avx512_bf16()` and `trl_metrics(trainer)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from importlib import metadata

from packaging.version import Version

from clinalign.errors import ClinalignError

# distribution -> (lowest version tested, first version refused): the installed versions when the
# patches were written, up to the next minor release.
SUPPORTED: dict[str, tuple[str, str]] = {
    "trl": ("1.16.0", "1.17"),
    "transformers": ("5.24.0", "5.26"),
    "peft": ("0.21.2", "0.22"),
    "torch": ("2.13.0", "2.14"),
    "bitsandbytes": ("0.50.2", "0.51"),
}


@dataclasses.dataclass(frozen=True)
class Patch:
    touches: str  # the upstream code it rebinds, bypasses or reads
    libraries: tuple[str, ...]  # keys of SUPPORTED


PATCHES: dict[str, Patch] = {
    "score_only_labelled_positions": Patch("trl.trainer.utils._use_triton", ("trl",)),
    "peft_param_wrapper": Patch(
        "peft ParamWrapper._activate_lora/_remove_parametrizations, torch.nn.utils.parametrize._cache",
        ("peft", "torch"),
    ),
    "keep_bnb_gradients_on_cpu": Patch("bitsandbytes Linear4bit.support_avx512bf16_for_cpu", ("bitsandbytes",)),
    "without_deepspeed_config": Patch(
        "transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref", ("transformers",)
    ),
    "model_own_loss": Patch(
        "TRL SFTTrainer.compute_loss bypassed for transformers' Trainer.compute_loss", ("trl", "transformers")
    ),
    "trainer_sampler_hooks": Patch(
        "transformers Trainer._get_train_sampler/_get_eval_sampler overridden", ("transformers",)
    ),
    "cpu_has_avx512_bf16": Patch("torch.cpu._is_avx512_bf16_supported", ("torch",)),
    "trl_metrics": Patch("TRL trainers' private _metrics", ("trl",)),
}


@functools.cache
def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, None if it is not installed (tests replace this)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def require(patch: str) -> None:
    """Refuse (ClinalignError) unless every library `patch` touches is in the range it was written for."""
    for library in PATCHES[patch].libraries:
        low, below = SUPPORTED[library]
        found = installed_version(library)
        # Release numbers only: 2.13.0+cpu is 2.13.0, and a 2.14 pre-release is refused like 2.14.
        if found is None or not Version(low).release <= Version(found).release < Version(below).release:
            raise ClinalignError(
                f"{library} {found or 'is not installed'}: clinalign's '{patch}' patch "
                f"({PATCHES[patch].touches}) was written for {library}>={low},<{below} (see clinalign/compat.py)"
            )


def apply() -> None:
    """Apply the process-wide patches now (for an entry script's start); each is also applied where needed."""
    score_only_labelled_positions()
    patch_peft_param_wrapper()


# ----------------------------------------------------------------------------------------------
# TRL


def score_only_labelled_positions() -> None:
    """Make TRL's fused LM head (DPO, RLOO/PPO) score only the labelled positions on a CPU too.

    On CUDA/XPU TRL projects only the completion positions onto the vocabulary; elsewhere it projects
    every position (fixed tile shapes, for Neuron's compiler) and masks the prompt's afterwards. A CPU
    compiles nothing, and most of a DPO batch is prompt, projected for nothing (README, "Benchmarks").
    The values are the same either way (masked positions are zero in both); tests compare them.
    """
    require("score_only_labelled_positions")
    import trl.trainer.utils as trl_utils
    from trl.kernels.chunked_logprob import _use_triton

    if getattr(trl_utils._use_triton, "clinalign", False):
        return
    compact = lambda device: device.type == "cpu" or _use_triton(device)  # noqa: E731
    compact.clinalign = True
    trl_utils._use_triton = compact


def model_own_loss(trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
    """transformers' `Trainer.compute_loss` on a TRL SFTTrainer: `model(**inputs).loss`, skipping TRL's override.

    TRL 1.16's `SFTTrainer.compute_loss` calls the model with `fused_lm_head=True` (its chunked head,
    for the entropy / token-accuracy metrics); without that flag TRL's patched forward is the model's
    own, so this is the model's cross-entropy, normalised by `num_items_in_batch` like TRL's.
    """
    require("model_own_loss")
    from transformers import Trainer

    return Trainer.compute_loss(trainer, model, inputs, return_outputs, num_items_in_batch)


def trl_metrics(trainer, mode: str = "train") -> dict:
    """A TRL trainer's per-step metric lists (`trainer._metrics[mode]`: name -> values logged next)."""
    require("trl_metrics")
    return trainer._metrics[mode]


# ----------------------------------------------------------------------------------------------
# PEFT and torch's parametrize


def _remove_lora_proxy(self) -> None:
    """PEFT's `ParamWrapper._remove_parametrizations`, also recognising the factored LoRA proxy."""
    from peft.tuners.lora.layer import _LoraFactorsProxy, _LoraParameterProxy
    from torch import nn

    base = self.get_base_layer()
    stack = base.parametrizations[self.parameter_name]
    if len(stack) == 1:
        nn.utils.parametrize.remove_parametrizations(base, self.parameter_name, leave_parametrized=False)
        return
    for i in reversed(range(len(stack))):
        if isinstance(stack[i], (_LoraParameterProxy, _LoraFactorsProxy)):
            del stack[i]
            return
    raise RuntimeError(f"no LoRA parametrization to remove from {self.parameter_name}")


def patch_peft_param_wrapper() -> None:
    """Make PEFT's parameter LoRA work on a parameter that already has a (4-bit) parametrization.

    Two PEFT 0.21.2 defects, both only visible then: the LoRA proxy is never removed (see
    `_remove_lora_proxy`), and with two wrapped parameters on one module (gate_up_proj, down_proj)
    the inner wrapper reads its parameter inside the outer wrapper's `parametrize.cached()` block,
    so the forward reuses that cached value without the inner LoRA, whose weights then get no
    gradient. Dropping that cache entry once the proxy is registered fixes it.
    """
    require("peft_param_wrapper")
    from peft.tuners.lora.layer import ParamWrapper
    from torch import nn

    if getattr(ParamWrapper, "_clinalign_patched", False):
        return
    activate = ParamWrapper._activate_lora

    @contextlib.contextmanager
    def activate_uncached(self, active_adapters):
        with activate(self, active_adapters):
            nn.utils.parametrize._cache.pop((id(self.get_base_layer()), self.parameter_name), None)
            yield

    # PEFT's own methods, kept for tests/test_compat.py (which checks that they still need the patch)
    ParamWrapper._clinalign_originals = {
        "_activate_lora": activate,
        "_remove_parametrizations": ParamWrapper._remove_parametrizations,
    }
    ParamWrapper._activate_lora = activate_uncached
    ParamWrapper._remove_parametrizations = _remove_lora_proxy
    ParamWrapper._clinalign_patched = True


# ----------------------------------------------------------------------------------------------
# bitsandbytes, torch, transformers


def keep_bnb_gradients_on_cpu(model) -> int:
    """Stop bitsandbytes' one-way CPU weight repack, which silently drops gradients.

    On CPUs with AVX512-BF16, `Linear4bit` repacks its weight the first time it runs in eval mode
    without grad; afterwards it calls a kernel with no autograd and input gradients become None.
    Returns the number of 4-bit modules patched.
    """
    import torch

    if torch.cuda.is_available():
        return 0
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    modules = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    if modules:
        require("keep_bnb_gradients_on_cpu")
    for module in modules:
        module.support_avx512bf16_for_cpu = False
    return len(modules)


def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU has AVX512-BF16 (fast bf16 matmuls), as torch's private probe says."""
    require("cpu_has_avx512_bf16")
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported())


@contextlib.contextmanager
def without_deepspeed_config():
    """Hide transformers' global DeepSpeed config inside the block (no `zero.Init` on load), then restore it."""
    require("without_deepspeed_config")
    from transformers.integrations import deepspeed

    saved = deepspeed._hf_deepspeed_config_weak_ref
    deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        deepspeed._hf_deepspeed_config_weak_ref = saved
