"""Our log-likelihood scorer against lm-evaluation-harness itself, on the same tiny model and records.

lm-eval's own task objects (its pubmedqa / medmcqa / medqa_4options YAMLs and their doc_to_text
functions) build the requests from local documents in each dataset's hub schema, its HFLM scores
them, and its `process_results` gives acc / acc_norm per document; our scorer sees the same
questions as canonical records. No network: the documents are passed as a custom dataset.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from datasets import Dataset, DatasetDict  # noqa: E402

from clinalign.mc_eval import score_multiple_choice  # noqa: E402
from clinalign.records import Record  # noqa: E402

LONG_ABSTRACT = " ".join(
    f"In cohort {i}, patients with hypertension received aspirin or placebo and stroke, bleeding and "
    f"mortality were recorded over {i + 2} years of follow-up."
    for i in range(90)
)

PUBMEDQA = [
    Record(
        "pq1",
        "pubmedqa",
        "Does metformin reduce mortality in type 2 diabetes?",
        "A randomized controlled trial of 300 adults followed for five years.",
        None,
        "yes",
        "yes",
    ),
    Record(
        "pq2",
        "pubmedqa",
        "Is tachycardia a sign of anaphylaxis?",
        "Background: case series. Results: most patients were hypotensive.",
        None,
        "maybe",
        "maybe",
        meta={"contexts": ["Background: case series.", "Results: most patients were hypotensive."]},
    ),
    # Longer than the tiny model's 2048 positions: lm-eval truncates each option from the left.
    Record("pq3", "pubmedqa", "Does aspirin prevent stroke?", LONG_ABSTRACT, None, "no", "no"),
]
MEDMCQA = [
    Record(
        "mm1",
        "medmcqa",
        "Which nerve supplies the deltoid?",
        None,
        {"A": "Axillary nerve", "B": "Radial nerve", "C": "Ulnar nerve", "D": "Median nerve"},
        "A",
        "Axillary nerve",
    ),
    Record(
        "mm2",
        "medmcqa",
        "Which vitamin deficiency causes scurvy?",
        None,
        {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"},
        "C",
        "Vitamin C",
    ),
]
MEDQA = [
    Record(
        "mq1",
        "medqa",
        "A 45-year-old man presents with crushing chest pain radiating to the left arm. "
        "Which of the following is the most likely diagnosis?",
        None,
        {"A": "Myocardial infarction", "B": "Pericarditis", "C": "Pneumothorax", "D": "Costochondritis"},
        "A",
        "Myocardial infarction",
    ),
    Record(
        "mq2",
        "medqa",
        "A patient with anaphylaxis after a bee sting needs which first-line drug?",
        None,
        {"A": "Insulin", "B": "Aspirin", "C": "Epinephrine", "D": "Metformin"},
        "C",
        "Epinephrine",
    ),
]


# Each record as the hub dataset's row that lm-eval's task reads.
def pubmedqa_doc(r: Record) -> dict:  # bigbio/pubmed_qa, pubmed_qa_labeled_fold0_source
    return {"QUESTION": r.question, "CONTEXTS": r.meta.get("contexts", [r.context]), "final_decision": r.answer}


def medmcqa_doc(r: Record) -> dict:  # openlifescienceai/medmcqa (cop 0-3 on the hub)
    options = dict(zip(("opa", "opb", "opc", "opd"), r.options.values()))
    return {"question": r.question, **options, "cop": "ABCD".index(r.answer)}


def medqa_doc(r: Record) -> dict:  # GBaker/MedQA-USMLE-4-options-hf
    endings = {f"ending{i}": text for i, text in enumerate(r.options.values())}
    return {"sent1": r.question, **endings, "label": "ABCD".index(r.answer)}


CASES = {"pubmedqa": (PUBMEDQA, pubmedqa_doc), "medmcqa": (MEDMCQA, medmcqa_doc), "medqa_4options": (MEDQA, medqa_doc)}
YAML = {"pubmedqa": "pubmedqa/pubmedqa.yaml", "medmcqa": "medmcqa/medmcqa.yaml", "medqa_4options": "medqa/medqa.yaml"}


def lm_eval_task(name: str, docs: list[dict]):
    """lm-eval's own task from its shipped YAML, reading `docs` instead of the hub dataset."""
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.tasks.__file__).parent / YAML[name], resolve_func=True)
    assert config["task"] == name
    # Every split the YAML names (0-shot: only the test split is read for prompts).
    splits = {config[key] for key in ("training_split", "validation_split", "test_split") if config.get(key)}
    config["custom_dataset"] = lambda **_: DatasetDict({split: Dataset.from_list(docs) for split in splits})
    return ConfigurableTask(config=config)


@pytest.fixture(scope="module")
def bos_model(tiny_llama, tmp_path_factory) -> Path:
    """The tiny model with a tokenizer that prepends BOS, like Llama's and Gemma's."""
    import shutil

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("bos") / "tiny-llama-bos"
    shutil.copytree(tiny_llama, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).encode("Question:")[0] == tokenizer.bos_token_id
    return folder


def harness(folder: Path):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=4)


def check_against_lm_eval(lm, task_name: str) -> None:
    records, to_doc = CASES[task_name]
    docs = [to_doc(r) for r in records]
    task = lm_eval_task(task_name, docs)
    task.build_all_requests(rank=0, world_size=1)
    instances = sorted(task.instances, key=lambda inst: (inst.doc_id, inst.idx))
    responses = lm.loglikelihood(instances, disable_tqdm=True)
    theirs: dict[int, list[float]] = {}
    for instance, (loglikelihood, _) in zip(instances, responses):
        theirs.setdefault(instance.doc_id, []).append(loglikelihood)

    ours = score_multiple_choice(lm.model, lm.tokenizer, records, batch_size=2, progress=False)

    assert sorted(theirs) == list(range(len(records)))
    for doc_id, (doc, prediction) in enumerate(zip(docs, ours)):
        lls = theirs[doc_id]
        assert prediction.loglikelihoods == pytest.approx(lls, abs=1e-4)
        metrics = task.process_results(doc, [(ll, False) for ll in lls])
        assert prediction.correct == bool(metrics["acc"])
        if "acc_norm" in metrics:
            assert prediction.correct_norm == bool(metrics["acc_norm"])
        their_pred = prediction.choices[int(torch.tensor(lls).argmax())]
        assert prediction.pred == their_pred


@pytest.fixture(scope="module")
def tiny_harness(tiny_llama):
    return harness(tiny_llama)


@pytest.mark.parametrize("task_name", list(CASES))
def test_predictions_and_loglikelihoods_equal_lm_eval(task_name, tiny_harness):
    check_against_lm_eval(tiny_harness, task_name)


def test_equal_lm_eval_with_a_bos_tokenizer(bos_model):
    check_against_lm_eval(harness(bos_model), "medqa_4options")
