"""Every file in the real-data folder converts with --dataset auto; answers agree with each source's gold.

The folder (../shared/data/real, or $CLINALIGN_REAL_DATA) holds third-party records; these tests read
them in place and skip where the folder is absent. Two checks per labeled file:

- every kept record's (question, answer) pair is one of the source's own (question, gold) pairs,
  read here straight from the raw JSON, independently of the converters;
- hand-written expectations for a few records, read by eye from the source files.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from conftest import REAL_DATA, requires_real_data

from clinalign.data import load_records
from clinalign.records import normalize_text

pytestmark = requires_real_data

FILES = (
    sorted(p.name for p in REAL_DATA.glob("*") if p.suffix in {".json", ".jsonl", ".csv", ".parquet"})
    if REAL_DATA.is_dir()
    else []
)
DECISION = {"A": "yes", "B": "no", "C": "maybe"}


def lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def whole(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# file -> (raw rows, question of a raw row, gold answer of a raw row), written per source from its schema.
GOLD = {
    "cnmleqa_zh__opa_to_ope__first300.json": (
        whole,
        lambda r: r["question"],
        lambda r: "ABCDE"["abcde".index(r["answer"][-1])],
    ),
    "medmcqa__choices_list_validation__first300.jsonl": (lines, lambda r: r["question"], lambda r: "ABCD"[r["answer"]]),
    "medmcqa__formatted_titlecase_keys__first150.json": (
        whole,
        lambda r: r["data"]["Question"],
        lambda r: r["data"]["Correct Option"],
    ),
    "medmcqa__hf_fields_wrapped_cop_string__first300.json": (
        whole,
        lambda r: r["data"]["question"],
        lambda r: "ABCD"[int(r["data"]["cop"])],
    ),
    "medmcqa__hf_validation_min__first500.jsonl": (lines, lambda r: r["question"], lambda r: "ABCD"[r["cop"]]),
    "medmcqa__io_wrapper_dev_test__first100each.json": (
        lambda p: whole(p)["dev"] + whole(p)["test"],
        lambda r: r["question"],
        lambda r: r["answer"],
    ),
    "medmcqa__medagents_options_dict__first300.jsonl": (lines, lambda r: r["question"], lambda r: r["answer_idx"]),
    "medmcqa__mirage_style__first300.json": (
        lambda p: list(whole(p).values()),
        lambda r: r["question"],
        lambda r: r["answer"],
    ),
    "medmcqa__original_cop_1to4_plus_extra__first3.jsonl": (
        lines,
        lambda r: r["question"],
        lambda r: "ABCD"[r["cop"] - 1],
    ),
    "medqa__formatted_titlecase_keys__first150.json": (
        whole,
        lambda r: r["data"]["Question"],
        lambda r: r["data"]["Correct Option"],
    ),
    "medqa__io_wrapper_dev_test__first60each.json": (
        lambda p: whole(p)["dev"] + whole(p)["test"],
        lambda r: r["question"],
        lambda r: r["answer"],
    ),
    "medqa__mirage_style__first200.json": (
        lambda p: list(whole(p).values()),
        lambda r: r["question"],
        lambda r: r["answer"],
    ),
    "medqa__nested_dataset_split_wrapper__first30.json": (
        lambda p: whole(p)["medqa"]["test"],
        lambda r: r["question"],
        lambda r: r["answer_idx"],
    ),
    "medqa__option_columns_nan__first200.json": (
        whole,
        lambda r: r["data"]["question"],
        lambda r: r["data"]["answer_idx"],
    ),
    "medqa__us_4opt_metamap__first400.jsonl": (lines, lambda r: r["question"], lambda r: r["answer_idx"]),
    "medqa__us_5opt_original__first400.jsonl": (lines, lambda r: r["question"], lambda r: r["answer_idx"]),
    "pubmedqa__context_joined_string__first100.json": (whole, lambda r: r["question"], lambda r: r["answer"]),
    "pubmedqa__flat_list_contexts__first100.json": (whole, lambda r: r["question"], lambda r: r["final_decision"]),
    "pubmedqa__medagents_mc__first100.jsonl": (
        lines,
        lambda r: r["question"].rsplit("\n", 1)[-1],
        lambda r: r["answer"],
    ),
    "pubmedqa__minimal_no_context__first300.jsonl": (lines, lambda r: r["question"], lambda r: r["final_decision"]),
    "pubmedqa__mirage_style__first200.json": (
        lambda p: list(whole(p).values()),
        lambda r: r["question"],
        lambda r: DECISION[r["answer"]],
    ),
    "pubmedqa__multimedqa_wrapped__first60.json": (
        whole,
        lambda r: r["data"]["question"],
        lambda r: r["data"]["yes_no"],
    ),
    "pubmedqa__ori_pqal__first300.json": (
        lambda p: list(whole(p).values()),
        lambda r: r["QUESTION"],
        lambda r: r["final_decision"],
    ),
    "pubmedqa__ori_pqal_in_dot_jsonl_file__first40.jsonl": (
        lambda p: list(whole(p).values()),
        lambda r: r["QUESTION"],
        lambda r: r["final_decision"],
    ),
}

# file -> [(question starts with, answer, answer_text starts with)], read by eye from the source's gold field.
BY_HAND = {
    "cnmleqa_zh__opa_to_ope__first300.json": [
        ("小剂量地塞米松抑制试验适用于", "B", "肾上腺皮质增多症定性"),
        ("提高人群肺癌筛查检出率的首选方法是", "D", "低剂量CT"),
    ],
    "medmcqa__choices_list_validation__first300.jsonl": [
        ("Which of the following are not a branch of external carotid", "B", "Anterior ethmoidal aery"),
        ("Which of the following is not an effect of efferent", "A", "Decreased GFR"),
    ],
    "medmcqa__formatted_titlecase_keys__first150.json": [
        ("Drug adveisement letter is a necessary component", "B", "Date of expiry of the drug")
    ],
    "medmcqa__hf_fields_wrapped_cop_string__first300.json": [
        ("Which of the following are not a branch of external carotid", "B", "Anterior ethmoidal aery")
    ],
    "medmcqa__hf_validation_min__first500.jsonl": [
        ("Which teeth are least involved in periodontitis?", "B", "Lower premolar and upper canine")
    ],
    "medmcqa__io_wrapper_dev_test__first100each.json": [
        ("Tensor veli palatini is supplied by:", "B", "Trigeminal nerve"),
        ("Calculate net filtration pressure", "C", "14 mm Hg"),
    ],
    "medmcqa__medagents_options_dict__first300.jsonl": [
        ("Heavy forces on periodontal ligament causes:", "A", "Hyalinization"),
        ("For >10 mm setback of mandible", "B", "Vertical ramus osteotomy"),
    ],
    "medmcqa__mirage_style__first300.json": [
        ("Which of the following is not true for myelinated nerve fibers", "A", "Impulse through myelinated")
    ],
    # cop 1-4 in this copy; the hub copy (cop "0") of the same question confirms option A.
    "medmcqa__original_cop_1to4_plus_extra__first3.jsonl": [
        ("Which of the following is not true about glomerular capillaries", "A", "The oncotic pressure"),
        ("Which of the following are not a branch of external carotid Aery in Kiesselbach", "B", "Anterior ethmoidal"),
    ],
    "medmcqa__selfbiorag_instruction__first100.jsonl": [
        ("Which of the following are not a branch of external carotid", "B", "Anterior ethmoidal aery"),
        ("Biofilm forming bacteria causes antimicrobial", None, "Adherence"),
    ],
    "medqa__answer_idx_is_uppercase_text__first300.jsonl": [
        ("A 65-year-old man is brought to the emergency department 30 minutes", "C", "Clopidogrel"),
        ("A 72-year-old woman is admitted to the hospital for treatment of unsta", "B", "16"),
    ],
    "medqa__formatted_titlecase_keys__first150.json": [
        ("An 11-month-old boy is brought to the clinic by his mother for a rash", "D", "Immunoglobulin- IgM")
    ],
    "medqa__io_wrapper_dev_test__first60each.json": [
        ("A 75-year-old man comes to the physician because of a 7-day history", "B", "Osmotic diuresis")
    ],
    "medqa__item_index_answer_idx_not_a_key__all100.jsonl": [
        ("A 3-week-old newborn is brought to the physician by his parents", "D", "Rectal suction biopsy")
    ],
    "medqa__mirage_style__first200.json": [
        ("A 2-year-old girl with recurrent urinary tract infections", "C", "Cortical thinning with tubular atrophy")
    ],
    "medqa__nested_dataset_split_wrapper__first30.json": [
        (
            "A healthy 19-year-old man presents to his primary care provider",
            "A",
            "Disruption of cell membrane permeability",
        )
    ],
    "medqa__option_columns_nan__first200.json": [
        ("A 65-year-old man is brought to the emergency department 30 minutes", "C", "Clopidogrel")
    ],
    "medqa__selfbiorag_instruction__first60.jsonl": [
        ("A 65-year-old man is brought to the emergency department 30 minutes", "C", "Clopidogrel"),
        (
            "A 46-year-old man is brought to the emergency department for evaluation of altered",
            "D",
            "Benzodiazepine intoxication",
        ),
    ],
    "medqa__us_4opt_metamap__first400.jsonl": [
        ("A 23-year-old man is admitted to the hospital with fever, chest discom", "B", "The drug caused uncoupling")
    ],
    "medqa__us_5opt_original__first400.jsonl": [
        ("A junior orthopaedic surgery resident", "C", "Tell the attending that he cannot fail")
    ],
    "mixed__ultramedical_sharegpt_sft__all50.json": [
        ("Two days after undergoing emergency cardiac catherization", "A", "Acute kidney injury"),
        ("A 30 year ols woman presented with secondary amenorrhoea", "B", "Prolactinoma"),
    ],
    "pubmedqa__context_joined_string__first100.json": [
        ("Is adjustment for reporting heterogeneity necessary in sleep disorders", "no", "no"),
        ("30-Day and 1-year mortality in emergency general surgery", "maybe", "maybe"),
    ],
    "pubmedqa__flat_list_contexts__first100.json": [
        ("Is adjustment for reporting heterogeneity necessary in sleep disorders", "no", "no")
    ],
    "pubmedqa__io_wrapper_dev_test__first40each.json": [
        ("Is adjustment for reporting heterogeneity necessary in sleep disorders", "no", "no"),
        ("Are environmental factors important in primary systemic vasc", "yes", "yes"),
    ],
    "pubmedqa__medagents_mc__first100.jsonl": [("Is anorectal endosonography valuable in dyschesia?", "yes", "yes")],
    "pubmedqa__minimal_no_context__first300.jsonl": [
        ("Can the prognosis of polymyalgia rheumatica be predicted", "yes", "yes")
    ],
    "pubmedqa__mirage_style__first200.json": [
        ("Are pediatric concussion patients compliant with discharge instruction", "yes", "yes")
    ],
    "pubmedqa__multimedqa_wrapped__first60.json": [
        ("Landolt C and snellen e acuity", "no", "no"),
        ("30-Day and 1-year mortality in emergency general surgery", "maybe", "maybe"),
    ],
    "pubmedqa__ori_pqal__first300.json": [
        ("Is adjustment for reporting heterogeneity necessary in sleep disorders", "no", "no")
    ],
    "pubmedqa__ori_pqal_in_dot_jsonl_file__first40.jsonl": [
        ("Does diabetes mellitus influence the efficacy of FDG-PET", "no", "no")
    ],
}

# Reports for the files that are not (all) labeled questions: what a user sees instead of a traceback.
NOT_QUESTIONS = {
    "medmcqa__choices_list_test_answer_minus1__first300.jsonl": {"no_answer": 300},
    "mixed__ultramedical_sharegpt_sft__all50.json": {"open_ended": 25},
    "pref_zh_general__sharegpt_chosen_rejected__first20.jsonl": {"preference_pair": 20},
    "pref_zh_medical__question_chosen_rejected__all.jsonl": {"preference_pair": 100},
    "pubmedqa__test_ground_truth.json": {"not_an_object": 500},
    "safety_med__alpaca_refusals__n100.json": {"open_ended": 100},
    "safety_med__harmful_request_safe_response__cat1.csv": {"unrecognized_record": 50},
    "safety_med__redteam_goal_target.jsonl": {"unrecognized_record": 9},
}


def key(question: str) -> str:
    return normalize_text(question).casefold()


@pytest.mark.parametrize("name", FILES)
def test_every_real_file_converts_and_adds_up(name):
    result = load_records(REAL_DATA / name)
    report = result.report
    assert report["read"] == report["kept"] + sum(report["skipped"].values())
    assert report["kept"] == len(result.records) and report["read"] > 0
    assert not [reason for reason in report["skipped"] if reason.startswith("unexpected")]
    assert all(not record.problems() for record in result.records)
    if name in NOT_QUESTIONS:
        assert report["skipped"] == NOT_QUESTIONS[name]
    else:  # question files lose at most the few records whose options repeat a text
        assert set(report["skipped"]) <= {"duplicate_options", "answer_not_in_options"}
        assert sum(report["skipped"].values()) <= 0.02 * report["read"]


def test_every_real_file_is_covered():
    assert set(FILES) == set(GOLD) | set(BY_HAND) | set(NOT_QUESTIONS) and len(FILES) >= 37


@pytest.mark.parametrize("name", sorted(GOLD))
def test_kept_answers_agree_with_the_source_gold(name):
    read_rows, question_of, gold_of = GOLD[name]
    gold = collections.Counter((key(question_of(row)), gold_of(row)) for row in read_rows(REAL_DATA / name))
    result = load_records(REAL_DATA / name)
    kept = collections.Counter((key(r.question), r.answer) for r in result.records)
    assert not kept - gold, f"answers that disagree with the gold: {list(kept - gold)[:3]}"
    assert sum(gold.values()) == result.report["read"]


@pytest.mark.parametrize("name", sorted(BY_HAND))
def test_hand_written_expectations(name):
    records = load_records(REAL_DATA / name).records
    for start, answer, answer_text in BY_HAND[name]:
        found = [r for r in records if r.question.startswith(start)]
        assert found, f"no record starting {start!r}"
        for record in found:
            assert record.answer == answer or answer is None, (start, record.answer)
            assert record.answer_text.startswith(answer_text), (start, record.answer_text)


@requires_real_data
def test_real_special_cases():
    items = {r.id: r for r in load_records(REAL_DATA / "medqa__item_index_answer_idx_not_a_key__all100.jsonl").records}
    # answer_idx holds an option's text, not a letter, in two rows: "E" is option D's text, "X" option C's.
    assert (items["455"].answer, items["455"].answer_text) == ("D", "E")
    assert (items["824"].answer, items["824"].answer_text) == ("C", "X")
    hidden = load_records(REAL_DATA / "medmcqa__choices_list_test_answer_minus1__first300.jsonl", keep_unlabeled=True)
    first = hidden.records[0]
    assert hidden.report["skipped"] == {"duplicate_options": 2} and first.answer is None
    assert first.options == {"A": "TGF-13", "B": "MMP2", "C": "Collagen", "D": "Angiopoietin"}
    mixed = load_records(REAL_DATA / "mixed__ultramedical_sharegpt_sft__all50.json")
    assert collections.Counter(r.source for r in mixed.records) == {
        "medqa": 5, "medmcqa": 5, "pubmedqa": 5, "medqa-evol": 5, "textbookqa": 5
    }  # fmt: skip
    pubmed = next(r for r in mixed.records if r.source == "pubmedqa")
    assert pubmed.options is None and pubmed.context.startswith("Inclusions of TAR DNA binding protein-43")
    splits = load_records(REAL_DATA / "pubmedqa__io_wrapper_dev_test__first40each.json", split="test")
    assert splits.report["read"] == 40 and {r.meta["split"] for r in splits.records} == {"test"}
    ori = load_records(REAL_DATA / "pubmedqa__ori_pqal__first300.json").records[0]
    assert (ori.id, ori.meta["year"], ori.explanation[:30]) == ("21645374", 2011, "Results depicted mitochondrial")
    # The abstract's sections, kept as a list: mc_eval joins them with newlines, as lm-eval does.
    assert len(ori.meta["contexts"]) == 2 and " ".join(ori.meta["contexts"]) == ori.context
    assert ori.meta["contexts"][1].startswith("The following paper elucidates the role of mitochondrial")
    assert ori.context.startswith(
        "Programmed cell death (PCD) is the regulated death of cells within an organism. The lace"
    )
