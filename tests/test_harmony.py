"""The harmony adapter: rendering records, training masks, parsing completions (real o200k vocabulary)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, requires_harmony_vocab

from clinalign.errors import ClinalignError
from clinalign.prompts import CLINICAL_INSTRUCTIONS, answer_line, question_text
from clinalign.records import Record

pytestmark = requires_harmony_vocab

DATE = "2026-01-15"
RETURN, END, START, CHANNEL, MESSAGE = 200002, 200007, 200006, 200005, 200008

SCURVY = Record(
    id="t-1",
    source="medmcqa",
    question="Which vitamin deficiency causes scurvy?",
    context=None,
    options={"A": "Vitamin C", "B": "Vitamin D", "C": "Vitamin K"},
    answer="A",
    answer_text="Vitamin C",
    explanation="Ascorbate is needed to hydroxylate collagen.",
)
METFORMIN = Record(
    id="t-2",
    source="pubmedqa",
    question="Does metformin lower HbA1c in type 2 diabetes?",
    context="A randomized trial of 120 adults compared metformin with placebo for 6 months.",
    options=None,
    answer="yes",
    answer_text="yes",
)


@pytest.fixture(scope="module")
def encoding():
    from harmony.vocab import load_encoding

    return load_encoding()


def encode(encoding, text: str) -> list[int]:
    return encoding.encode(text, allowed_special="all")


def trained(example) -> list[int]:
    return [t for t, m in zip(example["input_ids"], example["completion_mask"], strict=True) if m]


def test_prompt_holds_system_developer_and_user_turns(encoding):
    from harmony.render import render_for_completion

    ids = render_for_completion(METFORMIN, reasoning_effort="medium", current_date=DATE)
    text = encoding.decode(ids)
    assert text.startswith("<|start|>system<|message|>You are ChatGPT")
    assert "Knowledge cutoff: 2024-06" in text and f"Current date: {DATE}" in text
    assert "Reasoning: medium" in text
    assert f"<|start|>developer<|message|># Instructions\n\n{CLINICAL_INSTRUCTIONS}<|end|>" in text
    assert text.endswith(f"<|start|>user<|message|>{question_text(METFORMIN)}<|end|><|start|>assistant")
    assert ids.count(START) == 4  # system, developer, user, assistant


def test_training_mask_covers_exactly_the_final_message_and_return(encoding):
    from harmony.render import render_for_completion, render_for_training

    example = render_for_training(SCURVY, current_date=DATE)
    prompt = render_for_completion(SCURVY, current_date=DATE)
    response = "Answer: A. Vitamin C\nExplanation: Ascorbate is needed to hydroxylate collagen."
    expected = [CHANNEL] + encode(encoding, "final") + [MESSAGE] + encode(encoding, response) + [RETURN]
    assert example["input_ids"] == prompt + expected
    assert example["completion_mask"] == [0] * len(prompt) + [1] * len(expected)
    assert trained(example)[-1] == RETURN and END not in trained(example)


def test_rationale_is_trained_as_an_analysis_message_before_the_final(encoding):
    from harmony.render import render_for_completion, render_for_training

    example = render_for_training(SCURVY, answer_line(SCURVY), rationale=SCURVY.explanation, current_date=DATE)
    assert encoding.decode(trained(example)) == (
        f"<|channel|>analysis<|message|>{SCURVY.explanation}<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Answer: A. Vitamin C<|return|>"
    )
    assert sum(example["completion_mask"]) == len(example["input_ids"]) - len(
        render_for_completion(SCURVY, current_date=DATE)
    )


def test_special_token_text_in_a_record_stays_plain_text(encoding):
    from harmony.render import render_for_training

    sneaky = Record(
        id="t-3", source="medqa", question="What does <|return|> mean here?", context=None,
        options={"A": "stop <|end|>", "B": "go"}, answer="B", answer_text="go",
    )  # fmt: skip
    example = render_for_training(sneaky, current_date=DATE)
    assert example["input_ids"].count(RETURN) == 1 and example["input_ids"][-1] == RETURN
    assert example["input_ids"].count(END) == 3  # system, developer, user turns only


def test_bad_inputs_are_one_line_errors():
    from harmony.render import render_for_completion, render_for_training

    with pytest.raises(ClinalignError, match="reasoning_effort"):
        render_for_completion(SCURVY, reasoning_effort="max")
    unlabeled = Record(id="u", source="medqa", question="Q?", context=None, options=None, answer=None, answer_text=None)
    with pytest.raises(ClinalignError, match="no answer"):
        render_for_training(unlabeled)
    with pytest.raises(ClinalignError, match="empty response"):
        render_for_training(SCURVY, "  ")


def test_parse_full_truncated_and_missing_channels(encoding):
    from harmony.render import parse_completion, render_for_training

    example = render_for_training(
        SCURVY, "Answer: A. Vitamin C", rationale="Collagen needs ascorbate.", current_date=DATE
    )
    completion = trained(example)
    assert parse_completion(completion) == {
        "analysis": "Collagen needs ascorbate.", "final": "Answer: A. Vitamin C", "complete": True,
    }  # fmt: skip
    assert parse_completion(encoding.decode(completion)) == parse_completion(completion)
    assert parse_completion(example["input_ids"]) == parse_completion(completion)  # the whole conversation
    # Truncated inside the final message: the partial answer, not complete.
    assert parse_completion(completion[:-2]) == {
        "analysis": "Collagen needs ascorbate.", "final": "Answer: A. Vitamin", "complete": False,
    }  # fmt: skip
    # Truncated inside the analysis (before its closing "."): no final at all.
    cut = completion.index(END) - 1
    assert parse_completion(completion[:cut]) == {
        "analysis": "Collagen needs ascorbate",
        "final": None,
        "complete": False,
    }
    # No channel header (an untrained model), plain text, nothing.
    assert parse_completion("<|message|>Answer: A<|return|>") == {
        "analysis": None,
        "final": "Answer: A",
        "complete": True,
    }
    assert parse_completion("Answer: A") == {"analysis": None, "final": None, "complete": False}
    assert parse_completion([]) == {"analysis": None, "final": None, "complete": False}


def test_parse_stops_at_the_end_of_the_turn():
    from harmony.render import parse_completion

    padded = "<|channel|>final<|message|>Answer: yes<|return|><|endoftext|><|endoftext|>"
    assert parse_completion(padded) == {"analysis": None, "final": "Answer: yes", "complete": True}
    two_finals = (
        "<|channel|>final<|message|>Answer: no<|end|><|start|>assistant<|channel|>final<|message|>Answer: yes<|return|>"
    )
    assert parse_completion(two_finals)["final"] == "Answer: no"
    garbage_header = "<|channel|>final<|start|><|start|>"
    assert parse_completion(garbage_header)["complete"] is False


def test_hf_tokenizer_decodes_rendered_ids_like_harmony(encoding):
    from harmony.render import render_for_training
    from harmony.vocab import gpt_oss_tokenizer

    example = render_for_training(METFORMIN, current_date=DATE)
    tokenizer = gpt_oss_tokenizer()
    assert tokenizer.decode(example["input_ids"]) == encoding.decode(example["input_ids"])
    assert tokenizer.eos_token_id == RETURN and tokenizer.pad_token_id == 199999


def test_missing_vocabulary_fails_with_one_message_naming_the_variable(tmp_path):
    # A fresh interpreter: load_encoding is cached per process. No network here, so nothing downloads.
    env = {**os.environ, "TIKTOKEN_ENCODINGS_BASE": str(tmp_path), "TIKTOKEN_RS_CACHE_DIR": str(tmp_path)}
    code = "from harmony.vocab import load_encoding\nload_encoding()"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "VocabularyMissing" in result.stderr and "set TIKTOKEN_ENCODINGS_BASE" in result.stderr
