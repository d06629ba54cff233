"""Property tests: thousands of mutated records never raise, and every report adds up.

Records start from one valid record of each published layout and are mutated the ways real copies
go wrong: keys deleted or renamed, values replaced by junk (None, numbers, NaN, booleans, nested
lists and dicts, empty and whitespace strings, arbitrary unicode, huge strings), records wrapped in
{"id", "data"}, or not objects at all. Each example converts a batch of them, in memory and through
a JSON-lines file with broken lines; the settings keep the whole module to a few seconds.
"""

from __future__ import annotations

import copy
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinalign.data import convert_rows, load_records
from clinalign.data.choices import clean
from clinalign.records import normalize_text

SEEDS = [
    {
        "question": "Q1?",
        "answer": "b",
        "options": {"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"},
        "meta_info": "step1",
        "answer_idx": "B",
    },
    {
        "question": "Q2?",
        "exp": "E",
        "cop": 2,
        "opa": "a",
        "opb": "b",
        "opc": "c",
        "opd": "d",
        "subject_name": "S",
        "topic_name": None,
        "id": "x",
        "choice_type": "single",
    },
    {
        "QUESTION": "Q3?",
        "CONTEXTS": ["c1", "c2"],
        "LABELS": ["L"],
        "MESHES": ["M"],
        "YEAR": "2011",
        "final_decision": "yes",
        "LONG_ANSWER": "L",
    },
    {
        "pubid": 1,
        "question": "Q4?",
        "context": {"contexts": ["c"], "labels": []},
        "long_answer": "L",
        "final_decision": "maybe",
    },
    {
        "data": {
            "Question": "Q5?",
            "Options": {"A": "a", "B": "b"},
            "Correct Answer": "a",
            "Correct Option": "A",
            "Explanation": "nan",
        },
        "id": "t",
    },
    {
        "id": "s",
        "name": "MedMCQA_dev",
        "instruction": "Pick one.",
        "instances": {"input": "QUESTION: Q6?\nOption A: a\nOption B: b\nOption: ", "output": "b"},
    },
    {
        "id": "MedQA,1",
        "conversations": [{"from": "human", "value": "Q7?\n\nA. a\nB. b"}, {"from": "gpt", "value": "B"}],
        "answer": "B",
    },
    {"question": "Q8?", "choices": ["A. a", "B. b", "C. c"], "answer": 2},
    {
        "question": "Q9?",
        "opa": "a",
        "opb": "b",
        "opc": "c",
        "opd": "d",
        "ope": "e",
        "answer": "opc",
        "question_type": "t",
    },
    {
        "id": "c",
        "source": "medqa",
        "question": "Q10?",
        "context": None,
        "options": {"A": "a", "B": "b"},
        "answer": "A",
        "answer_text": "a",
        "explanation": None,
        "meta": {},
    },
    {
        "question": "Q11?",
        "options": [{"key": "A", "value": "a"}, {"key": "B", "value": "b"}],
        "answer_idx": "A",
        "answer": ["a"],
    },
    {"instruction": "Question: Q12? Options: A. a B. b", "input": "", "output": "A. a"},
    {"question": "q", "response_chosen": "a", "response_rejected": "b"},
]
HUGE = st.sampled_from(
    ["x" * 200_000, " \u00a0\u2028\n" * 20_000, "A. " + " " * 50_000 + "x", "Option A:" + "\n" * 30_000]
)
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
VALUE = st.one_of(
    JUNK,
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40),
    st.sampled_from(["", "  ", "nan", "NaN", "-1", "A", "b", "opb", "yes", "Maybe.", "E", "0", "4", "\u00a0"]),
    HUGE,
)


@st.composite
def mutated_record(draw):
    row = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        action = draw(st.sampled_from(["delete", "replace", "rename", "wrap", "inner", "not_an_object"]))
        keys = list(row) if isinstance(row, dict) else []
        if action == "not_an_object":
            return draw(VALUE)
        if action == "wrap":
            row = {"id": draw(VALUE), "data": row}
        elif keys and action == "delete":
            del row[draw(st.sampled_from(keys))]
        elif keys and action == "replace":
            row[draw(st.sampled_from(keys))] = draw(VALUE)
        elif keys and action == "rename":
            row[draw(st.text(max_size=8))] = row.pop(draw(st.sampled_from(keys)))
        elif keys and action == "inner":  # junk inside a nested field (options, contexts, data, turns)
            nested = [k for k in keys if isinstance(row[k], (dict, list)) and row[k]]
            if nested:
                field = row[draw(st.sampled_from(nested))]
                slot = draw(st.sampled_from(list(field) if isinstance(field, dict) else list(range(len(field)))))
                field[slot] = draw(VALUE)
    return row


def assert_adds_up(result):
    report = result.report
    assert report["read"] == report["kept"] + sum(report["skipped"].values())
    assert report["kept"] == len(result.records)
    assert not [reason for reason in report["skipped"] if reason.startswith("unexpected")], report["skipped"]
    for record in result.records:
        assert record.problems() == [], (record, record.problems())


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    st.lists(mutated_record(), min_size=10, max_size=40),
    st.sampled_from(["auto", "pubmedqa", "medmcqa", "medqa"]),
    st.booleans(),
)
def test_mutated_records_never_raise_and_always_add_up(rows, dataset, keep_unlabeled):
    result = convert_rows(rows, dataset=dataset, keep_unlabeled=keep_unlabeled)
    assert result.report["read"] == len(rows)
    assert_adds_up(result)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.tuples(mutated_record(), st.integers(0, 9)), min_size=1, max_size=30))
def test_json_lines_files_with_broken_lines_add_up(tmp_path_factory, rows):
    lines = []
    for row, damage in rows:
        line = json.dumps(row)
        lines.append(line[: len(line) // 2] if damage == 0 else line)  # one line in ten cut in half
    path = tmp_path_factory.mktemp("jsonl") / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = load_records(str(path))
    assert result.report["read"] == sum(1 for line in lines if line)  # a row cut to nothing is a blank line
    assert_adds_up(result)


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]))
    | st.text(alphabet=" \t\n\r\u00a0\u2028\x1c ab", max_size=80)
)
def test_fast_clean_is_normalize_text(text):
    expected = normalize_text(text)
    assert clean(text) == (None if expected in ("", "nan") or expected.lower() == "nan" else expected)
