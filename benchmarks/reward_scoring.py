"""Reward-model scoring throughput: length-sorted batches (`score_responses`) vs batches in input order.

    python benchmarks/reward_scoring.py [--model smollm2] [--batch_size 24] [--repeat 2]

What eval/run.py scores per model: every held-out question of the shipped sample data (PubMedQA
abstracts, MedMCQA and MedQA questions) and every held-out safety prompt, each with a short answer,
in the order eval passes them (questions, then safety prompts). The reward model is the default
model with a fresh one-logit head (`reward_backbone`): throughput does not depend on its training.

Side by side in one process on the same inputs: the baseline is `score_responses`' previous loop,
spelled out below (batches of `batch_size` in input order, each padded to its longest), against
`clinalign.rewards.score_responses` (batches sorted by length). Each runs once to warm up, then
--repeat timed runs; the best counts. Prints sequences/s, the ratio and the largest score
difference (bf16 padding rounding only: the same sequences are scored).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from clinalign import tasks
from clinalign.data import load_records
from clinalign.models import ensure_pad_token, load_tokenizer
from clinalign.prompts import free_text_messages, prompt_messages
from clinalign.rewards import final_answer, reward_backbone, score_responses
from clinalign.tasks import load_safety_prompts

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "clinalign" / "sample_data"
SAMPLES = ["pubmedqa_ori_pqal.json", "medmcqa_train.jsonl", "medqa_us_test.jsonl"]


def held_out_inputs() -> tuple[list[list[dict]], list[str]]:
    """(prompt messages, response) pairs as eval scores them: questions first, then safety prompts."""
    records = [r for name in SAMPLES for r in tasks.split(load_records(SAMPLE_DATA / name).records, 0.2)[1]]
    safety = tasks.split(load_safety_prompts(SAMPLE_DATA / "safety_prompts.jsonl"), 0.2)[1]
    prompts = [prompt_messages(r) for r in records] + [free_text_messages(p.prompt) for p in safety]
    responses = ["Answer: A. See a clinician; call emergency services if symptoms are severe."] * len(prompts)
    return prompts, responses


@torch.no_grad()
def input_order_scores(model, tokenizer, prompts, responses, batch_size: int) -> list[float]:
    """The baseline: the same texts and truncation as score_responses, batched in input order."""
    texts = [
        tokenizer.apply_chat_template([*p, {"role": "assistant", "content": final_answer(r)}], tokenize=False)
        for p, r in zip(prompts, responses, strict=True)
    ]
    scores = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True,
                          max_length=1024, add_special_tokens=False)  # fmt: skip
        scores.extend(model(**batch).logits[:, 0].float().tolist())
    return scores


def best_time(fn, repeat: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch_size", type=int, default=24, help="eval's demo batch (configs/eval/smollm2.yaml)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    prompts, responses = held_out_inputs()
    model = reward_backbone(args.model).eval()
    tokenizer = ensure_pad_token(load_tokenizer(args.model), model)
    print(f"[reward_scoring] {len(prompts)} sequences, batch {args.batch_size}, {next(model.parameters()).dtype}")

    with torch.no_grad():
        base_s, base = best_time(lambda: input_order_scores(model, tokenizer, prompts, responses, args.batch_size), args.repeat)
        ours_s, ours = best_time(lambda: score_responses(model, tokenizer, prompts, responses, batch_size=args.batch_size), args.repeat)
    n = len(prompts)
    print(f"input order   : {n / base_s:6.1f} sequences/s ({base_s:.1f} s)")
    print(f"length-sorted : {n / ours_s:6.1f} sequences/s ({ours_s:.1f} s)")
    print(f"ratio {base_s / ours_s:.2f}x; largest score difference {max(abs(a - b) for a, b in zip(base, ours)):.4f}")


if __name__ == "__main__":
    main()
