"""GPT-OSS for LoRA training with 4-bit NF4 base weights (bitsandbytes), alone or under DeepSpeed ZeRO-3.

    model = load_gpt_oss("openai/gpt-oss-20b", dtype="bfloat16")   # NF4 attention, experts still 16-bit
    trainer = SFTTrainer(model=model, peft_config=lora_config(r=16, alpha=32), ...)
    quantize_experts(trainer.model, torch.bfloat16)                  # NF4 experts, after LoRA is attached
    trainer.train()

Quantize the experts only once LoRA is attached (by SFTTrainer, `get_peft_model` or
`PeftModel.from_pretrained`): PEFT nests the two expert wrappers in a different order on an
already-parametrized module, so an adapter trained that way would not load onto a 16-bit base.

What bitsandbytes and transformers do not do for GPT-OSS, and how this module fills the gap:

- The published checkpoint is MXFP4. transformers refuses a `BitsAndBytesConfig` for it ("The model is
  quantized with Mxfp4Config but you are passing a BitsAndBytesConfig"), so an MXFP4 checkpoint is
  loaded with `Mxfp4Config(dequantize=True)` (bf16) and its linear layers are then quantized here.
  A bf16 checkpoint loads with the `BitsAndBytesConfig` of `nf4_config()` directly.
- The experts are fused 3-D `nn.Parameter`s (`mlp.experts.gate_up_proj`, `down_proj`), not
  `nn.Linear`, so transformers' 4-bit loader leaves them 16-bit: 19.1 of GPT-OSS-20B's 20.9 billion
  parameters, 38.2 GB in bf16 against about 10 GB in NF4. `quantize_experts` quantizes them with
  bitsandbytes' parametrization (`bitsandbytes.nn.parametrize`): the parameter holds NF4 data, and
  reading it dequantizes (cached for one forward).
- PEFT's LoRA on those parameters (`target_parameters`) stacks its own parametrization on top,
  which PEFT 0.21.2 gets wrong in two ways (`clinalign.compat.patch_peft_param_wrapper` says which and fixes them;
  tests/test_gpt_oss_cpu.py checks the result against the same model with the 4-bit experts
  dequantized into plain parameters).
- Storage: every 4-bit tensor is stored in the compute dtype (`bnb_4bit_quant_storage`), so ZeRO-3
  sees one dtype and shards the packed weights like any other parameter.
- ZeRO-3 must gather a whole MoE block at once (the router picks experts at run time):
  `deepspeed.utils.set_z3_leaf_modules(model, [GptOssMLP])`.
- Do not call PEFT's `prepare_model_for_kbit_training` on this model (TRL's SFTTrainer does not):
  it casts every 16-bit parameter that is not a `Params4bit` to fp32, which would turn the packed
  expert bytes (stored as bf16) into garbage.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from clinalign.compat import keep_bnb_gradients_on_cpu, patch_peft_param_wrapper
from clinalign.devices import device_map as clinalign_device_map
from clinalign.devices import process_device, resolve_dtype
from clinalign.errors import ClinalignError
from clinalign.model_store import CACHE_VERSION, cached, resolve_checkpoint
from clinalign.tiny_models import save_seeded, tiny_shape, tiny_tokenizer
from harmony.vocab import gpt_oss_tokenizer, vocab_file

ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
BLOCKSIZE = 64  # bitsandbytes' default NF4 block


def nf4_config(compute_dtype: torch.dtype):
    """The `BitsAndBytesConfig` used for every 4-bit tensor: NF4, double quantization, storage = compute dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,
        # The router is not nn.Linear anyway; naming it keeps it 16-bit in any future bitsandbytes walker.
        # The output heads stay 16-bit: lm_head, and a reward model's `score` (trained in full).
        llm_int8_skip_modules=["router", "lm_head", "score"],
    )


def checkpoint_quantization(path: str) -> str | None:
    """The `quant_method` of a checkpoint's config.json ("mxfp4" for the published GPT-OSS), or None."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    quantization = getattr(config, "quantization_config", None) or {}
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    return quantization.get("quant_method")


def is_experts(module: nn.Module) -> bool:
    """A GPT-OSS expert stack (also once parametrized: parametrize subclasses the module's class)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    return isinstance(module, GptOssExperts)


def quantize_experts(model: nn.Module, storage: torch.dtype) -> int:
    """Quantize every expert stack (`gate_up_proj`, `down_proj`) to NF4 in place; returns how many.

    Works on a plain model, a PeftModel or `trainer.model` (before `train()`). Each stack is
    quantized on the GPU when there is one, one at a time, so the peak is the 16-bit model plus
    one expert stack.
    """
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    patch_peft_param_wrapper()
    done = 0
    for module in list(model.modules()):
        if not is_experts(module) or nn.utils.parametrize.is_parametrized(module):
            continue
        for name in EXPERT_PARAMETERS:
            parameter = getattr(module, name)
            if parameter.device != process_device():
                # A model loaded without device_map (ZeRO-3) is still on the CPU. The 4-bit statistics
                # live outside the parameter and would not follow it to the GPU: quantize there now.
                parameter.data = parameter.data.to(process_device())
            replace_parameter_4bit(module, name, compress_statistics=True, quant_type="nf4", blocksize=BLOCKSIZE)
            packed = module.parametrizations[name].original
            if storage != torch.uint8:  # same bytes, seen as the compute dtype (what Params4bit's quant_storage does)
                packed.data = packed.data.reshape(-1).view(storage).unsqueeze(1)
            done += 1
    return done


def quantize_linear(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace the attention `nn.Linear` layers with bitsandbytes `Linear4bit` (NF4); returns how many.

    For models that did not come through transformers' 4-bit loader (an MXFP4 checkpoint
    dequantized on load, a model built from its config, a reward backbone with an SFT adapter
    merged in 16-bit). Only the attention projections are replaced: `lm_head` and a reward
    model's `score` head stay 16-bit.
    """
    import bitsandbytes as bnb

    done = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name not in ATTENTION_PROJECTIONS or type(child) is not nn.Linear:
                continue
            quantized = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
                quant_storage=compute_dtype,
                device="meta",
            )
            quantized.weight = bnb.nn.Params4bit(
                child.weight.data,
                requires_grad=False,
                blocksize=BLOCKSIZE,
                compress_statistics=True,
                quant_type="nf4",
                quant_storage=compute_dtype,
                module=quantized,
            ).to(child.weight.device)  # quantizes
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, quantized)
            done += 1
    return done


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype) -> dict[str, int]:
    """Attention projections (if still 16-bit) and experts to NF4, for a model without LoRA on experts."""
    counts = {"linear": quantize_linear(model, compute_dtype), "experts": quantize_experts(model, compute_dtype)}
    counts["cpu_patched"] = keep_bnb_gradients_on_cpu(model)
    return counts


def set_moe_leaf_modules(model: nn.Module) -> int:
    """Mark each MoE block (router + experts) as a ZeRO-3 leaf, gathered whole; returns how many blocks."""
    try:
        from deepspeed.utils import set_z3_leaf_modules
    except ImportError:
        return 0
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    return len(set_z3_leaf_modules(model, [GptOssMLP]))


# ----------------------------------------------------------------------------------------------
# The built-in tiny GPT-OSS (tests, smoke runs)


def _build_tiny_gpt_oss(out: Path) -> None:
    from transformers import GptOssConfig, GptOssForCausalLM

    # The real o200k harmony tokenizer when its vocabulary file is available (so token ids rendered
    # by openai-harmony are valid model inputs); otherwise a tiny BPE tokenizer.
    tokenizer = gpt_oss_tokenizer() or tiny_tokenizer()
    config = GptOssConfig(
        **tiny_shape(tokenizer),
        intermediate_size=64,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        sliding_window=32,
        output_router_logits=True,
        # GPT-OSS's YaRN rope layout (a default rope block warns of a factor mismatch).
        rope_parameters={
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 128,
            "rope_theta": 150000.0,
        },
        pad_token_id=tokenizer.pad_token_id,
    )
    save_seeded(GptOssForCausalLM, config, tokenizer, out)


def _tiny_gpt_oss_name() -> str:
    return f"tiny-gpt-oss-{'o200k' if vocab_file() else 'bpe'}-{CACHE_VERSION}"


def resolve_model(name_or_path: str) -> str:
    """`clinalign.model_store.resolve_checkpoint`, plus the built-in `tiny-gpt-oss` this module builds."""
    if name_or_path == "tiny-gpt-oss":
        return str(cached(_tiny_gpt_oss_name(), _build_tiny_gpt_oss))
    return resolve_checkpoint(name_or_path)


# ----------------------------------------------------------------------------------------------
# Loading for LoRA training


def load_gpt_oss(
    name_or_path: str, *, dtype="auto", load_in_4bit: bool = True, device_map=None, model_class=None, **model_kwargs
):
    """GPT-OSS for LoRA training: eager attention (it has attention sinks), NF4 attention projections.

    The experts stay 16-bit here: call `quantize_experts` once LoRA is attached (module docstring).

    `name_or_path`: a built-in name (`tiny-gpt-oss`), a folder or a hub id; an MXFP4 checkpoint is
    dequantized on load. Under ZeRO-3 (a quantized load never uses `zero.Init`) every rank loads the
    model, then DeepSpeed shards the packed weights. `model_class` (default `AutoModelForCausalLM`;
    e.g. `AutoModelForSequenceClassification` for a reward model, with `num_labels=1` in
    `model_kwargs`) picks the head; heads other than the attention projections stay 16-bit.
    """
    from transformers import AutoModelForCausalLM, Mxfp4Config

    dtype = resolve_dtype(dtype)
    path = resolve_model(name_or_path)
    method = checkpoint_quantization(path)
    if method not in (None, "mxfp4"):
        raise ClinalignError(
            f"{name_or_path} is quantized with {method}; GPT-OSS training needs a bf16 or MXFP4 checkpoint"
        )
    kwargs = {**model_kwargs, "dtype": dtype, "attn_implementation": "eager", "device_map": device_map,
              "use_safetensors": True}  # fmt: skip
    if method == "mxfp4":
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    elif load_in_4bit:
        kwargs["quantization_config"] = nf4_config(dtype)
    if device_map is None:  # the one device rule; None under ZeRO-3, which refuses a device_map
        kwargs["device_map"] = clinalign_device_map()
    try:
        model = (model_class or AutoModelForCausalLM).from_pretrained(path, **kwargs)
    except OSError as e:
        raise ClinalignError(f"cannot load model {name_or_path}: {str(e).splitlines()[0]}") from None
    if model.config.model_type != "gpt_oss":
        raise ClinalignError(f"{name_or_path} is a {model.config.model_type} model, not gpt_oss")
    model.config.use_cache = False  # training; generate() turns the cache back on per call
    if load_in_4bit:
        quantize_linear(model, dtype)  # an MXFP4 checkpoint's; a bf16 one's are 4-bit already
        keep_bnb_gradients_on_cpu(model)
    set_moe_leaf_modules(model)
    return model


def lora_config(*, r: int = 16, alpha: int = 32, experts: bool = True, dropout: float = 0.0):
    """LoRA on the attention projections and (with `experts`) on both expert stacks via `target_parameters`.

    PEFT's parameter LoRA has no dropout, so `dropout` must be 0 when `experts` is set.
    """
    from peft import LoraConfig

    if experts and dropout:
        raise ClinalignError("LoRA on GPT-OSS experts (target_parameters) does not support lora_dropout; set it to 0")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(ATTENTION_PROJECTIONS),
        target_parameters=[f"mlp.experts.{name}" for name in EXPERT_PARAMETERS] if experts else None,
        task_type="CAUSAL_LM",
    )


def config_dict(config_or_id: str) -> dict:
    """A model's config.json as a dict: a path to the file, a folder, a built-in name or a hub id."""
    path = Path(config_or_id)
    if path.is_file():
        return json.loads(path.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model(config_or_id)).to_dict()
