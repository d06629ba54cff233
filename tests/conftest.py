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


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory) -> Path:
    """A small pairs file (both axes, short prompts) built by the toolkit from its own sample data."""
    import json

    from clinalign.data import load_records
    from clinalign.preferences import build_pairs, factuality_pairs, read_preference_file

    records = load_records(str(REPO / "clinalign/sample_data/medmcqa_train.jsonl")).records[:12]
    sources = [factuality_pairs(records, source="medmcqa"),
               read_preference_file(str(REPO / "clinalign/sample_data/safety_prompts.jsonl"))]
    rows, _ = build_pairs(sources)
    factuality = [r for r in rows if r["axis"] == "factuality"][:12]
    safety = [r for r in rows if r["axis"] == "safety"][:12]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in factuality + safety))
    return path


@pytest.fixture(scope="session")
def tiny_heldout_pairs(tmp_path_factory) -> Path:
    """Factuality pairs on questions tiny_pairs does not use: a reward model's `eval_pairs`."""
    import json

    from clinalign.data import load_records
    from clinalign.preferences import build_pairs, factuality_pairs

    records = load_records(str(REPO / "clinalign/sample_data/medmcqa_train.jsonl")).records[12:18]
    rows, _ = build_pairs([factuality_pairs(records, source="medmcqa")])
    path = tmp_path_factory.mktemp("pairs") / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_sft_adapter(tmp_path_factory, tiny_llama) -> Path:
    """A LoRA adapter on the tiny Llama standing in for the final SFT stage (random, non-zero B)."""
    from peft import LoraConfig, get_peft_model

    from clinalign import models
    from clinalign.adapters import write_adapter_provenance

    model = models.load_causal_lm("tiny-llama")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        init_lora_weights=False)  # B != 0: the SFT policy differs from the base
    peft_model = get_peft_model(model, config)
    path = tmp_path_factory.mktemp("sft") / "3-medqa"
    peft_model.save_pretrained(path)
    models.load_tokenizer("tiny-llama").save_pretrained(path)
    write_adapter_provenance(path, "tiny-llama", peft_model)
    return path


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory, tiny_pairs, tiny_heldout_pairs) -> Path:
    """A tiny reward model trained for 2 length-grouped steps by reward/train.py (in this process)."""
    import runpy

    entry = runpy.run_path(str(REPO / "reward" / "train.py"), run_name="rm_fixture")
    out = tmp_path_factory.mktemp("reward")
    args = ["--config", str(REPO / "configs/reward/tiny.yaml"), "--pairs", str(tiny_pairs),
            "--output_dir", str(out), "--max_steps", "2", "--eval_fraction", "0.5",
            "--eval_pairs", str(tiny_heldout_pairs), "--train_sampling_strategy", "group_by_length"]
    entry["main"](*entry["make_parser"]().parse(args))
    return out


# CI has the vocabulary and the real records (.ci/run sets these when ../shared holds them): there a
# test that skips for want of them means a broken path, not a fresh clone, and the run must fail.
_REQUIRED_SKIPS = {
    "CLINALIGN_REQUIRE_O200K": "o200k",
    "CLINALIGN_REQUIRE_REAL_DATA": "real-data folder absent",
}
_forbidden_skips: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        for variable, marker in _REQUIRED_SKIPS.items():
            if os.environ.get(variable) == "1" and marker in reason:
                _forbidden_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if _forbidden_skips:
        print(f"\nerror: {len(_forbidden_skips)} tests skipped for want of what this run requires:", file=sys.stderr)
        for line in _forbidden_skips[:10]:
            print(f"  {line}", file=sys.stderr)
        session.exitstatus = 1
