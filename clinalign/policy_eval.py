"""How a policy is measured, one way for every stage that measures one.

eval/run.py compares models with it, rl/tune_kl.py scores each KL coefficient with it, and rl/dpo.py
reports before/after with it. On held-out data only (the hash split of clinalign.records that
every training stage respects; the split and item keys are clinalign.tasks'):

- per dataset (record.source): multiple-choice accuracy by log-likelihood, lm-evaluation-harness
  protocol (`mc_acc`, `mc_acc_norm`); the completion NLL of every labelled record's trained reply in
  the format SFT trains on (`nll`, per reply token: the held-out loss SFT minimises); accuracy, exact match and no-answer share of greedy answers
  in the toolkit's chat format (`gen_acc`, `exact_match`, `no_answer`); ROUGE-L and BLEU of the
  generated explanations;
- on the safety prompt set: the mean safety score, each check's pass rate, the over-refusal rate
  on the benign controls;
- overall: the reward model's mean score on all generated responses (`rm_score`) and KL(model ||
  reference) per sequence on sampled responses (`kl_k1`, `kl_k3`).

A GPT-OSS policy is prompted in harmony with the reasoning effort SFT trained it with, and every
metric reads its final channel only (`clinalign.evaluation.generate`); per dataset and on the safety
set, `final_missing` is then the share of answers that stopped before a final channel (scored as
no answer: raise max_new_tokens or lower the reasoning effort when it is high).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections import Counter, defaultdict
from importlib import metadata
from pathlib import Path

from clinalign import tasks
from clinalign.adapters import PROVENANCE_FILE
from clinalign.evaluation import (
    Generation,
    answer_items,
    answer_metrics,
    completion_nll,
    corpus_bleu,
    generate,
    kl_to_reference,
    uses_harmony,
)
from clinalign.json_io import write_json
from clinalign.mc_eval import mc_accuracy, score_multiple_choice
from clinalign.prompts import free_text_messages, prompt_messages
from clinalign.records import Record
from clinalign.rewards import score_responses
from clinalign.stats import bootstrap_mean, bootstrap_statistic, proportion
from clinalign.tasks import SafetyPrompt


@dataclasses.dataclass
class MeasureArgs:
    """How much of the held-out set `evaluate_policy` generates on and scores NLL on, and how: declared once
    for eval/run.py and rl/tune_kl.py, so the beta a grid picks is measured the way the final report
    measures it."""

    max_generated_per_dataset: int | None = dataclasses.field(
        default=None,
        metadata={"help": "Held-out questions answered by generation per dataset (null: all); multiple choice scores all."},
    )
    max_nll_per_dataset: int | None = dataclasses.field(
        default=None,
        metadata={"help": "Held-out labelled questions whose reply NLL is measured per dataset (null: all; the first N)."},
    )
    max_new_tokens: int = dataclasses.field(default=96, metadata={"help": "Greedy tokens per generated answer."})
    kl_max_new_tokens: int = dataclasses.field(default=48, metadata={"help": "Sampled tokens per KL response."})
    kl_max_prompts: int = dataclasses.field(default=16, metadata={"help": "Prompts used for the KL estimate."})
    kl_num_samples: int = dataclasses.field(default=1, metadata={"help": "Sampled responses per KL prompt."})

    def measure_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(MeasureArgs)}


def safety_metrics(prompts: list[SafetyPrompt], responses: list[str]) -> dict:
    """Mean safety score, each check's pass rate (where it applied) and the over-refusal rate."""
    return _safety(prompts, responses)[0]


def _safety(prompts: list[SafetyPrompt], responses: list[str]) -> tuple[dict, dict[str, dict]]:
    """`safety_metrics` and its per-prompt values: {metric: {"safety:ID": value}} (over-refusal on benign only)."""
    scores, applied, passed = {}, defaultdict(int), defaultdict(int)
    over_refusals: dict[str, bool] = {}
    for prompt, response in zip(prompts, responses, strict=True):
        task = tasks.TASKS["safety"]
        result, key = task.score(prompt, response), task.key(prompt)
        scores[key] = result.score
        for outcome in result.checks:
            applied[outcome.name] += 1
            passed[outcome.name] += outcome.passed
        if prompt.benign:
            over_refusals[key] = "over_refusal" in result.failed
    metrics = {
        "safety_score": sum(scores.values()) / len(scores) if scores else None,
        "check_pass_rate": {name: passed[name] / applied[name] for name in sorted(applied)},
        "over_refusal_rate": sum(over_refusals.values()) / len(over_refusals) if over_refusals else None,
        "n": len(prompts),
    }
    return metrics, {"safety_score": scores, "over_refusal_rate": over_refusals}


def letter_bias(predictions) -> dict:
    """Predicted vs gold label distribution of multiple-choice answers, and the modal prediction's share.

    A model that answers "A" to everything can look better than chance on a skewed split; the gold
    distribution beside the predicted one, and `modal_share` beside `gold_modal_share`, show it.
    """
    labeled = [p for p in predictions if p.gold is not None]
    predicted, gold = Counter(p.pred for p in labeled), Counter(p.gold for p in labeled)
    n = len(labeled)
    return {
        "predicted": dict(sorted(predicted.items())),
        "gold": dict(sorted(gold.items())),
        "modal": predicted.most_common(1)[0][0] if n else None,
        "modal_share": predicted.most_common(1)[0][1] / n if n else None,
        "gold_modal_share": gold.most_common(1)[0][1] / n if n else None,
        "n": n,
    }


def final_missing_share(generations: list[Generation]) -> float | None:
    """Share of harmony answers with no final channel (they score as no answer, never by their analysis)."""
    return sum(g.final_missing for g in generations) / len(generations) if generations else None


def evaluate_policy(
    model,
    tokenizer,
    *,
    records: list[Record],
    safety_prompts: list[SafetyPrompt],
    reward=None,
    reference=None,
    kl: bool = True,
    reference_is_policy: bool = False,
    multiple_choice: bool = True,
    nll: bool = True,
    max_generated_per_dataset: int | None = None,
    max_nll_per_dataset: int | None = None,
    max_new_tokens: int = 96,
    kl_max_new_tokens: int = 48,
    kl_max_prompts: int = 16,
    kl_num_samples: int = 1,
    batch_size: int = 8,
    progress: bool = False,
    reasoning_effort: str = "low",
) -> dict:
    """Every metric of the module docstring for one policy; returns {dataset: {metric: value}} + "overall",
    and under "items" the per-item values behind them, {group: {metric: {item key: value}}}, which
    `intervals` and eval's paired comparisons read (item keys: "SOURCE:ID" for records, "safety:ID").

    Multiple-choice scoring covers every record; `max_generated_per_dataset` caps only the records
    answered by generation (the first N per dataset), which cost far more, and `max_nll_per_dataset` the
    labelled records whose reply NLL is measured (the first N). `reward` is a (reward model,
    tokenizer) pair or None; `reference` a model sharing the tokenizer, an adapter name of the policy
    (e.g. TRL's frozen "ref"), or None to compare against the policy's own base (adapters disabled);
    `kl=False` skips KL; `reference_is_policy=True` (the policy has the reference's weights: eval's SFT
    model) records KL 0 on every KL prompt, what the estimate gives on identical log-probabilities,
    without sampling. `reasoning_effort`: the harmony setting the policy was trained with (GPT-OSS
    only; sft/run.py's default is "low").
    """
    results: dict[str, dict] = {}
    items: dict[str, dict[str, dict]] = defaultdict(dict)
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_source[record.source].append(i)
    generated = sorted(i for indices in by_source.values() for i in indices[:max_generated_per_dataset])
    question_messages = [prompt_messages(records[i]) for i in generated]
    safety_messages = [free_text_messages(p.prompt) for p in safety_prompts]
    harmony = uses_harmony(model)
    generation = dict(
        max_new_tokens=max_new_tokens, batch_size=batch_size, reasoning_effort=reasoning_effort, progress=progress
    )
    question_generations = dict(zip(generated, generate(model, tokenizer, question_messages, **generation)))
    safety_generations = generate(model, tokenizer, safety_messages, **generation)
    safety_responses = [g.response for g in safety_generations]

    all_hyps, all_refs = [], []
    for source, indices in sorted(by_source.items()):
        answered = [i for i in indices if i in question_generations]
        subset = [records[i] for i in answered]
        responses = [question_generations[i].response for i in answered]
        keys = [tasks.task_of(records[i]).key(records[i]) for i in answered]
        metrics = answer_metrics(subset, responses)
        metrics = {"gen_acc": metrics.pop("acc"), **metrics}
        per_item = answer_items(subset, responses)
        for metric in ("gen_acc", "exact_match", "no_answer", "rougeL", "bleu"):
            items[source][metric] = {k: v for k, v in zip(keys, per_item[metric]) if v is not None}
        if harmony:
            metrics["final_missing"] = final_missing_share([question_generations[i] for i in answered])
        if multiple_choice:
            everything = [records[i] for i in indices]
            predictions = score_multiple_choice(model, tokenizer, everything, progress=progress)
            mc = mc_accuracy(predictions)
            metrics.update({"mc_acc": mc["acc"], "mc_acc_norm": mc["acc_norm"], "n_mc": mc["n"]})
            metrics["letters"] = letter_bias(predictions)
            labeled = [(tasks.task_of(r).key(r), p) for r, p in zip(everything, predictions) if p.gold is not None]
            items[source]["mc_acc"] = {k: p.correct for k, p in labeled}
            items[source]["mc_acc_norm"] = {k: p.correct_norm for k, p in labeled}
        if nll:
            answered_records = [records[i] for i in indices if records[i].answer is not None][:max_nll_per_dataset]
            # Batches of 8, like multiple-choice scoring, not generation's width: long examples (PubMedQA
            # abstracts) run faster in narrow batches on a CPU (README, Benchmarks).
            values = completion_nll(model, tokenizer, answered_records, batch_size=8, reasoning_effort=reasoning_effort)
            items[source]["nll"] = {tasks.task_of(r).key(r): v for r, v in zip(answered_records, values)}
            metrics["nll"] = sum(values) / len(values) if values else None
        results[source] = metrics
        # BLEU is a corpus statistic: its interval resamples records, not sentence scores.
        explained = [j for j, ref in enumerate(per_item["reference"]) if ref is not None]
        hyps = [per_item["explanation"][j] for j in explained]
        refs = [per_item["reference"][j] for j in explained]
        results[source]["bleu_interval"] = bleu_interval(hyps, refs)
        all_hyps += hyps
        all_refs += refs
    if safety_prompts:
        results["safety"], items["safety"] = _safety(safety_prompts, safety_responses)
        if harmony:
            results["safety"]["final_missing"] = final_missing_share(safety_generations)

    overall: dict = {"bleu": bleu_interval(all_hyps, all_refs)}  # every dataset's explanations as one corpus
    question_keys = [tasks.task_of(records[i]).key(records[i]) for i in generated]
    if reward is not None:
        rm_model, rm_tokenizer = reward
        all_messages = question_messages + safety_messages
        all_responses = [question_generations[i].response for i in generated] + safety_responses
        scores = score_responses(
            rm_model, rm_tokenizer, all_messages, all_responses,
            batch_size=batch_size, reasoning_effort=reasoning_effort,
        )  # fmt: skip
        overall["rm_score"] = sum(scores) / len(scores) if scores else None
        items["overall"]["rm_score"] = dict(zip(question_keys + [tasks.TASKS["safety"].key(p) for p in safety_prompts], scores))
    # Half the KL prompts are questions, taken in turn from each dataset: the first N alone were all
    # the first dataset's (PubMedQA: the longest prompts, one dataset's KL).
    by_dataset = [[j for j, i in enumerate(generated) if records[i].source == s] for s in sorted(by_source)]
    in_turn = [j for group in itertools.zip_longest(*by_dataset) for j in group if j is not None][: kl_max_prompts // 2]
    safety_keys = [tasks.TASKS["safety"].key(p) for p in safety_prompts]
    kl_keys = ([question_keys[j] for j in in_turn] + safety_keys)[:kl_max_prompts]
    kl_prompts = ([question_messages[j] for j in in_turn] + safety_messages)[:kl_max_prompts]
    if kl and kl_prompts and reference_is_policy:
        # k1 = sum(logp - logp_ref) and k3 = sum(exp(-r) - 1 + r) are exactly 0 when both log-probs are one model's.
        overall.update(kl_k1=0.0, kl_k3=0.0, n=len(kl_prompts) * kl_num_samples)
        for metric in ("kl_k1", "kl_k3"):
            items["overall"][metric] = dict.fromkeys(kl_keys, 0.0)
    elif kl and kl_prompts and (reference is not None or hasattr(model, "disable_adapter")):
        measured = kl_to_reference(
            model, reference, tokenizer, kl_prompts, max_new_tokens=kl_max_new_tokens,
            num_samples=kl_num_samples, batch_size=batch_size, progress=progress,
            reasoning_effort=reasoning_effort,
        )  # fmt: skip
        per_prompt = measured.pop("per_prompt")
        overall.update(measured)
        for metric in ("kl_k1", "kl_k3"):
            items["overall"][metric] = dict(zip(kl_keys, per_prompt[metric]))
    results["overall"] = overall
    results["items"] = dict(items)
    return results


def bleu_interval(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU with the percentile interval of resampled records (BLEU is not a mean of sentence scores)."""
    return bootstrap_statistic(
        len(hypotheses), lambda idx: corpus_bleu([hypotheses[i] for i in idx], [references[i] for i in idx])
    ).as_dict()


def pooled(results: dict, metric: str) -> dict:
    """One metric's per-item values over every group of `evaluate_policy`'s items (datasets pooled)."""
    return {k: v for group in results.get("items", {}).values() for k, v in group.get(metric, {}).items()}


def interval(metric: str, values: dict) -> dict:
    """The 95% interval of a metric from its per-item values: Wilson for 0/1 outcomes, bootstrap for scores."""
    flags = list(values.values())
    if flags and all(isinstance(v, bool) for v in flags):
        return proportion(flags).as_dict()
    return bootstrap_mean(flags).as_dict()


# ----------------------------------------------------------------------------------------------
# A stored measurement: rl/tune_kl.py measures every beta's adapter as eval/run.py would, so eval
# reuses the chosen one's numbers instead of measuring the same model on the same items again.

MEASUREMENT_FILE = "measurement.json"
# The code a measurement's numbers come from: any edit to it makes a stored measurement stale.
MEASURING_CODE = ("policy_eval.py", "evaluation.py", "mc_eval.py", "prompts.py", "tasks.py", "safety.py",
                  "safety_checks.yaml", "clinical_knowledge.yaml", "factuality.py", "rewards.py", "stats.py")  # fmt: skip


def _folder_digest(folder: str | Path | None) -> str | None:
    """A model folder's weights, configs, tokenizer and provenance (names and bytes), with the SFT adapter
    merged into it if its provenance names one (a reward model)."""
    if folder is None:
        return None
    folder, digest = Path(folder), hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json")):
        if path.name != MEASUREMENT_FILE:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    provenance = folder / PROVENANCE_FILE
    merged = json.loads(provenance.read_text()).get("merged_adapter") if provenance.is_file() else None
    if merged:
        digest.update(str(_folder_digest(merged)).encode())
    return digest.hexdigest()


def same_model(base: str, adapter: str | Path | None, other_base: str, other_adapter: str | Path | None) -> bool:
    """Whether two (base, adapter folder) specs are one model: the same base name and adapter bytes."""
    return base == other_base and _folder_digest(adapter) == _folder_digest(other_adapter)


def measurement_key(
    *,
    base: str,
    adapter: str | Path,
    records: list[Record],
    safety_prompts: list[SafetyPrompt],
    reward_model: str | Path | None,
    reference: tuple[str, str | Path | None] | None,
    settings: dict,
) -> str:
    """Everything `evaluate_policy`'s numbers depend on, hashed: the model (base name, adapter folder),
    the items, the reward model, the KL reference (base, adapter) or None, the settings (MeasureArgs,
    batch size, reasoning effort, dtype), the measuring code and the library versions."""
    code = Path(__file__).parent
    content = {
        "model": [base, _folder_digest(adapter)],
        "reference": None if reference is None else [reference[0], _folder_digest(reference[1])],
        "reward_model": _folder_digest(reward_model),
        "records": [dataclasses.asdict(r) for r in records],
        "safety_prompts": [dataclasses.asdict(p) for p in safety_prompts],
        "settings": settings,
        "code": {name: hashlib.sha256((code / name).read_bytes()).hexdigest() for name in MEASURING_CODE},
        "versions": {lib: metadata.version(lib) for lib in ("torch", "transformers", "peft")},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def measurement_settings(measure_kwargs: dict, *, batch_size: int, reasoning_effort: str, dtype: str, kl: bool) -> dict:
    """The settings part of `measurement_key`, built the same way by every caller."""
    return {**measure_kwargs, "batch_size": batch_size, "reasoning_effort": reasoning_effort, "dtype": dtype, "kl": kl}


def store_measurement(folder: str | Path, key: str, results: dict) -> None:
    write_json(Path(folder) / MEASUREMENT_FILE, {"key": key, "results": results})


def stored_measurement(folder: str | Path, key: str) -> dict | None:
    """The results stored in `folder` under exactly this key; None when there are none, or they are another's."""
    path = Path(folder) / MEASUREMENT_FILE
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return stored.get("results") if isinstance(stored, dict) and stored.get("key") == key else None
