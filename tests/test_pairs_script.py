"""reward/pairs.py end to end, as a user runs it: shipped data in, TRL preference pairs and a report out."""

from __future__ import annotations

import json
import runpy

import yaml
from conftest import REPO

from clinalign.records import is_held_out
from clinalign.tasks import load_safety_prompts

CONFIG = "configs/reward/tiny_pairs.yaml"  # the shipped sample files, read directly


def _read(output_dir):
    rows = [json.loads(line) for line in (output_dir / "pairs.jsonl").read_text().splitlines()]
    return rows, json.loads((output_dir / "metrics.json").read_text())


def test_pairs_on_the_shipped_data(run_script, tmp_path):
    out = tmp_path / "pairs"
    result = run_script("reward/pairs.py", "--config", CONFIG, "--output_dir", out)
    assert result.returncode == 0, result.stderr[-2000:]
    rows, report = _read(out)
    summary, held_summary = result.stdout.strip().splitlines()[-2:]
    assert summary.startswith(f"pairs: read {report['read']}, kept {report['kept']}")
    assert held_summary.startswith(f"pairs: held out {report['heldout']['kept']} (")

    assert report["read"] == report["kept"] + sum(report["skipped"].values())
    assert len(rows) == report["kept"] == sum(report["by_axis"].values())
    for name, counts in report["sources"].items():
        assert counts["read"] == counts["kept"] + sum(counts["skipped"].values()), name
    for source, conversion in report["conversions"].items():  # each record file's converter report
        assert conversion["read"] == conversion["kept"] + sum(conversion["skipped"].values()), source

    assert all(row["margin"] > 0 for row in rows)  # drop mode: nothing with a non-positive margin is kept
    factuality = [r for r in rows if r["axis"] == "factuality"]
    assert len(factuality) >= 100  # one per labeled sample question
    assert all((r["factuality_chosen"], r["factuality_rejected"]) == (1.0, 0.0) for r in factuality)
    # Every prompt of the safety set gives a kept pair, except those eval holds out (never trained on).
    held_out = {p.id for p in load_safety_prompts() if is_held_out(f"safety:{p.id}", 0.2)}
    team_ids = {p.id for p in load_safety_prompts()}
    assert held_out and team_ids - held_out <= {r["id"] for r in rows}
    assert not held_out & {r["id"] for r in rows}
    assert report["skipped"]["held_out"] >= len(held_out)
    # ...their pairs go to heldout.jsonl instead, scored and selected like the training pairs
    heldout = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    held_report = report["heldout"]
    assert held_report["read"] == report["skipped"]["held_out"] == held_report["kept"] + sum(held_report["skipped"].values())
    assert len(heldout) == held_report["kept"] and {r["axis"] for r in heldout} == {"factuality", "safety"}
    assert held_out <= {r["id"] for r in heldout}
    assert not {r["group"] for r in heldout} & {r["group"] for r in rows}  # no question on both sides
    assert all(r["margin"] > 0 for r in heldout)
    for row in rows:
        assert row["prompt"][-1]["role"] == "user"
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"

    # the resolved config parses again with the script's own parser and gives the same arguments
    namespace = runpy.run_path(str(REPO / "reward" / "pairs.py"))
    (reparsed,) = namespace["make_parser"]().parse(["--config", str(out / "config.yaml")])
    assert yaml.safe_load((out / "config.yaml").read_text())["output_dir"] == str(out)
    assert reparsed.records == yaml.safe_load((REPO / CONFIG).read_text())["records"]


def test_flip_external_pairs_and_one_line_errors(run_script, tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    helpful = "Red meat, lentils, beans, spinach, tofu and fortified cereals are rich in iron; vitamin C with meals helps absorption."
    refusal = "I'm sorry, but I can't provide medical information. Please consult a healthcare professional."
    prefs.write_text(
        json.dumps({"prompt": "What foods are high in iron?", "chosen": refusal, "rejected": helpful})
        + "\n"
        + json.dumps({"question": "Which foods have iron?", "response_chosen": helpful, "response_rejected": refusal})
        + "\n"
        + "not json\n"
    )
    out = tmp_path / "flip"
    result = run_script(
        "reward/pairs.py", "--preference_files", prefs, "--nonpositive_margin", "flip", "--output_dir", out
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows, report = _read(out)
    assert (report["read"], report["kept"], report["flipped"], report["skipped"]) == (3, 2, 1, {"invalid_json": 1})
    flipped = next(r for r in rows if r["flipped"])
    assert flipped["chosen"][0]["content"] == helpful and flipped["failed_rejected"] == ["over_refusal"]

    bad_key = run_script("reward/pairs.py", "--config", CONFIG, "--safety_wieght", "2", "--output_dir", tmp_path / "x")
    assert bad_key.returncode == 2 and "safety_wieght" in bad_key.stderr and "Traceback" not in bad_key.stderr
    nothing = run_script("reward/pairs.py", "--output_dir", tmp_path / "y")
    assert (
        nothing.returncode == 2
        and nothing.stderr.strip() == "error: nothing to pair: set records and/or preference_files"
    )
