"""Greedy generation throughput by batch width: what eval/run.py and rl/tune_kl.py spend most of a measurement on.

    python benchmarks/generation_batch.py [--model smollm2] [--adapter DIR] [--widths 24 52] [--max_new_tokens 48]

The inputs are eval's per-model generation on the shipped sample data: the first 8 held-out
questions per dataset (the demo's `max_generated_per_dataset`) and every held-out safety prompt,
prompted as eval prompts them. Each width runs `clinalign.evaluation.generate` (length-sorted,
left-padded batches) once to warm up, then --repeat timed runs, side by side in one process; the
best counts. Prints answers/s per width, the ratio to the first width, and how many answers are
identical to the first width's (greedy decoding; a different padding can flip a bf16 near-tie).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from clinalign import tasks
from clinalign.data import load_records
from clinalign.evaluation import generate
from clinalign.models import load_policy
from clinalign.prompts import free_text_messages, prompt_messages
from clinalign.tasks import load_safety_prompts

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "clinalign" / "sample_data"
SAMPLES = ["pubmedqa_ori_pqal.json", "medmcqa_train.jsonl", "medqa_us_test.jsonl"]


def generated_prompts(per_dataset: int) -> list[list[dict]]:
    """The conversations eval generates answers to: the first N held-out questions per dataset, then safety."""
    questions = []
    for name in SAMPLES:
        held_out = [r for r in tasks.split(load_records(SAMPLE_DATA / name).records, 0.2)[1] if r.answer is not None]
        questions += [prompt_messages(r) for r in held_out[:per_dataset]]
    safety = tasks.split(load_safety_prompts(SAMPLE_DATA / "safety_prompts.jsonl"), 0.2)[1]
    return questions + [free_text_messages(p.prompt) for p in safety]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--adapter", default=None, help="An adapter folder, e.g. runs/demo/sft/stages/3-medqa")
    parser.add_argument("--widths", type=int, nargs="+", default=[24, 52], help="The first is the baseline")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--per_dataset", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()

    messages = generated_prompts(args.per_dataset)
    model, tokenizer = load_policy(args.model, args.adapter)
    print(f"[generation_batch] {len(messages)} answers of up to {args.max_new_tokens} tokens, {next(model.parameters()).dtype}")
    results = {}
    for width in args.widths:
        def run(width=width):
            return [g.response for g in generate(model, tokenizer, messages, max_new_tokens=args.max_new_tokens,
                                                 batch_size=width, progress=False)]  # fmt: skip

        run()  # warm-up
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            answers = run()
            times.append(time.perf_counter() - start)
        results[width] = (min(times), answers)
    base_s, base = results[args.widths[0]]
    for width, (seconds, answers) in results.items():
        same = sum(a == b for a, b in zip(answers, base, strict=True))
        print(f"width {width:3d}: {len(messages) / seconds:5.2f} answers/s ({seconds:.1f} s), "
              f"{base_s / seconds:.2f}x width {args.widths[0]}; {same}/{len(base)} answers identical")  # fmt: skip


if __name__ == "__main__":
    main()
