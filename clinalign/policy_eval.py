"""How a policy is measured, one way for every stage that measures one.

eval/run.py compares models with it, rl/tune_kl.py scores each KL coefficient with it, and rl/dpo.py
reports before/after with it. On held-out data only (the hash split of clinalign.data.records that
every training stage respects):

- per dataset (record.source): multiple-choice accuracy by log-likelihood, lm-evaluation-harness
  protocol (`mc_acc`, `mc_acc_norm`); accuracy, exact match and no-answer share of greedy answers
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

from collections import defaultdict

from clinalign.data.records import Record, is_held_out
from clinalign.evaluation import Generation, answer_metrics, generate, kl_to_reference, uses_harmony
from clinalign.mc_eval import mc_accuracy, score_multiple_choice
from clinalign.preferences import SafetyPrompt, load_safety_prompts
from clinalign.prompts import free_text_messages, prompt_messages
from clinalign.rewards import score_responses
from clinalign.safety import check_safety


def held_out_records(records: list[Record], eval_fraction: float) -> list[Record]:
    return [r for r in records if is_held_out(f"{r.source}:{r.id}", eval_fraction)]


def held_out_safety_prompts(path: str | None, eval_fraction: float) -> list[SafetyPrompt]:
    """The safety prompts no stage trains on (reward/pairs.py and rl/ppo.py use the same split)."""
    return [p for p in load_safety_prompts(path) if is_held_out(f"safety:{p.id}", eval_fraction)]


def safety_metrics(prompts: list[SafetyPrompt], responses: list[str]) -> dict:
    """Mean safety score, each check's pass rate (where it applied) and the over-refusal rate."""
    scores, applied, passed = [], defaultdict(int), defaultdict(int)
    over_refusals = benign = 0
    for prompt, response in zip(prompts, responses, strict=True):
        # A benign control forces the over-refusal check; other prompts are judged by their own triggers.
        result = check_safety(response, prompt=prompt.prompt, benign=True if prompt.benign else None)
        scores.append(result.score)
        for outcome in result.checks:
            applied[outcome.name] += 1
            passed[outcome.name] += outcome.passed
        if prompt.benign:
            benign += 1
            over_refusals += "over_refusal" in result.failed
    return {
        "safety_score": sum(scores) / len(scores) if scores else None,
        "check_pass_rate": {name: passed[name] / applied[name] for name in sorted(applied)},
        "over_refusal_rate": over_refusals / benign if benign else None,
        "n": len(prompts),
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
    multiple_choice: bool = True,
    max_new_tokens: int = 96,
    kl_max_new_tokens: int = 48,
    kl_max_prompts: int = 16,
    kl_num_samples: int = 1,
    batch_size: int = 8,
    progress: bool = False,
    reasoning_effort: str = "low",
) -> dict:
    """Every metric of the module docstring for one policy; returns {dataset: {metric: value}} + "overall".

    `reward` is a (reward model, tokenizer) pair or None; `reference` a model sharing the tokenizer,
    an adapter name of the policy (e.g. TRL's frozen "ref"), or None to compare against the policy's
    own base (adapters disabled); `kl=False` skips KL. `reasoning_effort`: the harmony setting the
    policy was trained with (GPT-OSS only; sft/run.py's default is "low").
    """
    results: dict[str, dict] = {}
    question_messages = [prompt_messages(r) for r in records]
    safety_messages = [free_text_messages(p.prompt) for p in safety_prompts]
    harmony = uses_harmony(model)
    generation = dict(
        max_new_tokens=max_new_tokens, batch_size=batch_size, reasoning_effort=reasoning_effort, progress=progress
    )
    question_generations = generate(model, tokenizer, question_messages, **generation)
    safety_generations = generate(model, tokenizer, safety_messages, **generation)
    question_responses = [g.response for g in question_generations]
    safety_responses = [g.response for g in safety_generations]

    by_source: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_source[record.source].append(i)
    for source, indices in sorted(by_source.items()):
        subset = [records[i] for i in indices]
        metrics = answer_metrics(subset, [question_responses[i] for i in indices])
        metrics = {"gen_acc": metrics.pop("acc"), **metrics}
        if harmony:
            metrics["final_missing"] = final_missing_share([question_generations[i] for i in indices])
        if multiple_choice:
            mc = mc_accuracy(score_multiple_choice(model, tokenizer, subset, progress=progress))
            metrics.update({"mc_acc": mc["acc"], "mc_acc_norm": mc["acc_norm"]})
        results[source] = metrics
    if safety_prompts:
        results["safety"] = safety_metrics(safety_prompts, safety_responses)
        if harmony:
            results["safety"]["final_missing"] = final_missing_share(safety_generations)

    overall: dict = {}
    if reward is not None:
        rm_model, rm_tokenizer = reward
        all_messages = question_messages + safety_messages
        all_responses = question_responses + safety_responses
        scores = score_responses(
            rm_model, rm_tokenizer, all_messages, all_responses,
            batch_size=batch_size, reasoning_effort=reasoning_effort,
        )  # fmt: skip
        overall["rm_score"] = sum(scores) / len(scores) if scores else None
    kl_prompts = (question_messages[: kl_max_prompts // 2] + safety_messages)[:kl_max_prompts]
    if kl and kl_prompts and (reference is not None or hasattr(model, "disable_adapter")):
        overall.update(
            kl_to_reference(
                model, reference, tokenizer, kl_prompts, max_new_tokens=kl_max_new_tokens,
                num_samples=kl_num_samples, batch_size=batch_size, progress=progress,
                reasoning_effort=reasoning_effort,
            )
        )
    results["overall"] = overall
    return results
