"""Loading models and tokenizers where TRL does not: any model name, dense or GPT-OSS, with adapters.

Above the GPT-OSS path: a GPT-OSS checkpoint in 4-bit loads through harmony.gpt_oss, a GPT-OSS
tokenizer gets harmony's chat template, and the built-in names resolve through
harmony.gpt_oss.resolve_model (which defers to clinalign.model_store for all but `tiny-gpt-oss`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from clinalign.adapters import check_adapter_base, require_adapter_folder
from clinalign.compat import keep_bnb_gradients_on_cpu
from clinalign.devices import device_map, resolve_dtype
from clinalign.errors import ClinalignError
from harmony.gpt_oss import load_gpt_oss, quantize_experts, resolve_model
from harmony.render import use_harmony_template


def ensure_pad_token(tokenizer, model=None):
    """Give the tokenizer a pad token distinct from EOS, without resizing embeddings when possible.

    Padding with EOS hides the end-of-answer token from the loss wherever a collator masks pad ids,
    so a model trained that way never learns to stop. An unused special token (unk, `<|endoftext|>`,
    bos) serves as pad; only when none exists is a new token added (and the embeddings resized).
    """
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        candidates = [tokenizer.unk_token, "<|endoftext|>", "<|pad|>", tokenizer.bos_token]
        vocab = tokenizer.get_vocab()
        pad = next((t for t in candidates if t and t in vocab and vocab[t] != tokenizer.eos_token_id), None)
        if pad is None:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            if model is not None:
                model.resize_token_embeddings(len(tokenizer))
        else:
            tokenizer.pad_token = pad
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def load_tokenizer(name_or_path: str, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    tokenizer.padding_side = padding_side
    if getattr(tokenizer, "chat_template", None) and "<|channel|>" in tokenizer.chat_template:
        # A GPT-OSS tokenizer (the hub's template, or a saved one): every stage renders harmony's layout.
        use_harmony_template(tokenizer)
    return ensure_pad_token(tokenizer)


def model_init_kwargs(model_args) -> dict:
    """`from_pretrained` kwargs from a `ModelArgs` (dtype, attention, 4-bit quantization)."""
    from trl import get_quantization_config

    dtype = resolve_dtype(model_args.dtype)
    kwargs = {"dtype": dtype}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.load_in_4bit or model_args.load_in_8bit:
        # bitsandbytes' compute dtype follows the weights' dtype, like TRL's own scripts.
        model_args.dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
        kwargs["quantization_config"] = get_quantization_config(model_args)
    return kwargs


def model_type(name_or_path: str) -> str:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model(name_or_path)).model_type


def prepare_for_lora(model, model_args, gradient_checkpointing: bool = False):
    """What a 4-bit base needs before a LoRA adapter is attached (nothing for a 16-bit one).

    Dense models get PEFT's `prepare_model_for_kbit_training` (fp32 norms, input gradients). GPT-OSS
    must not: it would cast the packed 4-bit expert bytes to fp32 (see harmony/gpt_oss.py).
    """
    if not (model_args.load_in_4bit or model_args.load_in_8bit) or model.config.model_type == "gpt_oss":
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def quantize_after_lora(model, model_args) -> int:
    """GPT-OSS in 4-bit: quantize the fused expert stacks once LoRA is attached (bitsandbytes' loader
    skips them: they are not nn.Linear). Returns how many stacks were quantized (0 for other models)."""
    if not model_args.load_in_4bit or model.config.model_type != "gpt_oss":
        return 0
    return quantize_experts(model, resolve_dtype(model_args.dtype))


def load_causal_lm(name_or_path: str, **kwargs):
    """`AutoModelForCausalLM.from_pretrained` for any name `resolve_model` takes.

    GPT-OSS in 4-bit goes through harmony.gpt_oss.load_gpt_oss (MXFP4 dequantized on load, eager
    attention, NF4 attention projections); its experts are quantized later, by `quantize_after_lora`.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    quantization = kwargs.get("quantization_config")
    if quantization is not None and getattr(quantization, "load_in_4bit", False) and model_type(path) == "gpt_oss":
        return load_gpt_oss(path, dtype=kwargs.get("dtype", "auto"))
    kwargs.setdefault("device_map", device_map())  # the one device rule (clinalign.devices)
    kwargs.setdefault("use_safetensors", True)  # never unpickle a hub checkpoint's .bin
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ClinalignError(f"cannot load model {name_or_path}: {str(e).splitlines()[0]}") from None
    keep_bnb_gradients_on_cpu(model)
    return model


def load_policy(base: str, adapter_dir: str | Path | None = None, *, dtype="auto", trainable=False, **kwargs):
    """Load base + (optionally) a LoRA adapter, e.g. an SFT stage, for generation or further training.

    Returns `(model, tokenizer)`; the tokenizer is the adapter's own when it saved one (it may carry
    a pad token the base lacks). Raises `ClinalignError` for a missing adapter or one trained on
    another base.
    """
    from peft import PeftModel

    model = load_causal_lm(base, **{"dtype": resolve_dtype(dtype), **kwargs})
    tokenizer_source = base
    if adapter_dir is not None:
        adapter_dir = require_adapter_folder(adapter_dir)
        check_adapter_base(adapter_dir, base, model)
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
        if (adapter_dir / "tokenizer_config.json").is_file():
            tokenizer_source = str(adapter_dir)
    tokenizer = load_tokenizer(tokenizer_source)
    ensure_pad_token(tokenizer, model)
    if not trainable:
        model.eval()
    return model, tokenizer


def load_trainable_policy(model_args, adapter_dir: str | Path | None = None, gradient_checkpointing: bool = False):
    """The base of `model_args` (dtype, 4-bit) with a trainable LoRA adapter: `adapter_dir`'s (an SFT
    stage to continue; refused if trained on another base) or a fresh one from the LoRA settings.

    GPT-OSS in 4-bit still has 16-bit experts here: call `quantize_after_lora` once every adapter the
    trainer needs is attached. Returns the PeftModel.
    """
    from peft import PeftModel, get_peft_model
    from trl import get_peft_config

    model = load_causal_lm(model_args.model_name_or_path, **model_init_kwargs(model_args))
    model = prepare_for_lora(model, model_args, gradient_checkpointing)
    if adapter_dir is None:
        return get_peft_model(model, get_peft_config(model_args))
    require_adapter_folder(adapter_dir)
    check_adapter_base(adapter_dir, model_args.model_name_or_path, model)
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)


def no_router_logits(model) -> dict:
    """Forward kwargs that turn off router logits of mixture-of-experts models (not needed to score or generate)."""
    # GPT-OSS configured to return router logits computes an auxiliary loss in every forward, which
    # fails on a cached context and is wasted work here.
    return {"output_router_logits": False} if getattr(model.config, "output_router_logits", False) else {}
