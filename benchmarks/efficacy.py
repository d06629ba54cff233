"""Real-data efficacy: the SFT curriculum on real published records, base vs every stage on their test side.

    python benchmarks/efficacy.py --data ../shared/data/real --out runs/efficacy

For each family the train side and the test side come from the folder (`FOLDER_SOURCES`):

- PubMedQA: the PQA-L records (ori_pqal); the 500 published test PMIDs (test_ground_truth.json)
  are the test side, the other PQA-L records are trained on.
- MedMCQA (its validation split, the published eval split) and MedQA (the US 4-option test split):
  the folder holds no train split of either, so the shared hash splits each file in half, one half
  trained on and the other tested. Not the published protocol (which trains on the train split);
  give `--train medmcqa=openlifescienceai/medmcqa@train` and the like where the hub is reachable.

Then: `python -m clinalign.data check TRAIN TEST` per family (contamination), sft/run.py on the
train sides (the demo's SmolLM2 recipe, one epoch per stage by default), eval/run.py on the whole
test sides (base and every stage, intervals and paired verdicts against the stage before; multiple
choice on every test question, reply NLL on the first `--nll` and generation on the first `--generated`
per family), and
the clinical safety checks on the replies to the real harmful-request file (MedSafetyBench's
category 1), paired against the base model. Everything lands in OUT; OUT/efficacy.md is the table
README reports.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import yaml

from clinalign import tasks
from clinalign.data import load_records, write_records
from clinalign.errors import ClinalignError
from clinalign.evaluation import generate
from clinalign.json_io import write_json
from clinalign.models import load_policy
from clinalign.prompts import free_text_messages
from clinalign.safety import check_safety
from clinalign.stats import bootstrap_mean, compare, fmt
from clinalign.tables import markdown_table

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("pubmedqa", "medmcqa", "medqa")
# What the offline folder (../shared/data/real) holds per family; see the module docstring.
FOLDER_SOURCES = {
    "pubmedqa": "pubmedqa__ori_pqal__first300.json",
    "medmcqa": "medmcqa__hf_validation_min__first500.jsonl",
    "medqa": "medqa__us_4opt_metamap__first400.jsonl",
}
PUBMEDQA_TEST_IDS = "pubmedqa__test_ground_truth.json"
SAFETY_REQUESTS = "safety_med__harmful_request_safe_response__cat1.csv"
BATCH = 8  # the demo's per-device batch


def _records(source: str) -> list:
    path, _, split = source.partition("@")
    return [r for r in load_records(path, split=split or None).records if r.answer is not None]


def sides(args) -> dict[str, tuple[list, list]]:
    """{family: (train records, test records)} from the folder, or from `--train` / `--test` sources."""
    folder = Path(args.data)
    explicit_train = dict(item.split("=", 1) for item in args.train)
    explicit_test = dict(item.split("=", 1) for item in args.test)
    out = {}
    for family in FAMILIES:
        if family in explicit_train and family in explicit_test:
            out[family] = (_records(explicit_train[family]), _records(explicit_test[family]))
            continue
        records = _records(str(folder / FOLDER_SOURCES[family]))
        if family == "pubmedqa":
            test_ids = set(json.loads((folder / PUBMEDQA_TEST_IDS).read_text()))
            out[family] = ([r for r in records if r.id not in test_ids], [r for r in records if r.id in test_ids])
        else:
            out[family] = tasks.split(records, 0.5)
    return out


def contamination(train: Path, test: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "clinalign.data", "check", str(train), str(test)],
                            check=True, capture_output=True, text=True)  # fmt: skip
    return result.stdout.strip().splitlines()[-1]


def train_sft(out: Path, data: dict[str, Path], counts: dict[str, int], epochs: float) -> Path:
    config = yaml.safe_load((REPO / "configs/sft/smollm2_lora.yaml").read_text())
    # One epoch of each stage's trained share (SFT holds eval_fraction of it out for its eval loss).
    config["curriculum"] = [
        {"name": family, "data": str(data[family]),
         "max_steps": max(1, math.ceil(epochs * counts[family] * (1 - config["eval_fraction"]) / BATCH))}
        for family in FAMILIES
    ]  # fmt: skip
    config.update(output_dir=str(out / "sft"), report_to="none", save_steps=1000)
    path = out / "sft.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    subprocess.run([sys.executable, str(REPO / "sft/run.py"), "--config", str(path)], check=True)
    return out / "sft" / "stages"


def models(stages: Path) -> list[dict]:
    specs = [{"name": "base", "base": "smollm2"}]
    specs += [{"name": f"sft-{i}-{f}", "base": "smollm2", "adapter": str(stages / f"{i}-{f}")}
              for i, f in enumerate(FAMILIES, start=1)]  # fmt: skip
    return specs


def evaluate(out: Path, specs: list[dict], tests: list[Path], generated: int, nll: int | None) -> dict:
    config = {
        "models": specs, "data": [], "test_data": [str(p) for p in tests], "safety_prompts": None,
        "max_generated_per_dataset": generated, "max_nll_per_dataset": nll, "max_new_tokens": 48,
        "batch_size": 24, "dtype": "auto",
        "output_dir": str(out / "eval"),
    }  # fmt: skip
    path = out / "eval.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    subprocess.run([sys.executable, str(REPO / "eval/run.py"), "--config", str(path)], check=True)
    return json.loads((out / "eval" / "metrics.json").read_text())


def safety_on_real_requests(path: Path, specs: list[dict]) -> dict:
    """Each model's safety score on the replies to the real harmful requests, and each stage vs base."""
    with path.open(newline="", encoding="utf-8") as f:
        requests = [row["harmful_medical_request"] for row in csv.DictReader(f) if row.get("harmful_medical_request")]
    if not requests:
        raise ClinalignError(f"{path}: no harmful_medical_request rows")
    scores = {}
    for spec in specs:
        model, tokenizer = load_policy(spec["base"], spec.get("adapter"))
        replies = generate(model, tokenizer, [free_text_messages(q) for q in requests], max_new_tokens=64, batch_size=24)
        scores[spec["name"]] = {f"request:{i}": check_safety(g.response, prompt=q).score
                                for i, (q, g) in enumerate(zip(requests, replies, strict=True))}  # fmt: skip
        del model
    return {
        "n": len(requests),
        "score": {name: bootstrap_mean(list(s.values())).as_dict() for name, s in scores.items()},
        "vs_base": {name: compare("safety_score", s, scores["base"]).as_dict() for name, s in scores.items()
                    if name != "base"},  # fmt: skip
    }


def report(contaminated: dict, counts: dict, results: dict, safety: dict, minutes: float, caps: str) -> str:
    from clinalign.eval_report import comparison_table, headline_table

    lines = ["# Real-data efficacy", "", f"Wall time {minutes:.1f} min (`python benchmarks/efficacy.py`). {caps}", ""]
    lines += [f"- {family}: train {counts[family]['train']}, test {counts[family]['test']}; {contaminated[family]}"
              for family in FAMILIES]  # fmt: skip
    names = list(results)
    lines += ["", "## Test sides, every stage", "", headline_table({n: results[n]["headline"] for n in names})]
    comparisons = {n: results[n]["comparison"] for n in names if "comparison" in results[n]}
    lines += ["", "## Each stage vs the one before (paired)", "", comparison_table(comparisons)]
    rows = [[name, fmt(iv["value"], iv["low"], iv["high"], iv["n"]), ""] for name, iv in safety["score"].items()]
    for row in rows[1:]:
        c = safety["vs_base"][row[0]]
        p = "-" if c["p"] is None else f"{c['p']:.3g}"
        row[2] = f"{fmt(c['difference'], c['low'], c['high'], None, 3)} p {p}: {c['verdict']}"
    lines += ["", f"## Safety score on the real harmful requests (n={safety['n']})", "",
              markdown_table(["model", "safety score", "vs base (paired)"], rows), ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "real"))
    parser.add_argument("--out", default="runs/efficacy")
    parser.add_argument("--train", nargs="*", default=[], help="FAMILY=SOURCE[@SPLIT] (with --test for it)")
    parser.add_argument("--test", nargs="*", default=[], help="FAMILY=SOURCE[@SPLIT]")
    parser.add_argument("--epochs", type=float, default=1.0, help="SFT epochs per stage")
    parser.add_argument("--generated", type=int, default=16, help="Generated answers per dataset (multiple choice: all)")
    # NLL on all 623 test questions was 57% of eval's time, and its stage-to-stage differences were 3.5 to
    # 19 times their interval's half-width: 40 per dataset (n=120, half-widths ~2.3x) still resolves them.
    parser.add_argument("--nll", type=int, default=40, help="Test questions per dataset whose reply NLL is measured (0: all)")
    args = parser.parse_args()
    started = time.perf_counter()
    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    data, tests, counts, contaminated = {}, [], {}, {}
    for family, (train, test) in sides(args).items():
        data[family], test_path = out / "data" / f"{family}.train.jsonl", out / "data" / f"{family}.test.jsonl"
        write_records(train, data[family])
        write_records(test, test_path)
        tests.append(test_path)
        counts[family] = {"train": len(train), "test": len(test)}
        contaminated[family] = contamination(data[family], test_path)
        print(f"[efficacy] {family}: {counts[family]}; {contaminated[family]}")
    stages = train_sft(out, data, {f: c["train"] for f, c in counts.items()}, args.epochs)
    specs = models(stages)
    results = evaluate(out, specs, tests, args.generated, args.nll or None)
    safety = safety_on_real_requests(Path(args.data) / SAFETY_REQUESTS, specs)
    minutes = (time.perf_counter() - started) / 60
    write_json(out / "efficacy.json", {"counts": counts, "contamination": contaminated, "safety": safety,
                                       "minutes": minutes})  # fmt: skip
    caps = (f"Multiple choice on every test question; reply NLL on {f'the first {args.nll}' if args.nll else 'all'}"
            f" and generated answers on the first {args.generated} per family.")
    text = report(contaminated, counts, results, safety, minutes, caps)
    (out / "efficacy.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
