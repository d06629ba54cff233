"""Shared test setup: offline tiny models, the real-data folder, the harmony vocabulary, GPU gating.

Tiny models come from `clinalign.models` (the same builders the `tiny-*` configs use), cached in
`$CLINALIGN_HOME` like every model. Real third-party records live outside the project, in
`../shared/data/real` (or `$CLINALIGN_REAL_DATA`); tests that read them skip where it is absent.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SHARED = REPO.parent / "shared"

# Real records and the vendored harmony vocabulary: environment first, then ../shared.
REAL_DATA = Path(os.environ.get("CLINALIGN_REAL_DATA", _SHARED / "data" / "real"))
if "TIKTOKEN_ENCODINGS_BASE" not in os.environ and (_SHARED / "vendor" / "o200k_base.tiktoken").is_file():
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(_SHARED / "vendor")
HARMONY_VOCAB = Path(os.environ.get("TIKTOKEN_ENCODINGS_BASE", "/nonexistent")) / "o200k_base.tiktoken"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

requires_real_data = pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real-data folder absent: {REAL_DATA}")
requires_harmony_vocab = pytest.mark.skipif(
    not HARMONY_VOCAB.is_file(),
    reason="o200k_base.tiktoken not found: set TIKTOKEN_ENCODINGS_BASE to the folder holding it (../shared/vendor)",
)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# GPU-only checks live in tests/test_*_gpu.py and are not even collected without CUDA.
collect_ignore_glob = [] if _cuda() else ["test_*_gpu.py"]


@pytest.fixture(scope="session")
def tiny_llama() -> str:
    from clinalign.models import resolve_model

    return resolve_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt_oss() -> str:
    from clinalign.models import resolve_model

    return resolve_model("tiny-gpt-oss")


@pytest.fixture
def run_script():
    """Run an entry script in a subprocess from the repo root, as a user would; returns the CompletedProcess."""
    import subprocess

    def _run(*args: str, launcher: list[str] | None = None, timeout: int = 600, env: dict | None = None):
        command = (launcher or [sys.executable]) + [str(a) for a in args]
        full_env = {**os.environ, **(env or {})}
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)

    return _run
