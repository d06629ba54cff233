"""eval/run.py's report: each model's headline metrics with 95% intervals, paired comparisons with a
baseline, and the multiple-choice letter distributions, from `clinalign.policy_eval.evaluate_policy`'s
per-item values.

Headline metrics pool every held-out dataset (one interval over all records, not a mean of per-dataset
means): Wilson for 0/1 outcomes (accuracy, exact match, no answer, over-refusal), BCa bootstrap for
per-item scores (completion NLL, ROUGE-L, safety score, reward-model score, KL), a resampled-records interval for
corpus BLEU. A comparison pairs the two models on the items both were measured on: McNemar's exact
test for 0/1 outcomes, a paired permutation test for scores (sentence BLEU for BLEU), and a verdict:
better / worse when the difference's interval excludes 0 and p < 0.05, else no detectable change.
"""

from __future__ import annotations

from clinalign.policy_eval import interval, pooled
from clinalign.stats import compare, fmt
from clinalign.tables import markdown_table

HEADLINE = ["mc_acc", "mc_acc_norm", "nll", "gen_acc", "exact_match", "no_answer", "rougeL", "bleu", "safety_score",
            "over_refusal_rate", "rm_score", "kl_k1", "kl_k3"]  # fmt: skip


def headline(results: dict) -> dict[str, dict]:
    """{metric: interval dict} for one model, datasets pooled."""
    row = {}
    for metric in HEADLINE:
        if metric == "bleu":
            row[metric] = results.get("overall", {}).get("bleu") or {"value": None, "low": None, "high": None, "n": 0}
        else:
            row[metric] = interval(metric, pooled(results, metric))
    return row


def comparison(results: dict, baseline: dict) -> dict[str, dict]:
    """{metric: Comparison dict} of a model against its baseline on the items both were measured on."""
    out = {}
    for metric in HEADLINE:
        model_items, base_items = pooled(results, metric), pooled(baseline, metric)
        if set(model_items) & set(base_items):
            out[metric] = compare(metric, model_items, base_items).as_dict()
    return out


def _cell(iv: dict, digits: int = 2) -> str:
    return fmt(iv.get("value"), iv.get("low"), iv.get("high"), iv.get("n") or None, digits)


def headline_table(rows: dict[str, dict[str, dict]]) -> str:
    return markdown_table(["model", *HEADLINE], [[name, *(_cell(row[k]) for k in HEADLINE)] for name, row in rows.items()])


def comparison_table(comparisons: dict[str, dict]) -> str:
    rows = [
        [name, entry["baseline"], metric, fmt(c["difference"], c["low"], c["high"], None, 3), c["n"],
         "-" if c["p"] is None else f"{c['p']:.3g}", c["test"], c["verdict"]]
        for name, entry in comparisons.items()
        for metric, c in entry["metrics"].items()
    ]  # fmt: skip
    return markdown_table(["model", "baseline", "metric", "difference [95% CI]", "n", "p", "test", "verdict"], rows)


def letters_table(results: dict[str, dict]) -> str:
    """Per model and dataset: predicted vs gold label counts, and the modal prediction's share."""
    rows = []
    for name, per_model in results.items():
        for dataset, metrics in per_model.items():
            letters = metrics.get("letters") if isinstance(metrics, dict) else None
            if not letters or not letters["n"]:
                continue
            predicted = " ".join(f"{k}:{v}" for k, v in letters["predicted"].items())
            gold = " ".join(f"{k}:{v}" for k, v in letters["gold"].items())
            share = f"{letters['modal']} {letters['modal_share']:.2f} ({letters['gold_modal_share']:.2f})"
            rows.append([name, dataset, predicted, gold, share, letters["n"]])
    return markdown_table(["model", "dataset", "predicted", "gold", "modal share (gold's)", "n"], rows)
