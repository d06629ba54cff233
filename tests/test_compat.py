"""clinalign.compat: each patch's version guard, and the upstream behaviour each patch relies on or works around.

The behaviour tests fail when upstream changes what a patch touches: then the patch is either
obsolete (upstream fixed the defect) or broken (the private name moved). Fix or drop the patch before
widening its range in `compat.SUPPORTED` and the upper bound in pyproject.toml.
"""

from __future__ import annotations

import inspect
import types

import pytest
import torch
from torch import nn

from clinalign import compat
from clinalign.errors import ClinalignError


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


# ----------------------------------------------------------------------------------------------
# The version guard


def test_installed_versions_are_in_every_patch_range():
    for patch in compat.PATCHES:
        compat.require(patch)


def test_every_patched_library_has_a_range_and_a_pyproject_upper_bound():
    import re
    from pathlib import Path

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    for patch in compat.PATCHES.values():
        for library in patch.libraries:
            low, below = compat.SUPPORTED[library]
            assert f'"{library}>={low},<{below}"' in pyproject, library
    assert set(compat.SUPPORTED) == {lib for patch in compat.PATCHES.values() for lib in patch.libraries}
    assert all(re.fullmatch(r"\d+\.\d+", below) for _, below in compat.SUPPORTED.values())


@pytest.mark.parametrize(
    "patch, library",
    [(patch, library) for patch in sorted(compat.PATCHES) for library in compat.PATCHES[patch].libraries],
)
@pytest.mark.parametrize("version", ["99.0", "0.0.1", None])
def test_the_guard_refuses_a_version_outside_the_range(patch, library, version, monkeypatch):
    real = compat.installed_version
    monkeypatch.setattr(compat, "installed_version", lambda dist: version if dist == library else real(dist))
    with pytest.raises(ClinalignError) as error:
        compat.require(patch)
    message = str(error.value)
    assert "\n" not in message and library in message and f"'{patch}'" in message
    assert f"{library}>={compat.SUPPORTED[library][0]},<{compat.SUPPORTED[library][1]}" in message


def test_the_guard_compares_release_numbers(monkeypatch):
    for version, ok in [
        ("2.13.0+cpu", True),
        ("2.13.9", True),
        ("2.14.0rc1", False),
        ("2.14.0", False),
        ("2.12.9", False),
    ]:
        monkeypatch.setattr(compat, "installed_version", lambda dist, v=version: v)
        if ok:
            compat.require("cpu_has_avx512_bf16")
        else:
            with pytest.raises(ClinalignError):
                compat.require("cpu_has_avx512_bf16")


def bnb_model():
    import bitsandbytes as bnb

    linear = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    return nn.Sequential(linear.to("cpu"))  # quantized on its first move to a device


@pytest.mark.parametrize(
    "patch, call",
    [
        ("score_only_labelled_positions", lambda: compat.score_only_labelled_positions()),
        ("score_only_labelled_positions", lambda: compat.apply()),
        ("peft_param_wrapper", lambda: compat.patch_peft_param_wrapper()),
        ("keep_bnb_gradients_on_cpu", lambda: compat.keep_bnb_gradients_on_cpu(bnb_model())),
        ("without_deepspeed_config", lambda: compat.without_deepspeed_config().__enter__()),
        ("model_own_loss", lambda: compat.model_own_loss(None, None, {})),
        ("cpu_has_avx512_bf16", lambda: compat.cpu_has_avx512_bf16()),
        ("trl_metrics", lambda: compat.trl_metrics(types.SimpleNamespace(_metrics={"train": {}}))),
    ],
)
def test_each_patch_checks_its_version_before_it_acts(patch, call, monkeypatch):
    import trl.trainer.utils as trl_utils
    from peft.tuners.lora.layer import ParamWrapper

    before = trl_utils._use_triton, ParamWrapper._activate_lora, ParamWrapper._remove_parametrizations
    library = compat.PATCHES[patch].libraries[0]
    monkeypatch.setattr(compat, "installed_version", lambda dist: "99.0" if dist == library else "0.0.0")
    with pytest.raises(ClinalignError, match=patch):
        call()
    assert (trl_utils._use_triton, ParamWrapper._activate_lora, ParamWrapper._remove_parametrizations) == before


def test_nothing_is_patched_on_import():
    import subprocess
    import sys

    code = (
        "import clinalign.compat, clinalign.models, clinalign.sft, clinalign.dpo, clinalign.ppo, harmony.gpt_oss\n"
        "import trl.trainer.utils as u, trl.kernels.chunked_logprob as k\n"
        "from peft.tuners.lora.layer import ParamWrapper\n"
        "assert u._use_triton is k._use_triton and not hasattr(ParamWrapper, '_clinalign_patched')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------
# TRL: `_use_triton` decides whether the fused LM head scores only the labelled positions


def test_trl_fused_head_scores_every_position_on_cpu_and_reads_use_triton_at_call_time(monkeypatch):
    import trl.trainer.utils as trl_utils
    from trl.kernels.chunked_logprob import _use_triton

    # The behaviour worked around: TRL's own rule is "compact on CUDA/XPU only".
    assert parameters(_use_triton) == ["device"] and _use_triton(torch.device("cpu")) is False
    # The patch rebinds the module global that TRL's fused forward looks up on every call.
    seen = []
    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: seen.append(device) or False)
    model = tiny_llama()
    trl_utils.add_fused_lm_head(model, outputs=("log_probs",))
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert seen and all(device.type == "cpu" for device in seen)

    monkeypatch.setattr(trl_utils, "_use_triton", _use_triton)  # restored after the test
    compat.score_only_labelled_positions()
    patched = trl_utils._use_triton
    assert patched(torch.device("cpu")) is True and patched(torch.device("meta")) is False
    compat.score_only_labelled_positions()  # idempotent
    assert trl_utils._use_triton is patched


# ----------------------------------------------------------------------------------------------
# TRL SFTTrainer: the loss PlainLossSFTTrainer bypasses


def test_sft_trainer_loss_is_the_fused_head_and_the_plain_forward_is_the_models_own():
    import trl.trainer.utils as trl_utils
    from transformers import Trainer
    from trl import SFTTrainer

    # What is bypassed: SFTTrainer overrides Trainer.compute_loss with its fused head.
    assert SFTTrainer.compute_loss is not Trainer.compute_loss
    assert "fused_lm_head=True" in inspect.getsource(SFTTrainer.compute_loss)
    assert parameters(Trainer.compute_loss) == ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]
    # What is relied on: without fused_lm_head=True, TRL's patched forward is the model's own forward and loss.
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids, labels=ids)
        trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        patched = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(patched.loss, plain.loss)
    torch.testing.assert_close(patched.logits, plain.logits)


# ----------------------------------------------------------------------------------------------
# transformers' Trainer: the private sampler hooks that clinalign overrides


def test_trainer_sampler_hooks_keep_their_names_and_signatures():
    from transformers import Trainer

    assert parameters(Trainer._get_train_sampler) == ["self", "train_dataset"]
    assert inspect.signature(Trainer._get_train_sampler).parameters["train_dataset"].default is None
    assert parameters(Trainer._get_eval_sampler) == ["self", "eval_dataset"]
    assert "sampler_fn=self._get_train_sampler" in inspect.getsource(Trainer.get_train_dataloader)
    assert "sampler_fn=self._get_eval_sampler" in inspect.getsource(Trainer.get_eval_dataloader)


# ----------------------------------------------------------------------------------------------
# TRL: the private per-step metrics (RLOO's KL, read by clinalign.kl_control)


def test_trl_metrics_are_per_mode_lists_the_trainer_logs():
    from trl import RLOOTrainer

    init, log = inspect.getsource(RLOOTrainer.__init__), inspect.getsource(RLOOTrainer.log)
    assert 'self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}' in init
    assert "self._metrics[mode]" in log
    metrics = {"train": {"kl": [0.1]}, "eval": {}}
    assert compat.trl_metrics(types.SimpleNamespace(_metrics=metrics)) is metrics["train"]


# ----------------------------------------------------------------------------------------------
# PEFT's ParamWrapper and torch's parametrize cache


def peft_originals():
    from peft.tuners.lora.layer import ParamWrapper

    originals = getattr(ParamWrapper, "_clinalign_originals", {})
    return (
        originals.get("_activate_lora", ParamWrapper._activate_lora),
        originals.get("_remove_parametrizations", ParamWrapper._remove_parametrizations),
    )


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, weight):
        return weight * self.factor


def stacked_module():
    """A 3-D parameter with a first parametrization (the 4-bit one's stand-in) and PEFT's factored proxy on top."""
    from peft.tuners.lora.layer import _LoraFactorsProxy

    module = nn.Module()
    module.weight = nn.Parameter(torch.ones(2, 3, 4))
    nn.utils.parametrize.register_parametrization(module, "weight", Scale(2.0))
    proxy = _LoraFactorsProxy(torch.ones(2, 3, 1), torch.ones(2, 1, 4), 0.5)
    nn.utils.parametrize.register_parametrization(module, "weight", proxy)
    wrapper = types.SimpleNamespace(get_base_layer=lambda: module, parameter_name="weight")
    return module, wrapper


def test_peft_param_wrapper_still_has_the_methods_the_patch_replaces():
    from peft.tuners.lora.layer import ParamWrapper

    activate, remove = peft_originals()
    assert parameters(activate) == ["self", "active_adapters"] and parameters(remove) == ["self"]
    # the proxy is registered, then the forward runs inside parametrize.cached() (the cache the patch clears)
    source = inspect.getsource(activate)
    assert source.index("register_parametrization(") < source.index("parametrize.cached()")
    assert "self._activate_lora(self.active_adapters)" in inspect.getsource(ParamWrapper.forward)


def test_peft_removes_only_the_unfactored_proxy_from_a_stack_and_the_patch_removes_both():
    _, remove = peft_originals()
    module, wrapper = stacked_module()
    with pytest.warns(UserWarning, match="Could not find any LoRA parametrization"):
        remove(wrapper)  # PEFT 0.21.2's defect: the factored proxy stays on
    assert len(module.parametrizations.weight) == 2

    module, wrapper = stacked_module()
    compat._remove_lora_proxy(wrapper)
    assert len(module.parametrizations.weight) == 1 and torch.equal(module.weight, torch.full((2, 3, 4), 2.0))


def test_torch_parametrize_cache_keeps_a_stale_value_until_its_entry_is_dropped():
    module = nn.Module()
    module.weight = nn.Parameter(torch.ones(3))
    nn.utils.parametrize.register_parametrization(module, "weight", Scale(2.0))
    key = (id(module), "weight")
    with nn.utils.parametrize.cached():
        assert torch.equal(module.weight, torch.full((3,), 2.0)) and key in nn.utils.parametrize._cache
        nn.utils.parametrize.register_parametrization(module, "weight", Scale(5.0))
        assert torch.equal(module.weight, torch.full((3,), 2.0))  # stale: the defect the patch works around
        nn.utils.parametrize._cache.pop(key, None)
        assert torch.equal(module.weight, torch.full((3,), 10.0))


def test_patch_peft_param_wrapper_is_idempotent_and_keeps_the_originals(monkeypatch):
    from peft.tuners.lora.layer import ParamWrapper

    activate, remove = peft_originals()
    for name, value in [("_activate_lora", activate), ("_remove_parametrizations", remove)]:
        monkeypatch.setattr(ParamWrapper, name, value)  # PEFT's own; restored after the test
    monkeypatch.setattr(ParamWrapper, "_clinalign_patched", False, raising=False)
    compat.patch_peft_param_wrapper()
    patched = ParamWrapper._activate_lora
    assert ParamWrapper._remove_parametrizations is compat._remove_lora_proxy
    assert ParamWrapper._clinalign_originals == {"_activate_lora": activate, "_remove_parametrizations": remove}
    compat.patch_peft_param_wrapper()
    assert ParamWrapper._activate_lora is patched


# ----------------------------------------------------------------------------------------------
# bitsandbytes: Linear4bit's one-way CPU repack


@pytest.mark.filterwarnings(
    "ignore:.*an autograd kernel was not registered:UserWarning"
)  # torch: no autograd kernel (the defect)
def test_bnb_cpu_repack_drops_input_gradients_unless_switched_off():
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    assert "self.support_avx512bf16_for_cpu" in inspect.getsource(bnb.nn.Linear4bit.forward)
    if not has_avx512bf16():
        pytest.skip("the repack happens only on CPUs with AVX512-BF16")

    def input_gradient(patch: bool):
        model = bnb_model()
        assert model[0].support_avx512bf16_for_cpu
        if patch:
            assert compat.keep_bnb_gradients_on_cpu(model) == 1 and not model[0].support_avx512bf16_for_cpu
        x = torch.randn(2, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()
        x = x.clone().requires_grad_()
        model(x).float().sum().backward()
        return x.grad

    assert input_gradient(patch=False) is None  # the defect
    gradient = input_gradient(patch=True)
    assert gradient is not None and gradient.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# transformers: the global DeepSpeed config that makes from_pretrained use zero.Init


def test_deepspeed_config_is_a_module_global_weak_ref_read_by_zero3_checks(monkeypatch):
    from transformers import modeling_utils
    from transformers.integrations import deepspeed, is_deepspeed_zero3_enabled

    monkeypatch.setattr(deepspeed, "_hf_deepspeed_config_weak_ref", deepspeed._hf_deepspeed_config_weak_ref)

    class Zero3:
        def is_zero3(self):
            return True

    config = Zero3()
    deepspeed.set_hf_deepspeed_config(config)
    assert deepspeed._hf_deepspeed_config_weak_ref() is config and is_deepspeed_zero3_enabled()
    saved = deepspeed._hf_deepspeed_config_weak_ref
    with compat.without_deepspeed_config():
        assert not is_deepspeed_zero3_enabled()
    assert deepspeed._hf_deepspeed_config_weak_ref is saved and is_deepspeed_zero3_enabled()
    assert "needs_zero3_init = is_deepspeed_zero3_enabled()" in inspect.getsource(modeling_utils)


# ----------------------------------------------------------------------------------------------
# torch: the private AVX512-BF16 probe


def test_torch_avx512_bf16_probe_still_exists():
    assert parameters(torch.cpu._is_avx512_bf16_supported) == []
    assert compat.cpu_has_avx512_bf16() is bool(torch.cpu._is_avx512_bf16_supported())
