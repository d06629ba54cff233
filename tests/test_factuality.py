"""Answer extraction and factuality scoring: hand-worked phrasings, the trained format, ROUGE-L, real replies."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REAL_DATA, requires_real_data
from hypothesis import given, settings
from hypothesis import strategies as st

from clinalign.errors import ClinalignError
from clinalign.factuality import extract_answer, rouge_l, score_factuality
from clinalign.prompts import answer_completion
from clinalign.records import Record

MC = {"A": "Heparin", "B": "Aspirin", "C": "Warfarin", "D": "Aspirin and clopidogrel"}
YNM = {"yes": "yes", "no": "no", "maybe": "maybe"}

PHRASINGS = [
    # the toolkit's own format (clinalign/prompts.py), first-class
    ("Answer: B. Aspirin\nExplanation: Aspirin reduces mortality.", MC, "B"),
    ("Answer: B", MC, "B"),
    ("Answer: (B)", MC, "B"),
    ("Answer: b", MC, "B"),
    ("ANSWER: B", MC, "B"),
    ("Answer - B", MC, "B"),
    ("**Answer: B**", MC, "B"),
    ("\n\nAnswer: B", MC, "B"),
    ("Answer: Aspirin", MC, "B"),
    ("Answer: B. Warfarin", MC, "B"),  # the letter wins over a mismatched text
    ("Answer: B. Aspirin\nExplanation: Option C (warfarin) is not indicated.", MC, "B"),
    ("<think>maybe A</think>Answer: B", MC, "B"),
    # explicit statements
    ("The answer is (B).", MC, "B"),
    ("The answer is B", MC, "B"),
    ("The answer is (b)", MC, "B"),
    ("The correct answer is B: Aspirin", MC, "B"),
    ("The answer is C) Warfarin", MC, "C"),
    ("Option B is correct.", MC, "B"),
    ("B is the correct answer because it inhibits platelets.", MC, "B"),
    ("I would choose B.", MC, "B"),
    ("I'd go with option B.", MC, "B"),
    ("The answer is A because heparin acts fast.", MC, "A"),
    ("Options are limited, but the best choice is aspirin.", MC, "B"),
    ("The answer is B.\nFinal answer: C", MC, "C"),  # a final answer wins
    # a reply that opens with a choice label
    ("B.", MC, "B"),
    ("b)", MC, "B"),
    ("(B) Aspirin", MC, "B"),
    ("[B]", MC, "B"),
    ("B - Aspirin", MC, "B"),
    ("Option B: Aspirin", MC, "B"),
    ("Option b", MC, "B"),
    ("A", MC, "A"),
    ("Probably B.", MC, "B"),
    # restated option text
    ("Aspirin", MC, "B"),
    ("aspirin.", MC, "B"),
    ("The most appropriate treatment is aspirin.", MC, "B"),
    ("A patient like this needs aspirin.", MC, "B"),  # "A" is an article here, not option A
    ("Aspirin and clopidogrel", MC, "D"),  # the longer of two nested option texts
    ("Aspirin is preferred over heparin here.", MC, "B"),
    # negations
    ("The answer is not B.", MC, None),
    ("Not B.", MC, None),
    ("Not B, but C.", MC, "C"),
    ("The answer is C, not B.", MC, "C"),
    ("I would not choose B; the answer is C.", MC, "C"),
    ("Neither B nor C.", MC, None),
    # two choices, hedges, nothing
    ("B or C", MC, None),
    ("It could be B or C.", MC, None),
    ("Aspirin or heparin.", MC, None),
    ("I'm not sure.", MC, None),
    ("I'm not sure, it could be aspirin.", MC, None),
    ("I cannot determine the answer from the information given.", MC, None),
    ("Answer: E", MC, None),  # not an option of this question
    ("", MC, None),
    # yes / no / maybe
    ("Answer: yes", YNM, "yes"),
    ("Answer: maybe", YNM, "maybe"),
    ("Answer: Yes, because the trial was positive.", YNM, "yes"),
    ("Yes.", YNM, "yes"),
    ("yes, the study shows a benefit.", YNM, "yes"),
    ("No, it does not.", YNM, "no"),
    ("Maybe.", YNM, "maybe"),
    ("The answer is no.", YNM, "no"),
    ("I'd say no.", YNM, "no"),
    ("In conclusion, yes.", YNM, "yes"),
    ("Probably yes.", YNM, "yes"),
    ("It is unclear; the evidence is mixed.", YNM, None),
    ("Yes or no, depending on the dose.", YNM, None),
    ("Not sure.", YNM, None),
    ("No idea.", YNM, None),
    ("There is no evidence that it helps.", YNM, None),  # "no" before a noun is not a reply
]


@pytest.mark.parametrize(("response", "choices", "expected"), PHRASINGS, ids=[repr(p[0])[:40] for p in PHRASINGS])
def test_extract_answer(response, choices, expected):
    assert extract_answer(response, choices) == expected


def test_at_least_forty_phrasings():
    assert len(PHRASINGS) >= 40


def test_options_that_look_like_letters_in_the_trained_format():
    tricky = {"A": "B cells", "B": "A-band", "C": "None of the above", "D": "C"}
    for letter in tricky:
        record = Record("t", "medqa", "Q?", None, tricky, letter, tricky[letter])
        assert extract_answer(answer_completion(record), tricky) == letter


@settings(max_examples=150, deadline=None)
@given(
    texts=st.lists(st.text(min_size=1, max_size=30).filter(lambda t: t.strip()), min_size=2, max_size=5, unique=True),
    data=st.data(),
)
def test_trained_format_round_trips(texts, data):
    options = {chr(ord("A") + i): " ".join(t.split()) or "x" for i, t in enumerate(texts)}
    letter = data.draw(st.sampled_from(sorted(options)))
    record = Record("h", "medqa", "Q?", None, options, letter, options[letter], explanation="Because.")
    assert extract_answer(answer_completion(record), options) == letter


def _record(answer="B", explanation=None):
    return Record("r1", "medqa", "Which drug?", None, dict(MC), answer, MC.get(answer) if answer else None, explanation)


def test_score_correct_wrong_and_no_commitment():
    record = _record()
    correct = score_factuality(record, "Answer: B. Aspirin")
    assert (correct.score, correct.extracted, correct.gold, correct.correct) == (1.0, "B", "B", True)
    wrong = score_factuality(record, "The answer is C.")
    assert (wrong.score, wrong.extracted, wrong.correct) == (0.0, "C", False)
    hedge = score_factuality(record, "It could be B or C.")
    assert (hedge.score, hedge.extracted) == (0.25, None)  # 1 / 4 options
    assert score_factuality(record, "B or C", no_commitment=0.0).score == 0.0


def test_score_decision_record():
    record = Record("p1", "pubmedqa", "Does it work?", "ctx", None, "no", "no")
    assert score_factuality(record, "Answer: no").score == 1.0
    assert score_factuality(record, "Yes, clearly.").score == 0.0
    assert score_factuality(record, "Not sure.").score == pytest.approx(1 / 3)


def test_free_text_reference_uses_rouge_l():
    record = Record("u1", "medqa", "Why?", None, dict(MC), None, None, explanation="patient fever")
    scored = score_factuality(record, "the patient has fever today")
    # LCS("patient fever") = 2 tokens: precision 2/5, recall 2/2, F1 = 2 * 0.4 * 1 / 1.4
    assert scored.method == "rouge_l" and scored.extracted is None
    assert scored.score == pytest.approx(2 * 0.4 / 1.4)
    with pytest.raises(ClinalignError, match="no gold answer"):
        score_factuality(_record(answer=None), "Answer: B")


def test_rouge_l_hand_worked():
    assert rouge_l("aspirin reduces mortality", "aspirin reduces mortality") == 1.0
    assert rouge_l("completely different words", "aspirin reduces mortality") == 0.0
    # reference 4 tokens, prediction 2 of them in order: P = 1, R = 1/2, F1 = 2/3
    assert rouge_l("aspirin mortality", "aspirin reduces cardiac mortality") == pytest.approx(2 / 3)


@requires_real_data
def test_real_exam_replies_agree_with_their_answer_letter():
    """UltraMedical's exam replies end 'So, the answer is X.': every one extracts to its gold letter,
    and without that line extraction is never wrong, only silent (None) or right."""
    items = json.loads((REAL_DATA / "mixed__ultramedical_sharegpt_sft__all50.json").read_text())
    checked = 0
    for item in items:
        if not (isinstance(item.get("answer"), str) and re.fullmatch(r"[A-E]", item["answer"])):
            continue
        options = dict(re.findall(r"^([A-E])\. (.+)$", item["conversations"][0]["value"], re.M))
        reply = item["conversations"][1]["value"]
        assert extract_answer(reply, options) == item["answer"], item["id"]
        body = re.sub(r"\s*So, the answer is [A-E]\.\s*$", "", reply)
        assert extract_answer(body, options) in (None, item["answer"]), item["id"]
        checked += 1
    assert checked >= 20
