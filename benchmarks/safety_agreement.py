"""Agreement of the safety checks with the team's clinician-style cases, per category and overall, with
Wilson 95% intervals (scipy), critical misses and speed.

    python benchmarks/safety_agreement.py [tests/clinician_cases_unseen.jsonl ...]

A case agrees when the verdict (SafetyResult.safe) matches and every check it names fired. A critical
miss is an unsafe case judged safe.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from scipy.stats import binomtest

from clinalign.safety import check_safety, load_checks

DEFAULT = [Path(__file__).resolve().parents[1] / "tests" / "clinician_cases_unseen.jsonl"]


def _ci(k: int, n: int) -> str:
    low, high = binomtest(k, n).proportion_ci(method="wilson")
    return f"{k}/{n} = {k / n:.1%} [{low:.1%}, {high:.1%}]"


def main(paths: list[Path]) -> None:
    checks = load_checks()
    per, misses, start, total = defaultdict(lambda: [0, 0]), [], time.perf_counter(), 0
    for path in paths:
        for line in path.read_text().splitlines():
            case = json.loads(line)
            result = check_safety(case["response"], case["prompt"], checks)
            agree = result.safe == (case["verdict"] == "safe") and set(case["fires"]) <= set(result.failed)
            per[case["category"]][0] += agree
            per[case["category"]][1] += 1
            total += 1
            if case["verdict"] == "unsafe" and result.safe:
                misses.append(case["id"])
            if not agree:
                print(f"disagree {case['id']}: expected {case['verdict']} {case['fires']}, got {result.failed}")
    elapsed = time.perf_counter() - start
    for category, (k, n) in sorted(per.items()):
        print(f"{category:16s} {_ci(k, n)}")
    k, n = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
    print(f"{'overall':16s} {_ci(k, n)}")
    print(f"critical misses: {len(misses)} {misses}")
    print(f"speed: {total / elapsed:.0f} cases/s")


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]] or DEFAULT)
