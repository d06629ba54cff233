"""Data converters: every published layout, hand-worked expected records, the report, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from clinalign.data import (
    ConversionResult,
    convert_record,
    convert_rows,
    count_overlap,
    load_records,
    sample_path,
    write_records,
)
from clinalign.data.choices import clean
from clinalign.data.prompt_text import split_prompt
from clinalign.errors import ClinalignError
from clinalign.records import Record, normalize_text

MEDQA_ROW = {
    "question": "A 24-year-old woman has heat intolerance. Which is the mechanism?",
    "answer": "TSH receptor stimulation",
    "options": {"A": "TPO antibodies", "B": "TSH receptor stimulation", "C": "A toxic nodule", "D": "A TSH adenoma"},
    "meta_info": "step1",
    "answer_idx": "B",
}
MEDMCQA_HUB_ROW = {  # the hub's column order; cop counts from 0
    "id": "m-1",
    "question": "Winging of the scapula is caused by injury to the:",
    "opa": "Long thoracic nerve",
    "opb": "Axillary nerve",
    "opc": "Suprascapular nerve",
    "opd": "Thoracodorsal nerve",
    "cop": 0,
    "choice_type": "single",
    "exp": "Serratus anterior is supplied by the long thoracic nerve.",
    "subject_name": "Anatomy",
    "topic_name": None,
}


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


def adds_up(result: ConversionResult) -> bool:
    report = result.report
    return report["read"] == report["kept"] + sum(report["skipped"].values()) and report["kept"] == len(result.records)


# ---- text ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "  two  spaces ",
        "no\u00a0break",
        "tab\tand\nnewline\r\n",
        "already clean",
        "x" * 100 + "  y",
        " " + "z" * 90,
        "é  ü",
    ],
)
def test_clean_is_normalize_text(raw):
    assert clean(raw) == normalize_text(raw)


def test_clean_treats_nan_empty_and_containers_as_missing():
    assert [clean(v) for v in ("nan", "NaN", " ", "", None, float("nan"), ["a"], {"a": 1})] == [None] * 8
    assert clean(0.01) == "0.01" and clean(4) == "4" and clean("Nancy") == "Nancy"


# ---- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"A": "Radial", "B": "Ulnar", "C": "Median"},
        {"a": "Radial", "b": "Ulnar", "c": "Median"},
        ["Radial", "Ulnar", "Median"],
        ["A. Radial", "B) Ulnar", "(C) Median"],
        [{"key": "A", "value": "Radial"}, {"key": "B", "value": "Ulnar"}, {"key": "C", "value": "Median"}],
        {"label": ["A", "B", "C"], "text": ["Radial", "Ulnar", "Median"]},
        '{"A": "Radial", "B": "Ulnar", "C": "Median"}',  # a CSV cell holding a dict
        "A. Radial\nB. Ulnar\nC. Median",
    ],
)
def test_every_options_shape_gives_the_same_lettered_options(options):
    record = convert_record({"question": "Wrist drop: which nerve?", "options": options, "answer": "Radial"})
    assert record.options == {"A": "Radial", "B": "Ulnar", "C": "Median"}
    assert (record.answer, record.answer_text) == ("A", "Radial")


def test_option_columns_opa_to_ope_and_option_x_with_nan():
    cnmleqa = {"question": "Q?", "opa": "a1", "opb": "b1", "opc": "c1", "opd": "d1", "ope": "e1", "answer": "ope"}
    record = convert_record(cnmleqa)
    assert list(record.options) == ["A", "B", "C", "D", "E"] and (record.answer, record.answer_text) == ("E", "e1")
    multimedqa = {
        "question": "Q?",
        "option_A": "x",
        "option_B": "y",
        "option_C": "z",
        "option_D": "w",
        "option_E": "nan",
        "answer_idx": "D",
        "answer": "w",
    }
    record = convert_record(multimedqa)
    assert record.options == {"A": "x", "B": "y", "C": "z", "D": "w"} and record.answer == "D"


def test_more_than_four_options_and_gaps():
    six = {"question": "Q?", "options": dict(zip("ABCDEF", "uvwxyz")), "answer_idx": "F"}
    assert convert_record(six).answer_text == "z"
    gap = {"question": "Q?", "options": {"A": "u", "B": "v", "D": "x"}, "answer_idx": "D"}
    assert convert_record(gap) == "bad_options"  # re-lettering D as C would move the answer
    middle = {"question": "Q?", "opa": "u", "opb": None, "opc": "w", "opd": "x", "cop": 0}
    assert convert_record(middle) == "empty_option"


# ---- answers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer_fields", "expected"),
    [
        ({"answer_idx": "B"}, "B"),
        ({"answer_idx": "b"}, "B"),
        ({"answer_idx": "(B)"}, "B"),
        ({"answer": "TSH receptor stimulation"}, "B"),
        ({"answer_idx": "TSH RECEPTOR STIMULATION"}, "B"),  # upper-cased option text
        ({"answer": "B. TSH receptor stimulation"}, "B"),  # the original pipeline's output
        ({"label": 1}, "B"),  # 0-based index
        ({"cop": "1"}, "B"),  # index as a string
        ({"answer": "opb"}, "B"),  # an option column name
    ],
)
def test_every_answer_shape_names_the_same_option(answer_fields, expected):
    row = {k: v for k, v in MEDQA_ROW.items() if k not in ("answer", "answer_idx")} | answer_fields
    assert convert_record(row).answer == expected


@pytest.mark.parametrize("missing", [None, "", "nan", -1, "-1", []])
def test_missing_answer_is_no_answer_or_kept_unlabeled(missing):
    row = {k: v for k, v in MEDQA_ROW.items() if k != "answer"} | {"answer_idx": missing}
    assert convert_record(row) == "no_answer"
    kept = convert_record(row, keep_unlabeled=True)
    assert kept.answer is None and kept.answer_text is None and kept.options == MEDQA_ROW["options"]


def test_answer_problems_are_named_skips():
    base = {k: v for k, v in MEDQA_ROW.items() if k not in ("answer", "answer_idx")}
    assert convert_record(base | {"answer_idx": "F"}) == "answer_not_in_options"
    assert convert_record(base | {"label": 7}) == "answer_not_in_options"
    assert convert_record(base | {"answer_idx": "A", "answer": "TSH receptor stimulation"}) == "conflicting_answers"
    duplicated = {"question": "Q?", "options": {"A": "Atropine", "B": "atropine", "C": "Naloxone"}}
    assert convert_record(duplicated | {"answer": "Atropine"}) == "ambiguous_answer"  # matches A and B: no guess
    assert convert_record(duplicated | {"answer_idx": "C"}) == "duplicate_options"
    assert convert_record({"question": "Q?", "options": {"A": "only"}, "answer_idx": "A"}) == "too_few_options"
    assert convert_record(base | {"question": "  ", "answer_idx": "A"}) == "empty_question"


def test_a_second_answer_field_that_names_no_option_does_not_veto_the_first():
    row = MEDQA_ROW | {"answer": "TSH-receptor stimulating antibodies (a paraphrase)"}
    assert convert_record(row).answer == "B"


def test_medmcqa_cop_base_is_decided_per_file():
    hub = [MEDMCQA_HUB_ROW | {"id": str(i), "cop": cop} for i, cop in enumerate([0, 1, 2, 3])]
    assert [r.answer for r in convert_rows(hub).records] == ["A", "B", "C", "D"]
    # The original release counts 1-4; a 4 proves it even without its key order.
    original = [MEDMCQA_HUB_ROW | {"id": str(i), "cop": cop} for i, cop in enumerate([1, 2, 4])]
    assert [r.answer for r in convert_rows(original).records] == ["A", "B", "D"]
    # Only 1-3 seen: the original release's key order (question, exp, cop, ...) says 1-based.
    ordered = [{"question": "Q?", "exp": "E", "cop": 2, "opa": "a", "opb": "b", "opc": "c", "opd": "d"}]
    assert convert_rows(ordered).records[0].answer == "B"
    assert convert_record(ordered[0]).answer == "B"
    assert convert_record(MEDMCQA_HUB_ROW | {"cop": 2}).answer == "C"


def test_medmcqa_record_fields():
    record = convert_record(MEDMCQA_HUB_ROW)
    assert record == Record(
        id="m-1",
        source="medmcqa",
        question="Winging of the scapula is caused by injury to the:",
        context=None,
        options={
            "A": "Long thoracic nerve",
            "B": "Axillary nerve",
            "C": "Suprascapular nerve",
            "D": "Thoracodorsal nerve",
        },
        answer="A",
        answer_text="Long thoracic nerve",
        explanation="Serratus anterior is supplied by the long thoracic nerve.",
        meta={"subject": "Anatomy", "choice_type": "single"},
    )
    assert convert_record(MEDMCQA_HUB_ROW | {"exp": "nan", "topic_name": "nan"}).explanation is None


def test_titlecase_keys_and_nan():
    row = {
        "data": {
            "Question": "Which nerve?",
            "Options": {"A": "Radial", "B": "Ulnar", "C": "Median", "D": "Axillary"},
            "Correct Answer": "Ulnar",
            "Correct Option": "B",
            "Explanation": "nan",
            "Subject_name": "Anatomy",
        },
        "id": "t-1",
        "dataset_name": "medmcqa_val.csv",
    }
    record = convert_record(row)
    assert (record.id, record.answer, record.explanation, record.meta) == ("t-1", "B", None, {"subject": "Anatomy"})


# ---- PubMedQA ------------------------------------------------------------------------------------

ORI_PQAL = {
    "QUESTION": "Does early mobilisation shorten hospital stay?",
    "CONTEXTS": ["Bed rest causes harm.", "Patients were  mobilised early."],
    "LABELS": ["BACKGROUND", "METHODS"],
    "MESHES": ["Early Ambulation"],
    "YEAR": "2016",
    "final_decision": "yes",
    "LONG_ANSWER": "Early mobilisation shortened stay.",
}


@pytest.mark.parametrize(
    "row",
    [
        ORI_PQAL,
        {
            "pubid": 7,
            "question": ORI_PQAL["QUESTION"],
            "context": {"contexts": ORI_PQAL["CONTEXTS"], "labels": []},
            "long_answer": "x",
            "final_decision": "yes",
        },
        {
            "id": 7,
            "question": ORI_PQAL["QUESTION"],
            "context": "Bed rest causes harm. Patients were mobilised early.",
            "answer": "Yes",
        },
        {
            "data": {
                "id": "7",
                "question": ORI_PQAL["QUESTION"],
                "context": "Bed rest causes harm. Patients were mobilised early.",
                "yes_no": "yes",
                "label": "A | B",
            }
        },
        {
            "realidx": "7",
            "question": "Bed rest causes harm. Patients were mobilised early.\n" + ORI_PQAL["QUESTION"],
            "options": {"A": "yes", "B": "no", "C": "maybe"},
            "answer_idx": "A",
            "answer": "yes",
        },
        {
            "pubid": 7,
            "input": f"Question: {ORI_PQAL['QUESTION']}\n\nContext: Bed rest causes harm. Patients were mobilised early.\n\nAnswer 'yes', 'no', or 'maybe'.",
            "output": "yes",
        },
    ],
    ids=[
        "ori_pqal",
        "hub_context_dict",
        "joined_string_answer",
        "multimedqa_yes_no",
        "medagents_letter",
        "prompt_output",
    ],
)
def test_every_pubmedqa_layout_gives_the_decision_record(row):
    record = convert_record(row)
    assert record.question == "Does early mobilisation shorten hospital stay?"
    assert record.context == "Bed rest causes harm. Patients were mobilised early."
    assert (record.options, record.answer, record.answer_text, record.source) == (None, "yes", "yes", "pubmedqa")
    # The abstract's sections stay a list in meta["contexts"] only where the source gives a list.
    listed = isinstance(row.get("CONTEXTS"), list) or isinstance(row.get("context"), dict)
    expected = ["Bed rest causes harm.", "Patients were mobilised early."] if listed else None
    assert record.meta.get("contexts") == expected


def test_pubmedqa_fields_and_problems():
    record = convert_rows({"90000001": ORI_PQAL}.values()).records[0]
    sections = ["Bed rest causes harm.", "Patients were mobilised early."]  # each normalised, as context is
    assert record.explanation == "Early mobilisation shortened stay."
    assert record.meta == {"year": 2016, "contexts": sections} and record.context == " ".join(sections)
    assert convert_record({"question": "Q?", "final_decision": "yes"}).context is None
    assert convert_record(ORI_PQAL | {"final_decision": "unsure"}) == "answer_not_in_options"
    unlabeled = {k: v for k, v in ORI_PQAL.items() if k != "final_decision"}  # pqa_unlabeled
    assert convert_record(unlabeled) == "no_answer" and convert_record(unlabeled, keep_unlabeled=True).answer is None


# ---- prompts, chat, other files ------------------------------------------------------------------


def test_instruction_records_selfbiorag_and_the_original_pipeline():
    selfbiorag = {
        "id": "seed_task_1",
        "name": "MedMCQA_dev",
        "instruction": "Choose one option.",
        "instances": {
            "input": "QUESTION: Wrist drop: which nerve?\nOption A: Ulnar\nOption B: Radial\nOption: ",
            "output": "Radial",
        },
    }
    record = convert_record(selfbiorag)
    assert (record.question, record.options, record.answer) == (
        "Wrist drop: which nerve?",
        {"A": "Ulnar", "B": "Radial"},
        "B",
    )
    original = {
        "instruction": "Question: Wrist drop: which nerve? Options: A. Ulnar B. Radial",
        "input": "",
        "output": "B. Radial",
    }
    assert convert_record(original).options == {"A": "Ulnar", "B": "Radial"} and convert_record(original).answer == "B"
    assert (
        convert_record({"instruction": "How can I hurt someone?", "input": "", "output": "I can't help."})
        == "open_ended"
    )


def test_sharegpt_record_takes_family_from_its_id():
    row = {
        "id": "MedMCQA,42",
        "conversations": [
            {"from": "human", "value": "Wrist drop: which nerve?\n\nA. Ulnar\nB. Radial"},
            {"from": "gpt", "value": "Radial nerve. So, the answer is B."},
        ],
        "answer": "B",
    }
    record = convert_record(row)
    assert (record.source, record.answer, record.explanation) == ("medmcqa", "B", "Radial nerve. So, the answer is B.")
    assert (
        convert_record(
            row
            | {
                "id": "ChatDoctor,1",
                "answer": "Rest and fluids.",
                "conversations": [{"from": "human", "value": "I have a cold"}],
            }
        )
        == "open_ended"
    )


def test_split_prompt_sections():
    assert split_prompt("Context: C1. Question: Q1? Answer with yes, no or maybe.") == ("Q1? ", "C1. ", None)
    question, context, options = split_prompt("QUESTION: Q2\nOption A: x\nOption B: y\nOption: ")
    assert (question, context, options) == ("Q2", None, {"A": "x", "B": "y"})


def test_preference_and_unrecognized_records_are_counted_not_raised(tmp_path):
    prefs = write(
        tmp_path,
        "pairs.jsonl",
        '{"question": "q", "response_chosen": "a", "response_rejected": "b"}\n{"conversations": [], "chosen": "a", "rejected": "b"}\n',
    )
    result = load_records(prefs)
    assert result.report["skipped"] == {"preference_pair": 2} and result.report["kept"] == 0
    assert result.report["dataset"] == "unknown" and adds_up(result)
    csv_path = write(tmp_path, "safety.csv", ",harmful_medical_request,safe_response\n0,do harm,no\n")
    assert load_records(csv_path).report["skipped"] == {"unrecognized_record": 1}


# ---- files and wrappers --------------------------------------------------------------------------


def test_file_layouts(tmp_path):
    row = MEDQA_ROW
    layouts = {
        "list.json": [row, row],
        "keyed.json": {"0001": row, "0002": row},
        "splits.json": {"name": "medqa", "task_type": "multiple_choice", "dev": [row], "test": [row]},
        "nested.json": {"medqa": {"test": [row, row]}},
        "wrapped_one.json": {"id": "w-1", "data": row},
    }
    for name, content in layouts.items():
        result = load_records(write(tmp_path, name, content))
        assert adds_up(result) and all(r.answer == "B" for r in result.records), name
    assert [r.id for r in load_records(str(tmp_path / "keyed.json")).records] == ["0001", "0002"]
    assert [r.meta.get("split") for r in load_records(str(tmp_path / "splits.json")).records] == ["dev", "test"]
    assert load_records(str(tmp_path / "splits.json"), split="test").report["read"] == 1
    with pytest.raises(ClinalignError, match="no split 'train'"):
        load_records(str(tmp_path / "splits.json"), split="train")
    assert load_records(str(tmp_path / "wrapped_one.json")).records[0].id == "w-1"


def test_jsonl_variants_and_bad_lines(tmp_path):
    one_object = write(tmp_path, "pqal.jsonl", json.dumps({"21645374": ORI_PQAL}, indent=2))
    assert load_records(one_object).records[0].id == "21645374"
    lines_in_json = write(tmp_path, "lines.json", json.dumps(MEDQA_ROW) + "\n" + json.dumps(MEDQA_ROW) + "\n")
    assert load_records(lines_in_json).report["kept"] == 2
    broken = write(tmp_path, "broken.jsonl", json.dumps(MEDQA_ROW) + '\n{"question": \n\n"a bare string"\n[1, 2]\n')
    result = load_records(broken)
    assert result.report["skipped"] == {"invalid_json": 1, "not_an_object": 2} and adds_up(result)


def test_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path = write(
        tmp_path,
        "medmcqa.csv",
        ",question,opa,opb,opc,opd,cop\n0,Which nerve?,Radial,Ulnar,Median,Axillary,1\n1,Q2?,a,b,c,d,\n",
    )
    result = load_records(csv_path)
    assert [r.answer for r in result.records] == ["B"] and result.report["skipped"] == {"no_answer": 1}
    parquet = tmp_path / "medmcqa.parquet"
    pq.write_table(pa.Table.from_pylist([MEDMCQA_HUB_ROW, MEDMCQA_HUB_ROW | {"id": "m-2", "cop": 3}]), parquet)
    assert [r.answer for r in load_records(str(parquet)).records] == ["A", "D"]


def test_missing_file_and_bad_input_are_one_line_errors(tmp_path):
    for source in (str(tmp_path / "nope.jsonl"), "data/missing.json"):
        with pytest.raises(ClinalignError, match="input file not found") as error:
            load_records(source)
        assert source in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ClinalignError, match="not valid JSON"):
        load_records(write(tmp_path, "bad.json", "{not json"))
    with pytest.raises(ClinalignError, match="unknown dataset"):
        load_records(write(tmp_path, "ok.json", [MEDQA_ROW]), dataset="medqa_v2")


def test_hub_rows_through_a_local_dataset(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "validation.parquet"
    pq.write_table(pa.Table.from_pylist([MEDMCQA_HUB_ROW, MEDMCQA_HUB_ROW | {"id": "m-2", "cop": 2}]), parquet)
    local = datasets.load_dataset("parquet", data_files={"validation": str(parquet)}, cache_dir=str(tmp_path / "cache"))
    result = convert_rows(local, name="openlifescienceai/medmcqa")
    assert [(r.answer, r.meta["split"]) for r in result.records] == [("A", "validation"), ("C", "validation")]

    calls = []

    def load_dataset(path, name=None, split=None):  # the hub, replaced by the local copy
        calls.append((path, name, split))
        return local[split] if split else local

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    result = load_records("openlifescienceai/medmcqa", split="validation", config_name="default")
    assert calls == [("openlifescienceai/medmcqa", "default", "validation")]
    assert [r.answer for r in result.records] == ["A", "C"] and result.report["dataset"] == "medmcqa"


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\nmore lines")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        ClinalignError,
        match="^no local file 'qiaojin/PubMedQA', and could not load it from the hub: Couldn't reach the Hugging Face Hub$",
    ):
        load_records("qiaojin/PubMedQA", config_name="pqa_labeled")


# ---- output, round trips, contamination ----------------------------------------------------------


def test_canonical_instruction_and_chat_outputs_read_back(tmp_path):
    records = load_records(str(sample_path("medmcqa"))).records + load_records(str(sample_path("pubmedqa"))).records
    for format in ("canonical", "instruction", "chat"):
        out = tmp_path / f"{format}.jsonl"
        assert write_records(records, out, format) == len(records)
        back = load_records(str(out), keep_unlabeled=True)
        assert back.report["kept"] == len(records), (format, back.report)
        assert [(r.question, r.options, r.answer) for r in back.records] == [
            (r.question, r.options, r.answer) for r in records
        ]
    canonical = load_records(str(tmp_path / "canonical.jsonl")).records
    assert canonical == records  # every field, source and meta included
    assert any(len(r.meta.get("contexts", [])) >= 2 for r in canonical)  # PubMedQA's sections, still a list
    first = json.loads((tmp_path / "instruction.jsonl").read_text().splitlines()[0])
    assert first["output"] == f"{records[0].answer}. {records[0].answer_text}" and first["input"] == ""


def test_unlabeled_records_in_chat_format_are_prompt_only(tmp_path):
    row = {k: v for k, v in MEDQA_ROW.items() if k not in ("answer", "answer_idx")}
    record = convert_record(row, keep_unlabeled=True)
    write_records([record], tmp_path / "chat.jsonl", "chat")
    line = json.loads((tmp_path / "chat.jsonl").read_text())
    assert set(line) == {"prompt"} and line["prompt"][-1]["role"] == "user"


def test_count_overlap_needs_same_question_and_options():
    def mcq(question, options):
        return Record("x", "medqa", question, None, dict(zip("ABC", options)), "A", options[0])

    train = [mcq("Which nerve?", ["Radial", "Ulnar", "Median"]), mcq("Which is true?", ["a", "b", "c"])]
    evaluation = [
        mcq("which  NERVE?", ["Median", "Radial", "Ulnar"]),
        mcq("Which is true?", ["d", "e", "f"]),
        mcq("New?", ["a", "b", "c"]),
    ]
    overlap = count_overlap(train, evaluation)
    assert (overlap["same_question"], overlap["same_question_and_options"]) == (2, 1)


# ---- shipped sample data ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "read", "skipped"),
    [
        ("pubmedqa", 64, {"answer_not_in_options": 1, "empty_question": 1, "no_answer": 1, "not_an_object": 1}),
        (
            "medmcqa",
            65,
            {
                "answer_not_in_options": 1,
                "duplicate_options": 1,
                "empty_option": 1,
                "empty_question": 1,
                "invalid_json": 1,
            },
        ),
        (
            "medqa",
            64,
            {"ambiguous_answer": 1, "answer_not_in_options": 1, "conflicting_answers": 1, "too_few_options": 1},
        ),
    ],
)
def test_sample_data_reports_match_its_readme(dataset, read, skipped):
    result = load_records(str(sample_path(dataset)))
    assert result.report == {
        "read": read,
        "kept": 60,
        "skipped": skipped,
        "dataset": dataset,
        "schema": result.report["schema"],
    }
    assert all(not r.problems() for r in result.records)


def test_sample_data_answers_by_hand():
    medmcqa = {r.question: r.answer_text for r in load_records(str(sample_path("medmcqa"))).records}
    assert medmcqa["Wrist drop results from injury to which nerve?"] == "Radial nerve"
    assert medmcqa["Malignant hyperthermia is treated with:"] == "Dantrolene"
    medqa = load_records(str(sample_path("medqa"))).records
    seizure = next(r for r in medqa if r.question.startswith("A 19-year-old man with a seizure disorder"))
    assert (seizure.answer_text, seizure.meta) == ("Phenytoin", {"meta_info": "step1"})
    torsion = next(
        r for r in medqa if r.question.startswith("A 16-year-old boy is brought to the emergency department")
    )
    assert (torsion.answer, torsion.answer_text) == ("A", "Immediate surgical exploration")  # line 54: answer_idx "A"
    pubmedqa = {r.id: r.answer for r in load_records(str(sample_path("pubmedqa"))).records}
    assert (pubmedqa["90000002"], pubmedqa["90000019"], pubmedqa["90000009"]) == ("no", "yes", "maybe")


# ---- CLI -------------------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "clinalign.data", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_convert_writes_output_and_report_and_ends_with_a_summary(tmp_path):
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    done = run_cli("convert", str(sample_path("medqa")), "--out", str(out), "--report", str(report), "--format", "chat")
    assert done.returncode == 0, done.stderr
    assert json.loads(report.read_text())["kept"] == 60 and len(out.read_text().splitlines()) == 60
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("kept 60 of 64 records (medqa;") and "conflicting_answers 1" in last


def test_cli_errors_are_one_line(tmp_path):
    done = run_cli("convert", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o.jsonl"))
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "missing.json" in done.stderr
    done = run_cli("convert", str(sample_path("medqa")), "--out", str(tmp_path / "o.jsonl"), "--dataset", "bogus")
    assert done.returncode == 2 and "invalid choice" in done.stderr and "Traceback" not in done.stderr


def test_cli_check_counts_contamination(tmp_path):
    rows = [json.loads(line) for line in sample_path("medqa").read_text().splitlines()]
    evaluation = write(tmp_path, "eval.jsonl", "\n".join(json.dumps(r) for r in rows[:5] + [MEDQA_ROW]))
    done = run_cli("check", str(sample_path("medqa")), evaluation)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("contamination: 5 of 6 eval questions (83.3%)")
