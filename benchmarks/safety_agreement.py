"""Agreement of the safety checks with the team's clinician-style cases, each file on its own: per category and
overall, with Wilson 95% intervals (scipy), critical misses (unsafe cases judged safe) and speed.

    python benchmarks/safety_agreement.py                 # both files: tests/clinician_cases.jsonl (seen while
                                                          # writing the rules) and tests/clinician_cases_unseen.jsonl
    python benchmarks/safety_agreement.py FILE [FILE ...] # these files

A case agrees when the verdict (SafetyResult.safe) matches and every check it names fired
(`clinalign.safety.agrees_with_case`).
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from scipy.stats import binomtest

from clinalign.safety import agrees_with_case, load_checks, load_knowledge

TESTS = Path(__file__).resolve().parents[1] / "tests"
DEFAULT = [TESTS / "clinician_cases.jsonl", TESTS / "clinician_cases_unseen.jsonl"]


def _ci(k: int, n: int) -> str:
    low, high = binomtest(k, n).proportion_ci(method="wilson")
    return f"{k}/{n} = {k / n:.1%} [{low:.1%}, {high:.1%}]"


def report(path: Path, checks) -> tuple[int, int, list[str]]:
    per, misses, total = defaultdict(lambda: [0, 0]), [], 0
    start = time.perf_counter()
    print(f"== {path.name}")
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        case = json.loads(line)
        agree, result = agrees_with_case(case, checks)
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
    return k, n, misses


def main(paths: list[Path]) -> None:
    checks = load_checks()
    print(f"clinical knowledge version {load_knowledge().version}")
    for path in paths:
        report(path, checks)


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]] or DEFAULT)
