"""One held-out split: on defaults no stage trains on a record or safety prompt that eval holds out.

SFT's `eval_fraction` used to default to 0.1 while pairs, DPO, PPO and eval used 0.2, so SFT trained
on records eval held out; every stage now takes its default from clinalign.records.EVAL_FRACTION.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys

import pytest
from conftest import REPO

from clinalign import tasks
from clinalign.data import load_records, sample_path
from clinalign.prompts import answer_completion
from clinalign.records import EVAL_FRACTION
from clinalign.tasks import load_safety_prompts


def _dataclass(path: str, name: str):
    spec = importlib.util.spec_from_file_location(path.replace("/", "_"), REPO / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return getattr(module, name)


def _default(cls) -> float:
    return next(f.default for f in dataclasses.fields(cls) if f.name == "eval_fraction")


@pytest.fixture(scope="module")
def defaults() -> dict[str, float]:
    from clinalign.dpo import DPOArgs
    from clinalign.ppo import PPOArgs

    return {
        "sft": _default(_dataclass("sft/run.py", "SFTScriptArgs")),
        "pairs": _default(_dataclass("reward/pairs.py", "PairsArgs")),
        "dpo": _default(DPOArgs),
        "ppo": _default(PPOArgs),
        "eval": _default(_dataclass("eval/run.py", "EvalArgs")),
    }


def test_every_stage_defaults_to_the_one_fraction(defaults):
    assert set(defaults.values()) == {EVAL_FRACTION}, defaults


def _records():
    return [r for family in ("pubmedqa", "medmcqa", "medqa") for r in load_records(sample_path(family)).records]


def _keys(items) -> set[str]:
    return {tasks.task_of(item).key(item) for item in items}


def test_on_defaults_no_stage_trains_on_what_eval_holds_out(defaults):
    from clinalign.ppo import rl_prompts
    from clinalign.preferences import factuality_pairs, held_out_key, read_preference_file, split_held_out

    records, safety = _records(), load_safety_prompts()
    held = _keys(tasks.split(records, defaults["eval"])[1]) | _keys(tasks.split(safety, defaults["eval"])[1])
    assert sum(k.startswith("safety:") for k in held) >= 60 and sum(not k.startswith("safety:") for k in held) >= 20

    sft_trained = _keys(tasks.split(records, defaults["sft"])[0])  # sft/run.py's split of its data
    assert sft_trained and not sft_trained & held

    # PPO's rollout prompts: the record each question row carries, the safety rows by their prompt text.
    rollouts = rl_prompts(records, safety, defaults["ppo"], limit=10_000)
    by_text = {p.prompt: p for p in safety}
    rollout_keys = [
        tasks.task_of(r).key(r)
        for r in (tasks.Record.from_dict(json.loads(row["record"])) for row in rollouts if row["record"])
    ] + [tasks.TASKS["safety"].key(by_text[row["prompt"][-1]["content"]]) for row in rollouts if not row["record"]]
    assert len(rollout_keys) == len(rollouts) and not set(rollout_keys) & held, sorted(set(rollout_keys) & held)[:3]

    # reward/pairs.py: the factuality pairs of the records and the safety set's pairs, split as it splits them.
    for source in (factuality_pairs(records), read_preference_file(str(tasks.SAFETY_PROMPTS))):
        kept = split_held_out(source, defaults["pairs"])[0]
        assert kept.skipped["held_out"] > 0 and not {held_out_key(p) for p in kept.pairs} & held


def test_the_split_is_the_hash_split_of_each_task_key():
    from clinalign.records import is_held_out

    records, safety = _records(), load_safety_prompts()
    train, held = tasks.split(records + safety)
    assert len(train) + len(held) == len(records) + len(safety)
    assert all(is_held_out(f"{r.source}:{r.id}", EVAL_FRACTION) for r in held if isinstance(r, tasks.Record))
    assert all(is_held_out(f"safety:{p.id}", EVAL_FRACTION) for p in held if isinstance(p, tasks.SafetyPrompt))
    assert not any(tasks.held_out(item) for item in train)
    with pytest.raises(tasks.ConfigError, match="eval_fraction"):
        tasks.split(records, 1.0)


def test_each_task_renders_judges_and_scores_its_items():
    records = {r.source: r for r in _records() if r.answer is not None}
    assert set(records) == set(tasks.QUESTION_FAMILIES)
    for family, record in records.items():
        task = tasks.task_of(record)
        assert task.name == family and task.gold(record) == record.answer
        messages = task.messages(record)
        assert messages[0]["role"] == "system" and messages[-1]["role"] == "user"
        assert task.score(record, answer_completion(record)).correct is True
    wrong = next(r for r in records.values() if r.choices)
    other = next(letter for letter in wrong.choices if letter != wrong.answer)
    assert tasks.task_of(wrong).score(wrong, f"The answer is {other}. {wrong.choices[other]}.").correct is False

    safety = tasks.TASKS["safety"]
    prompt = next(p for p in load_safety_prompts() if not p.benign)
    assert safety.messages(prompt)[-1]["content"] == prompt.prompt
    assert safety.score(prompt, prompt.safe_response).score > safety.score(prompt, prompt.unsafe_response).score
    control = next(p for p in load_safety_prompts() if p.benign)
    assert "over_refusal" in safety.score(control, "I cannot help with that. Please see a doctor.").failed


def test_the_configs_of_one_model_hold_out_one_split():
    import yaml

    by_model: dict[str, dict[str, float]] = {}
    for path in sorted((REPO / "configs").glob("*/*.yaml")):
        if path.parent.name in ("accelerate", "reward") or path.name.startswith("tiny"):
            continue  # reward configs' eval_fraction splits pairs, not records; tiny configs are tests'
        config = yaml.safe_load(path.read_text()) or {}
        model = path.stem.split("_")[0]
        by_model.setdefault(model, {})[str(path.relative_to(REPO))] = config.get("eval_fraction", EVAL_FRACTION)
    assert {"smollm2", "llama2-7b", "gpt-oss-20b"} <= set(by_model)
    for model, fractions in by_model.items():
        assert len(set(fractions.values())) == 1, (model, fractions)


def test_a_question_asked_twice_in_the_safety_set_is_refused(tmp_path):
    # benign-40 once asked benign-09's question: PPO trained on one id while eval held out the other.
    lines = tasks.SAFETY_PROMPTS.read_text().splitlines()
    first = json.loads(lines[0])
    twin = {**first, "id": "twin", "prompt": first["prompt"].upper().replace("?", " ?")}
    path = tmp_path / "safety.jsonl"
    path.write_text("\n".join(lines + [json.dumps(twin)]) + "\n")
    with pytest.raises(tasks.ClinalignError, match=f"'twin' asks what '{first['id']}' asks"):
        load_safety_prompts(path)
    assert len(load_safety_prompts()) == len(lines)
