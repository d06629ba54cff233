"""Evaluation metrics with hand-worked expectations, and the log-likelihood scorer against a naive loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from clinalign.errors import ClinalignError
from clinalign.evaluation import (
    _response_mask,
    generate_responses,
    kl_estimators,
    kl_to_reference,
    response_explanation,
    text_overlap,
)
from clinalign.mc_eval import (
    McPrediction,
    choose,
    encode_pair,
    lm_eval_choices,
    lm_eval_context,
    lm_eval_task,
    mc_accuracy,
    score_multiple_choice,
)
from clinalign.models import load_policy
from clinalign.prompts import prompt_messages
from clinalign.records import Record

RECORDS = [
    Record(
        "pq",
        "pubmedqa",
        "Does aspirin reduce stroke risk in adults with hypertension?",
        "A randomized trial of 400 patients. Aspirin lowered stroke events. " * 4,
        None,
        "yes",
        "yes",
    ),
    Record("pq-short", "pubmedqa", "Is maybe an answer?", None, None, "maybe", "maybe"),
    Record(
        "mm",
        "medmcqa",
        "Which nerve supplies the deltoid?",
        None,
        {"A": "Axillary nerve", "B": "Radial nerve", "C": "Ulnar nerve", "D": "Median nerve"},
        "A",
        "Axillary nerve",
    ),
    Record(
        "mq5",
        "medqa",
        "A 45-year-old man presents with crushing chest pain radiating to the left arm. "
        "Which of the following is the most likely diagnosis?",
        None,
        {"A": "Myocardial infarction", "B": "Pericarditis", "C": "Pneumothorax", "D": "Costochondritis", "E": "GERD"},
        "A",
        "Myocardial infarction",
    ),
    Record(
        "unlabeled",
        "medqa",
        "Which vitamin deficiency causes scurvy?",
        None,
        {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"},
        None,
        None,
    ),
]


# ----------------------------------------------------------------------------------------------
# lm-eval layouts and picks


def test_layouts_follow_lm_eval_tasks():
    pq, _, mm, mq5, mq4 = RECORDS
    assert lm_eval_context(RECORDS[1]) == "Abstract: \nQuestion: Is maybe an answer?\nAnswer:"
    assert lm_eval_context(mm) == (
        "Question: Which nerve supplies the deltoid?\nChoices:\n"
        "A. Axillary nerve\nB. Radial nerve\nC. Ulnar nerve\nD. Median nerve\nAnswer:"
    )
    assert lm_eval_context(mq4) == (
        "Question: Which vitamin deficiency causes scurvy?\nA. Vitamin A\nB. Vitamin B12\nC. Vitamin C\nD. Vitamin D\nAnswer:"
    )
    assert lm_eval_context(mq5).endswith("D. Costochondritis\nE. GERD\nAnswer:")
    assert [lm_eval_task(r) for r in RECORDS] == ["pubmedqa", "pubmedqa", "medmcqa", "medqa", "medqa_4options"]
    assert lm_eval_choices(pq) == ["yes", "no", "maybe"] and lm_eval_choices(mq5) == list("ABCDE")
    sections = Record("s", "pubmedqa", "Q?", "one. two.", None, "no", "no", meta={"contexts": ["one.", "two."]})
    assert lm_eval_context(sections) == "Abstract: one.\ntwo.\nQuestion: Q?\nAnswer:"


def test_encode_pair_moves_trailing_space_and_cuts_joint_encoding(tiny_llama):
    _, tokenizer = load_policy(tiny_llama)
    context, continuation = encode_pair(tokenizer, "Answer: ", "yes")
    assert context == tokenizer.encode("Answer:")
    whole = tokenizer.encode("Answer: yes")
    assert context + continuation == whole and continuation


def test_acc_and_acc_norm_differ_on_hand_worked_case():
    # yes/no/maybe have 3/2/5 characters: raw -3.0/-2.5/-5.5 -> "no"; per character -1.0/-1.25/-1.1 -> "yes".
    assert choose(["yes", "no", "maybe"], [-3.0, -2.5, -5.5]) == ("no", "yes")
    # Letters all have one character, so acc and acc_norm agree; ties go to the first choice, like np.argmax.
    assert choose(list("ABCD"), [-1.0, -0.5, -0.5, -2.0]) == ("B", "B")


def test_mc_accuracy_counts_labeled_predictions_only():
    def prediction(pred, pred_norm, gold):
        correct = None if gold is None else (pred == gold, pred_norm == gold)
        return McPrediction(
            "x", "pubmedqa", ["yes", "no", "maybe"], [0.0] * 3, pred, pred_norm, gold, *(correct or (None, None))
        )

    predictions = [
        prediction("no", "yes", "yes"),
        prediction("no", "no", "no"),
        prediction("yes", "maybe", "maybe"),
        prediction("yes", "yes", None),
    ]
    # Wilson 95% by hand: 1 of 3 -> (2.9207 -+ 2.5000) / 6.8415 = [0.0615, 0.7923]; 3 of 3 -> [0.4385, 1].
    assert mc_accuracy(predictions) == pytest.approx(
        {"acc": 1 / 3, "acc_low": 0.0615, "acc_high": 0.7923, "acc_norm": 1.0, "acc_norm_low": 0.4385,
         "acc_norm_high": 1.0, "n": 3}, abs=1e-4)  # fmt: skip
    assert mc_accuracy(predictions[3:]) == {"acc": None, "acc_low": None, "acc_high": None, "acc_norm": None,
                                            "acc_norm_low": None, "acc_norm_high": None, "n": 0}


# ----------------------------------------------------------------------------------------------
# The scorer against a naive one-request-per-option loop


def naive_loglikelihoods(model, tokenizer, record: Record) -> list[float]:
    """lm-eval's scoring spelled out: one unpadded forward per option, sum of continuation log-probs."""
    scores = []
    for choice in lm_eval_choices(record):
        context, continuation = encode_pair(tokenizer, lm_eval_context(record), " " + choice)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([context + continuation[:-1]])).logits[0, len(context) - 1 :]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        scores.append(sum(logprobs[j, token].item() for j, token in enumerate(continuation)))
    return scores


def lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    # Non-zero B matrices, so the adapter changes the model's outputs.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, config).eval()


# Batches of 3 mix long and short contexts (padding); GPT-OSS adds a sliding-window cache and experts.
@pytest.mark.parametrize(("fixture", "batch_size"), [("tiny_llama", 1), ("tiny_llama", 3), ("tiny_gpt_oss", 3)])
def test_one_forward_scorer_equals_naive_loop(fixture, batch_size, request):
    model, tokenizer = load_policy(request.getfixturevalue(fixture), dtype="float32")
    continuation_lengths = {
        len(encode_pair(tokenizer, lm_eval_context(r), " " + c)[1]) for r in RECORDS for c in lm_eval_choices(r)
    }
    predictions = score_multiple_choice(model, tokenizer, RECORDS, batch_size=batch_size, progress=False)
    assert [p.id for p in predictions] == [r.id for r in RECORDS]
    for record, prediction in zip(RECORDS, predictions):
        expected = naive_loglikelihoods(model, tokenizer, record)
        assert prediction.loglikelihoods == pytest.approx(expected, abs=1e-4)
        assert (prediction.pred, prediction.pred_norm) == choose(prediction.choices, expected)
        assert prediction.gold == record.answer
        assert prediction.correct == (None if record.answer is None else prediction.pred == record.answer)
    if fixture == "tiny_llama":  # its small vocabulary splits " maybe": the multi-token path ran
        assert max(continuation_lengths) > 1


def test_scorer_on_peft_model_and_bf16(tiny_llama):
    model, tokenizer = load_policy(tiny_llama, dtype="float32")
    base_scores = [p.loglikelihoods for p in score_multiple_choice(model, tokenizer, RECORDS, progress=False)]
    peft_model = lora(model)
    predictions = score_multiple_choice(peft_model, tokenizer, RECORDS, batch_size=2, progress=False)
    for record, prediction, base in zip(RECORDS, predictions, base_scores):
        assert prediction.loglikelihoods == pytest.approx(naive_loglikelihoods(peft_model, tokenizer, record), abs=1e-4)
        assert prediction.loglikelihoods != pytest.approx(base, abs=1e-3)  # the adapter is really applied

    bf16 = load_policy(tiny_llama, dtype="bfloat16")[0]
    bf16_scores = [p.loglikelihoods for p in score_multiple_choice(bf16, tokenizer, RECORDS, progress=False)]
    for ours, reference in zip(bf16_scores, base_scores):
        assert ours == pytest.approx(reference, abs=0.25)


def test_scorer_restores_training_mode_and_rejects_bad_input(tiny_llama):
    model, tokenizer = load_policy(tiny_llama, dtype="float32")
    model.train()
    score_multiple_choice(model, tokenizer, RECORDS[:1], progress=False)
    assert model.training
    with pytest.raises(ClinalignError, match="empty question"):
        score_multiple_choice(model, tokenizer, [Record("e", "medqa", "", None, {"A": "x", "B": "y"}, "A", "x")])
    with pytest.raises(ClinalignError, match="batch_size"):
        score_multiple_choice(model, tokenizer, RECORDS, batch_size=0)


# ----------------------------------------------------------------------------------------------
# ROUGE-L and BLEU through rouge-score and sacrebleu


def test_text_overlap_hand_worked():
    same = text_overlap(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["rougeL"] == pytest.approx(1.0) and same["bleu"] == pytest.approx(100.0)

    # ROUGE-L with stemming: patients->patient, treated/treating->treat; LCS = 2 of 3 and 4 tokens.
    stemmed = text_overlap(["patients were treated"], ["the patient was treating"])
    assert stemmed["rougeL"] == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))

    # BLEU: one extra word; clipped n-gram precisions 6/7, 5/6, 4/5, 3/4, no brevity penalty.
    extra = text_overlap(["the cat sat on the mat today"], ["the cat sat on the mat"])
    assert extra["bleu"] == pytest.approx(100 * (6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25, abs=1e-6)
    # Corpus BLEU pools the n-gram counts of all pairs (not a mean of sentence scores).
    corpus = text_overlap(["the cat sat on the mat today", "a b c d"], ["the cat sat on the mat", "a b c d"])
    assert corpus["bleu"] == pytest.approx(100 * (10 / 11 * 8 / 9 * 6 / 7 * 4 / 5) ** 0.25, abs=1e-6)
    assert corpus["rougeL"] == pytest.approx((2 * 1 * (6 / 7) / (1 + 6 / 7) + 1.0) / 2)
    assert corpus["n"] == 2

    with pytest.raises(ClinalignError):
        text_overlap(["a"], [])


def test_response_explanation():
    assert response_explanation("Answer: B. Pericarditis\nExplanation: pleuritic pain.") == "pleuritic pain."
    assert response_explanation("Answer: yes\nThe trial was positive.") == "The trial was positive."
    assert response_explanation("Just text.") == "Just text."


def test_answer_metrics_with_the_shared_extractor():
    pytest.importorskip("clinalign.factuality")
    from clinalign.evaluation import answer_metrics

    records = [
        Record("a", "medqa", "Q1?", None, {"A": "Aspirin", "B": "Insulin"}, "B", "Insulin", "Insulin lowers glucose."),
        Record("b", "pubmedqa", "Q2?", None, None, "yes", "yes", "The trial was positive."),
        Record("c", "medqa", "Q3?", None, {"A": "Aspirin", "B": "Insulin"}, "A", "Aspirin"),
    ]
    responses = [
        "Answer: B. Insulin\nExplanation: Insulin lowers glucose.",
        "Answer: no\nExplanation: The trial was positive.",
        "I cannot tell from the information given.",
    ]
    metrics = answer_metrics(records, responses)
    assert metrics["n"] == 3 and metrics["n_explained"] == 2
    assert metrics["acc"] == pytest.approx(1 / 3)
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["no_answer"] == pytest.approx(1 / 3)
    assert metrics["rougeL"] == pytest.approx(1.0) and metrics["bleu"] == pytest.approx(100.0)


# ----------------------------------------------------------------------------------------------
# KL estimators


P = torch.tensor([0.5, 0.25, 0.25])
Q = torch.tensor([0.25, 0.5, 0.25])


def test_kl_estimators_hand_worked():
    # Tokens 0 then 1 from p, a third position masked out (its values must not count).
    logp_model = torch.log(torch.tensor([[P[0], P[1], 0.9]]))
    logp_ref = torch.log(torch.tensor([[Q[0], Q[1], 0.1]]))
    k1, k3 = kl_estimators(logp_model, logp_ref, torch.tensor([[1, 1, 0]]))
    # log r = -log 2 then +log 2: k1 = log 2 - log 2 = 0; k3 = (0.5 - 1 + log 2) + (2 - 1 - log 2) = 0.5.
    assert k1.tolist() == pytest.approx([0.0], abs=1e-12)
    assert k3.tolist() == pytest.approx([0.5])


def test_kl_estimators_expectation_is_exact_kl():
    exact = float((P * (P / Q).log()).sum())  # 0.25 log 2
    assert exact == pytest.approx(0.25 * math.log(2))
    outcomes = torch.arange(3)
    k1, k3 = kl_estimators(P.log()[outcomes, None], Q.log()[outcomes, None], torch.ones(3, 1))
    assert float((P * k1).sum()) == pytest.approx(exact)
    assert float((P * k3).sum()) == pytest.approx(exact)
    assert (k3 >= 0).all() and (k1 < 0).any()  # k3 is never negative, k1 can be


def test_response_mask_ends_at_the_first_eos():
    tokens = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 2, 3, 3], [5, 9, 9, 2]])
    assert _response_mask(tokens, {2}).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert _response_mask(tokens, {2, 9}).tolist()[3] == [1, 1, 0, 0]


# ----------------------------------------------------------------------------------------------
# Generation and KL on the tiny model

MESSAGES = [prompt_messages(r) for r in RECORDS[:3]]


def test_generate_responses_batched_equals_one_by_one(tiny_llama):
    model, tokenizer = load_policy(tiny_llama, dtype="float32")
    batched = generate_responses(model, tokenizer, MESSAGES, max_new_tokens=6, batch_size=3, progress=False)
    single = generate_responses(model, tokenizer, MESSAGES, max_new_tokens=6, batch_size=1, progress=False)
    assert batched == single and len(batched) == 3 and all(isinstance(r, str) for r in batched)


def test_kl_to_reference(tiny_llama):
    model, tokenizer = load_policy(tiny_llama, dtype="float32")
    itself = kl_to_reference(model, model, tokenizer, MESSAGES, max_new_tokens=5, num_samples=2, seed=1, progress=False)
    assert itself["n"] == 6 and 1 <= itself["mean_response_tokens"] <= 5
    assert itself["kl_k1"] == pytest.approx(0.0, abs=1e-6) and itself["kl_k3"] == pytest.approx(0.0, abs=1e-6)

    base_copy = copy.deepcopy(model)
    adapted = lora(model)
    disabled = kl_to_reference(
        adapted, None, tokenizer, MESSAGES, max_new_tokens=5, num_samples=2, seed=1, progress=False
    )
    separate = kl_to_reference(
        adapted, base_copy, tokenizer, MESSAGES, max_new_tokens=5, num_samples=2, seed=1, progress=False
    )
    assert disabled["kl_k3"] > 0
    # One value per prompt (the mean of its 2 samples), in the prompts' order: their mean is the overall one.
    for key in ("kl_k1", "kl_k3"):
        per_prompt = disabled["per_prompt"][key]
        assert len(per_prompt) == len(MESSAGES)
        assert sum(per_prompt) / len(per_prompt) == pytest.approx(disabled[key], rel=1e-9)
        assert per_prompt == pytest.approx(separate["per_prompt"][key], abs=1e-5)
    for key in ("kl_k1", "kl_k3", "mean_response_tokens"):
        assert disabled[key] == pytest.approx(separate[key], abs=1e-5)

    with pytest.raises(ClinalignError, match="no adapters"):
        kl_to_reference(base_copy, None, tokenizer, MESSAGES, max_new_tokens=2, progress=False)


def test_letter_bias_shows_a_model_that_answers_a_to_everything():
    from clinalign.mc_eval import McPrediction
    from clinalign.policy_eval import letter_bias

    golds = ["A", "B", "C", "D", "B", None]
    predictions = [McPrediction(str(i), "medmcqa", list("ABCD"), [0.0] * 4, "A", "A", g, g == "A" if g else None,
                                g == "A" if g else None) for i, g in enumerate(golds)]
    bias = letter_bias(predictions)
    assert bias["predicted"] == {"A": 5} and bias["gold"] == {"A": 1, "B": 2, "C": 1, "D": 1}
    assert (bias["modal"], bias["modal_share"], bias["gold_modal_share"], bias["n"]) == ("A", 1.0, 0.4, 5)


def test_kl_questions_are_taken_in_turn_from_every_dataset(tiny_sft_adapter):
    # The first kl_max_prompts // 2 questions used to be the first dataset's alone (all PubMedQA).
    from clinalign.data import load_records
    from clinalign.policy_eval import evaluate_policy
    from clinalign.tasks import load_safety_prompts

    files = ("pubmedqa_ori_pqal.json", "medmcqa_train.jsonl", "medqa_us_test.jsonl")
    records = [r for f in files for r in load_records(f"clinalign/sample_data/{f}").records[:3]]
    safety = load_safety_prompts("clinalign/sample_data/safety_prompts.jsonl")[:4]
    model, tokenizer = load_policy("tiny-llama", tiny_sft_adapter, dtype="float32")
    results = evaluate_policy(
        model, tokenizer, records=records, safety_prompts=safety, multiple_choice=False, nll=False,
        max_generated_per_dataset=2, max_new_tokens=2, kl_max_new_tokens=2, kl_max_prompts=8,
    )  # fmt: skip
    keys = list(results["items"]["overall"]["kl_k1"])
    assert [k.split(":")[0] for k in keys[:4]] == ["medmcqa", "medqa", "pubmedqa", "medmcqa"]
    assert all(k.startswith("safety:") for k in keys[4:]) and len(keys) == 8
    assert results["overall"]["n"] == 8


def test_a_policy_that_is_its_reference_gets_the_kl_the_estimate_gives_without_sampling(tiny_sft_adapter):
    # eval's SFT model is its own KL reference: sampling and scoring it twice gives exactly 0 on every
    # prompt, which `reference_is_policy` records without the work. Same prompts, same keys, same values.
    from clinalign.data import load_records
    from clinalign.policy_eval import evaluate_policy, same_model
    from clinalign.tasks import load_safety_prompts

    records = load_records("clinalign/sample_data/medmcqa_train.jsonl").records[:3]
    safety = load_safety_prompts("clinalign/sample_data/safety_prompts.jsonl")[:3]
    model, tokenizer = load_policy("tiny-llama", tiny_sft_adapter, dtype="float32")
    reference = load_policy("tiny-llama", tiny_sft_adapter, dtype="float32")[0]
    common = dict(records=records, safety_prompts=safety, multiple_choice=False, nll=False, reference=reference,
                  max_generated_per_dataset=2, max_new_tokens=2, kl_max_new_tokens=4, kl_max_prompts=4)  # fmt: skip
    sampled = evaluate_policy(model, tokenizer, **common)
    known = evaluate_policy(model, tokenizer, reference_is_policy=True, **common)
    for metric in ("kl_k1", "kl_k3"):
        assert known["items"]["overall"][metric] == sampled["items"]["overall"][metric]
        assert set(sampled["items"]["overall"][metric].values()) == {0.0} and len(sampled["items"]["overall"][metric]) == 4
        assert known["overall"][metric] == sampled["overall"][metric] == 0.0
    assert known["overall"]["n"] == sampled["overall"]["n"] == 4
    assert same_model("tiny-llama", tiny_sft_adapter, "tiny-llama", tiny_sft_adapter)
    assert not same_model("tiny-llama", tiny_sft_adapter, "tiny-llama", None)
    assert not same_model("tiny-llama", None, "tiny-gpt-oss", None)
