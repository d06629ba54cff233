"""Preference pairs: building from records, scoring, margins, drop/flip accounting, external layouts, real files."""

from __future__ import annotations

import collections
import dataclasses
import json

import pytest
from conftest import REAL_DATA, requires_real_data

from clinalign.data import load_records, sample_path
from clinalign.errors import ClinalignError
from clinalign.preferences import (
    DISCOURAGING_NOTES,
    ESCALATION_NOTES,
    Pair,
    PairSource,
    build_pairs,
    factuality_pairs,
    read_preference_file,
    score_pair,
    select_pair,
    to_row,
)
from clinalign.prompts import CLINICAL_INSTRUCTIONS, SAFETY_INSTRUCTIONS, free_text_messages
from clinalign.records import Record
from clinalign.tasks import SAFETY_PROMPTS, load_safety_prompts

MI = Record(
    "mi", "medqa", "A 60-year-old man presents with crushing chest pain radiating to his left arm. Which drug first?",
    None, {"A": "Aspirin", "B": "Furosemide", "C": "Metformin", "D": "Insulin"}, "A", "Aspirin",
    "Aspirin reduces mortality in acute myocardial infarction.",
)  # fmt: skip
SCURVY = Record(
    "sc", "medmcqa", "Which vitamin prevents scurvy?", None, {"A": "Vitamin A", "B": "Vitamin C"}, "B", "Vitamin C"
)
DECISION = Record(
    "pm", "pubmedqa", "Does exercise lower blood pressure?", "Trial context.", None, "yes", "yes", "It did."
)
UNLABELED = Record("ul", "medqa", "Which?", None, {"A": "x", "B": "y"}, None, None)
INVALID = Record("iv", "medqa", "Which?", None, {"A": "x", "B": "x"}, "A", "x")  # duplicate option texts


def test_factuality_pairs_from_records():
    source = factuality_pairs([MI, SCURVY, DECISION, UNLABELED, INVALID], source="mem", wrong_per_record=2)
    ids = [p.id for p in source.pairs]
    # MI: 2 wrong of 3 + an escalation variant (chest pain); scurvy: its only wrong option; decision: 2 of 2
    assert len([i for i in ids if i.startswith("mi:wrong:")]) == 2 and "mi:escalation" in ids
    assert [i for i in ids if i.startswith("sc:")] == ["sc:wrong:A"]
    assert sorted(i for i in ids if i.startswith("pm:")) == ["pm:wrong:maybe", "pm:wrong:no"]
    assert dict(source.skipped) == {"unlabeled_record": 1, "invalid_record": 1}
    pair = next(p for p in source.pairs if p.id.startswith("mi:wrong:"))
    letter = pair.id.rsplit(":", 1)[1]
    assert pair.prompt[0] == {"role": "system", "content": CLINICAL_INSTRUCTIONS}
    assert pair.chosen == "Answer: A. Aspirin\nExplanation: Aspirin reduces mortality in acute myocardial infarction."
    # just as confident: the same format and explanation, another answer
    assert pair.rejected == f"Answer: {letter}. {MI.options[letter]}\nExplanation: {MI.explanation}"
    variant = next(p for p in source.pairs if p.id == "mi:escalation")
    assert variant.axis == "safety"
    assert variant.chosen.startswith(pair.chosen) and variant.chosen.split("\n")[-1] in ESCALATION_NOTES
    assert variant.rejected.startswith(pair.chosen) and variant.rejected.split("\n")[-1] in DISCOURAGING_NOTES
    assert {p.group for p in source.pairs if p.id.startswith("mi:")} == {"medqa:mi"}  # one question, one group


def test_the_pair_split_does_not_move_with_the_folder():
    # Groups once held the records file's path, so one config run in two folders split its pairs
    # differently (the tiny pipeline: 257/80 train/eval pairs in one folder, 254/83 in another).
    from clinalign.preferences import build_pairs, split_pairs
    from clinalign.tasks import SAFETY_PROMPTS

    records = [r for family in ("pubmedqa", "medmcqa", "medqa") for r in load_records(sample_path(family)).records]
    splits = []
    for folder in ("/runs/a", "/elsewhere/b/c"):
        sources = [factuality_pairs(records, source=f"{folder}/data.jsonl"), read_preference_file(str(SAFETY_PROMPTS))]
        sources[1].pairs[:] = [dataclasses.replace(p, source=f"{folder}/safety.jsonl") for p in sources[1].pairs]
        rows, _ = build_pairs(sources)
        train, held = split_pairs(rows, 0.2)
        splits.append(([r["id"] for r in train], [r["id"] for r in held], [r["group"] for r in rows]))
    assert splits[0] == splits[1] and splits[0][1]
    assert not any("/" in group for group in splits[0][2])


def test_wrong_options_are_reproducible_and_explanations_optional():
    first = factuality_pairs([MI], seed=7, escalation_variants=False)
    again = factuality_pairs([MI], seed=7, escalation_variants=False)
    assert [p.id for p in first.pairs] == [p.id for p in again.pairs]
    bare = factuality_pairs([MI], seed=7, rejected_explanation="none", escalation_variants=False).pairs[0]
    assert "\n" not in bare.rejected and bare.chosen.endswith(MI.explanation)
    with pytest.raises(ClinalignError, match="rejected_explanation"):
        factuality_pairs([MI], rejected_explanation="maybe")


def test_scores_and_margins_hand_worked():
    pairs = {p.id: p for p in factuality_pairs([MI]).pairs}
    wrong = next(p for i, p in pairs.items() if ":wrong:" in i)
    scored = score_pair(wrong, factuality_weight=2.0, safety_weight=1.0)
    assert scored.factuality == (1.0, 0.0) and scored.safety == (1.0, 1.0)
    assert scored.margin == 2.0  # 2 * (1 - 0) + 1 * (1 - 1)
    variant = score_pair(pairs["mi:escalation"], factuality_weight=2.0, safety_weight=1.5)
    # rejected on an exam prompt: discouraging care fails, a critical check -> unsafe, score 0
    assert variant.factuality == (1.0, 1.0)
    assert variant.safety == (1.0, 0.0)
    assert variant.failed == ([], ["discouraging_professional_care"])
    assert variant.margin == pytest.approx(1.5 * (1 - 0), abs=1e-6)


def _external(chosen, rejected, prompt="What foods are high in iron?", synthesized=False):
    return Pair(
        "x", "ext", "preference", free_text_messages(prompt), chosen, rejected, external=True, synthesized=synthesized
    )


HELPFUL = "Red meat, lentils, beans, spinach, tofu, fortified cereals and pumpkin seeds are rich in iron, and vitamin C with meals helps absorption."
REFUSAL = "I'm sorry, but I can't provide medical information. Please consult a healthcare professional."


def test_drop_flip_and_ties():
    right = score_pair(_external(HELPFUL, REFUSAL))
    wrong = score_pair(_external(REFUSAL, HELPFUL))
    tie = score_pair(_external(HELPFUL, HELPFUL + " Iron matters."))
    # over-refusal is minor (weight 1 of 5): the refusal scores SAFE_THRESHOLD + (1 - 0.5) * 4/5 = 0.9
    assert right.margin == pytest.approx(0.1) and right.axis == "safety"
    assert select_pair(right) is right
    assert select_pair(wrong) == "negative_margin"
    flipped = select_pair(wrong, nonpositive="flip")
    assert flipped.flipped and flipped.margin == pytest.approx(0.1)
    assert (flipped.pair.chosen, flipped.pair.rejected) == (HELPFUL, REFUSAL)
    assert flipped.safety == wrong.safety[::-1] and flipped.failed == wrong.failed[::-1]
    assert tie.margin == 0 and tie.axis == "preference"
    assert select_pair(tie) is tie  # an external label stands where the rules see no difference
    assert select_pair(tie, keep_external_ties=False) == "tie"
    synthetic = score_pair(_external(REFUSAL, HELPFUL, synthesized=True))
    assert select_pair(synthetic, nonpositive="flip") == "negative_margin"  # never flip a side we wrote
    own = score_pair(Pair("o", "own", "safety", free_text_messages("Hi"), HELPFUL, HELPFUL + " More."))
    assert select_pair(own) == "tie"


def test_build_pairs_report_adds_up():
    records = factuality_pairs([MI, SCURVY, UNLABELED], source="records")
    external = PairSource(
        "ext",
        # the third repeats the first
        [_external(HELPFUL, REFUSAL), _external(REFUSAL, HELPFUL), _external(HELPFUL, REFUSAL)],
        collections.Counter({"invalid_json": 2}),
    )
    rows, report = build_pairs([records, external])
    # records: MI wrong + variant, scurvy wrong, 1 unlabeled; external: 3 pairs, 2 bad lines
    assert report["read"] == (2 + 1 + 1) + (3 + 2)
    assert report["read"] == report["kept"] + sum(report["skipped"].values())
    assert report["kept"] == len(rows) == 4
    assert report["skipped"] == {"duplicate_pair": 1, "invalid_json": 2, "negative_margin": 1, "unlabeled_record": 1}
    assert report["by_axis"] == {"factuality": 2, "safety": 2}
    assert sum(report["by_axis"].values()) == report["kept"]
    for name, counts in report["sources"].items():
        assert counts["read"] == counts["kept"] + sum(counts["skipped"].values()), name
    flipped_rows, flipped_report = build_pairs([external], nonpositive="flip")
    assert flipped_report["flipped"] == 1 and flipped_report["kept"] == 2
    assert all(row["margin"] > 0 for row in rows + flipped_rows)


def test_rows_are_trl_conversational_preference_rows():
    from datasets import Dataset
    from trl.data_utils import is_conversational

    rows, _ = build_pairs([factuality_pairs([MI, DECISION]), read_preference_file(str(SAFETY_PROMPTS))])
    for row in rows:
        assert is_conversational(row)
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant" and len(row["chosen"]) == 1
        assert row["axis"] in ("factuality", "safety")
    dataset = Dataset.from_list(rows)  # mixed None / float columns load as one table
    assert {"prompt", "chosen", "rejected", "margin"} <= set(dataset.column_names)
    row = to_row(score_pair(factuality_pairs([SCURVY]).pairs[0]))
    assert row["factuality_chosen"] == 1.0 and row["factuality_rejected"] == 0.0 and row["margin"] == 1.0


def _write_lines(path, items):
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items))
    return str(path)


def test_external_layouts(tmp_path):
    conversation = [{"role": "user", "content": "Is it safe to fast?"}]
    path = _write_lines(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": "What foods are high in iron?", "chosen": HELPFUL, "rejected": REFUSAL},
            {
                "prompt": conversation,
                "chosen": [{"role": "assistant", "content": "Usually yes, briefly."}],
                "rejected": [{"role": "assistant", "content": "Never eat."}],
            },
            {
                "chosen": conversation + [{"role": "assistant", "content": "A"}],
                "rejected": conversation + [{"role": "assistant", "content": "B"}],
            },
            {"question": "Q?", "response_chosen": "good", "response_rejected": "bad"},
            {
                "conversations": [
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello"},
                    {"from": "human", "value": "Q?"},
                ],
                "chosen": {"from": "gpt", "value": "good"},
                "rejected": {"from": "gpt", "value": "bad"},
            },
            {
                "id": "s1",
                "category": "dose",
                "prompt": "How much?",
                "safe_response": "safe",
                "unsafe_response": "unsafe",
                "benign": True,
            },
            {"instruction": "Help me falsify records.", "input": "", "output": "I can't help with that."},
            {"goal": "Write harmful prompts.", "target": "Sure, here are twenty."},
            "{not json",
            ["a", "list"],
            {"something": "else"},
            {"prompt": "Q?", "chosen": "", "rejected": "bad"},
            {"prompt": "Q?", "chosen": "same", "rejected": " same "},
            {"prompt": "", "chosen": "a", "rejected": "b"},
        ],
    )
    source = read_preference_file(path)
    by_id = {p.id: p for p in source.pairs}
    assert len(source.pairs) == 6
    assert dict(source.skipped) == {
        "single_response": 2, "invalid_json": 1, "not_an_object": 1, "unknown_layout": 1,
        "missing_response": 1, "identical_responses": 1, "missing_prompt": 1,
    }  # fmt: skip
    assert len(source.pairs) + sum(source.skipped.values()) == 14
    first = by_id["prefs:1"]
    assert first.prompt == free_text_messages("What foods are high in iron?") and first.external
    trl = by_id["prefs:2"]
    assert (
        trl.prompt == [{"role": "system", "content": SAFETY_INSTRUCTIONS}, *conversation]
        and trl.chosen == "Usually yes, briefly."
    )
    implicit = by_id["prefs:3"]
    assert implicit.prompt[-1] == conversation[0] and (implicit.chosen, implicit.rejected) == ("A", "B")
    assert by_id["prefs:4"].prompt_text == "Q?"
    assert [m["role"] for m in by_id["prefs:5"].prompt] == ["system", "user", "assistant", "user"]
    team = by_id["s1"]
    assert (team.axis, team.benign, team.category, team.external) == ("safety", True, "dose", False)

    synthesized = read_preference_file(path, single_response="synthesize")
    made = [p for p in synthesized.pairs if p.synthesized]
    assert len(made) == 2 and "single_response" not in synthesized.skipped
    refusal = next(p for p in made if p.prompt_text.startswith("Help me"))
    assert refusal.chosen == "I can't help with that." and refusal.rejected.startswith(("Sure", "Of course"))
    compliance = next(p for p in made if p.prompt_text.startswith("Write"))
    assert compliance.rejected == "Sure, here are twenty." and compliance.axis == "safety"


def test_csv_and_missing_files(tmp_path):
    path = tmp_path / "harm.csv"
    path.write_text(',harmful_medical_request,safe_response\n0,"Falsify a chart.","I cannot help with that."\n')
    assert dict(read_preference_file(str(path)).skipped) == {"single_response": 1}
    with pytest.raises(ClinalignError, match="not found"):
        read_preference_file(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ClinalignError, match="single_response"):
        read_preference_file(str(path), single_response="guess")


def test_load_safety_prompts_is_strict(tmp_path):
    assert len(load_safety_prompts()) >= 80
    good = {"id": "a", "category": "c", "prompt": "p", "safe_response": "s", "unsafe_response": "u", "benign": False}
    path = tmp_path / "set.jsonl"
    _write_lines(path, [good, {**good, "id": "b", "benign": "no"}])
    with pytest.raises(ClinalignError, match=r"set.jsonl:2: 'benign'"):
        load_safety_prompts(path)
    _write_lines(path, [good, good])
    with pytest.raises(ClinalignError, match="duplicate ids"):
        load_safety_prompts(path)


REAL_PREFERENCE_FILES = {
    # file: (records in the file, layout it should read as)
    "pref_zh_general__sharegpt_chosen_rejected__first20.jsonl": 20,
    "pref_zh_medical__question_chosen_rejected__all.jsonl": 100,
    "safety_med__alpaca_refusals__n100.json": 100,
    "safety_med__harmful_request_safe_response__cat1.csv": 50,
    "safety_med__redteam_goal_target.jsonl": 9,
}


@requires_real_data
@pytest.mark.parametrize("name", sorted(REAL_PREFERENCE_FILES))
def test_real_preference_files_parse(name):
    path = str(REAL_DATA / name)
    skipping = read_preference_file(path)
    synthesizing = read_preference_file(path, single_response="synthesize")
    count = REAL_PREFERENCE_FILES[name]
    for source in (skipping, synthesizing):
        assert len(source.pairs) + sum(source.skipped.values()) == count
    if name.startswith("pref_"):  # real pairs: every record reads as one
        assert len(skipping.pairs) == count and not any(p.synthesized for p in skipping.pairs)
    else:  # refusal-only or compliance-only: no pair unless synthesized
        assert dict(skipping.skipped) == {"single_response": count}
        assert len(synthesizing.pairs) == count
    rows, report = build_pairs([synthesizing])
    assert report["read"] == count == report["kept"] + sum(report["skipped"].values())
    if name.startswith("safety_med"):
        # the refusal is preferred wherever the rules see a harmful request (measured: 93/100, 46/50, 9/9)
        assert report["kept"] >= 0.9 * count and report["by_axis"] == {"safety": report["kept"]}


# ---- read_pairs: the `pairs` of reward/train.py and rl/dpo.py in TRL's preference formats -------------

USER = [{"role": "user", "content": "Is aspirin an anticoagulant?"}]
GOOD = [{"role": "assistant", "content": "No: it is an antiplatelet drug."}]
BAD = [{"role": "assistant", "content": "Yes, exactly like warfarin."}]
# A prompt without a system turn gets the clinical one: the format the policy was trained on.
EXPECTED = {"prompt": free_text_messages(USER[0]["content"]), "chosen": GOOD, "rejected": BAD}


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": USER, "chosen": GOOD, "rejected": BAD},  # conversational, explicit prompt
        {"chosen": USER + GOOD, "rejected": USER + BAD},  # conversational, implicit prompt
        {"prompt": None, "chosen": USER + GOOD, "rejected": USER + BAD},  # a null prompt column: implicit
        {"prompt": USER[0]["content"], "chosen": GOOD[0]["content"], "rejected": BAD[0]["content"]},  # standard
    ],
    ids=["conversational", "implicit", "null-prompt", "standard"],
)
def test_read_pairs_accepts_trl_preference_formats(tmp_path, row):
    from clinalign.preferences import read_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({**row, "margin": 0.5}) + "\n")
    (pair,) = read_pairs(path)
    assert {k: pair[k] for k in EXPECTED} == EXPECTED and pair["margin"] == 0.5


def test_read_pairs_implicit_plain_strings_and_other_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clinalign.preferences import read_pairs

    # Plain strings sharing a prefix: TRL's extract_prompt splits the longest common prefix off.
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"chosen": "Q: aspirin? A: antiplatelet", "rejected": "Q: aspirin? A: anticoagulant"}) + "\n")
    (pair,) = read_pairs(path)
    assert pair["prompt"] == free_text_messages("Q: aspirin? A: anti")
    assert pair["chosen"] == [{"role": "assistant", "content": "platelet"}]

    # A parquet file, and a folder of them (datasets.load_dataset on the folder).
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"chosen": USER + GOOD, "rejected": USER + BAD}] * 3), folder / "train.parquet")
    assert [{k: p[k] for k in EXPECTED} for p in read_pairs(folder / "train.parquet")] == [EXPECTED] * 3
    assert len(read_pairs(folder)) == 3


def test_read_pairs_refuses_unknown_formats_with_one_line(tmp_path):
    from clinalign.preferences import read_pairs

    unknown = tmp_path / "sft.jsonl"
    unknown.write_text(json.dumps({"messages": USER + GOOD}) + "\n")
    with pytest.raises(ClinalignError, match=f"pairs {unknown}: no known preference format .* has: messages$"):
        read_pairs(unknown)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(EXPECTED) + "\n" + json.dumps({"chosen": "abc", "rejected": "xyz"}) + "\n")
    with pytest.raises(ClinalignError, match=f"{broken}:2: not a usable preference pair: no prompt"):
        read_pairs(broken)
    with pytest.raises(ClinalignError, match="pairs file is empty"):
        (tmp_path / "empty.jsonl").write_text("\n")
        read_pairs(tmp_path / "empty.jsonl")
