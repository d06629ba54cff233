"""Does the exported (merged) model answer like the adapter it came from? On the demo's DPO adapter.

    python benchmarks/export_parity.py [--adapter runs/demo/tune_kl/chosen] [--run runs/demo] [--dtype float32]

Writes the held-out questions of the demo's converted data (the split no stage trained on) to
RUN/answers/questions.jsonl, answers them greedily with base + adapter (`python -m clinalign.generate`),
merges the adapter (`python -m clinalign.export` into RUN/export/dpo), answers them again with the
merged checkpoint alone, and prints how many answers are identical (Wilson 95% interval) beside the
export's probe logit difference. float32 by default: bf16 rounding differs between W + BA and the
merged W.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from clinalign import tasks
from clinalign.data import load_records
from clinalign.records import EVAL_FRACTION
from clinalign.stats import wilson


def _run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="runs/demo/tune_kl/chosen")
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max_new_tokens", default="48")
    args = parser.parse_args()
    run = Path(args.run)
    answers = run / "answers"
    answers.mkdir(parents=True, exist_ok=True)
    records = [r for path in sorted((run / "data").glob("*.jsonl")) for r in load_records(str(path)).records]
    held_out = tasks.split([r for r in records if r.answer is not None], EVAL_FRACTION)[1]
    questions = answers / "questions.jsonl"
    questions.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in held_out))

    common = ["--input", str(questions), "--dtype", args.dtype, "--max_new_tokens", args.max_new_tokens]
    _run("clinalign.generate", "--adapter", args.adapter, "--output", str(answers / "adapter.jsonl"), *common)
    export = run / "export" / "dpo"
    _run("clinalign.export", "--adapter", args.adapter, "--output_dir", str(export), "--dtype", args.dtype)
    _run("clinalign.generate", "--model_name_or_path", str(export), "--output", str(answers / "merged.jsonl"),
         *common)  # fmt: skip

    def read(name: str) -> list[str]:
        return [json.loads(line)["response"] for line in (answers / name).read_text().split("\n") if line]

    adapter, merged = read("adapter.jsonl"), read("merged.jsonl")
    same = sum(a == b for a, b in zip(adapter, merged, strict=True))
    probe = json.loads((export / "metrics.json").read_text()).get("probe_max_abs_diff")
    print(f"identical answers: {wilson(same, len(adapter))} ({same}/{len(adapter)} held-out questions, {args.dtype}); "
          f"probe max |logit difference| {probe}")  # fmt: skip


if __name__ == "__main__":
    main()
