"""Saved LoRA adapters and the base model they belong to.

Every adapter clinalign saves carries `clinalign_base.json`: the base's name and a fingerprint of
its weights, so an adapter is never loaded onto another base of the same shapes (which PEFT would
do silently).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from clinalign.errors import ClinalignError
from clinalign.json_io import write_json
from clinalign.model_store import ADAPTER_CONFIG, is_adapter_folder, require_safetensors

PROVENANCE_FILE = "clinalign_base.json"


def require_adapter_folder(path: str | Path) -> Path:
    """`path` as a Path if it holds a saved adapter; otherwise the one-line error every loader gives."""
    if not is_adapter_folder(path):
        raise ClinalignError(f"adapter not found: {path} (no {ADAPTER_CONFIG})")
    return Path(path)


def read_adapter_config(path: str | Path) -> dict:
    """A saved adapter's adapter_config.json (e.g. its `task_type`: SEQ_CLS for a reward model)."""
    return json.loads((require_adapter_folder(path) / ADAPTER_CONFIG).read_text())


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
