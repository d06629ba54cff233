"""Hub dataset ids resolve offline from a local Hugging Face cache, the way a networked user's run
takes them once the data is cached: `datasets.load_dataset(id, config, split=...)` with
HF_HUB_OFFLINE=1 finds the prepared Arrow files in HF_DATASETS_CACHE (recipe:
/work/shared/research/offline_hub_cache.md). No mock of `datasets`: the test builds the cache with
datasets' own packaged Parquet builder from the team's sample data, in each dataset's published
layout, then runs the toolkit's load paths (and reward/train.py itself) in a fresh process whose
HF_HOME is that cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "clinalign" / "sample_data"

BUILD = r'''
import json, shutil, sys
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
from datasets.data_files import DataFilesDict
from datasets.packaged_modules.parquet.parquet import Parquet
import datasets.config

from datasets.naming import camelcase_to_snakecase as snake  # PubMedQA -> pub_med_qa

work = Path(sys.argv[1])
for spec in json.loads(Path(sys.argv[2]).read_text()):
    org, name = spec["id"].split("/")
    parquet = work / f"{name}.parquet"
    pq.write_table(pa.Table.from_pylist(spec["rows"]), parquet)
    builder = Parquet(data_files=DataFilesDict.from_patterns({"train": [str(parquet)]}), dataset_name=name)
    builder.download_and_prepare()
    prepared = Path(builder.cache_dir)  # .../<name>/default-<id>/0.0.0/<hash>
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    target = cache / f"{org}___{snake(name)}" / spec["config"] / "0.0.0" / "0"
    target.mkdir(parents=True)
    for f in prepared.iterdir():
        new = f.name.replace(f"{name}-", f"{snake(name)}-") if f.suffix == ".arrow" else f.name
        shutil.copy(f, target / new)
    info = json.loads((target / "dataset_info.json").read_text())
    info["config_name"] = spec["config"]
    info["dataset_name"] = snake(name)
    (target / "dataset_info.json").write_text(json.dumps(info))
'''

CHECK = r'''
import json, sys
from clinalign.config import ClinalignError
from clinalign.data import load_records
from clinalign.preferences import read_pairs
out = {}
for spec in json.loads(open(sys.argv[1]).read()):
    if spec["kind"] == "records":
        result = load_records(spec["id"], config_name=None if spec["config"] == "default" else spec["config"],
                              split="train")
        out[spec["id"]] = [r.to_dict() for r in result.records]
    else:
        out[spec["id"]] = read_pairs(spec["id"], None, "train")
try:
    read_pairs("trl-lib/no-such-preference-set")
except ClinalignError as e:
    out["unknown"] = str(e)
print(json.dumps(out))
'''


def pubmedqa_hub_rows() -> list[dict]:
    """The sample's original PQA-L file in the hub's qiaojin/PubMedQA pqa_labeled layout."""
    original = json.loads((SAMPLE / "pubmedqa_ori_pqal.json").read_text())
    return [{"pubid": int(pubid), "question": item["QUESTION"],
             "context": {"contexts": item["CONTEXTS"], "labels": item.get("LABELS", []), "meshes": item.get("MESHES", [])},
             "long_answer": item["LONG_ANSWER"], "final_decision": item["final_decision"]}
            for pubid, item in original.items()
            if isinstance(item, dict) and "final_decision" in item]  # pqa_labeled rows all carry a decision


def jsonl(path: Path) -> list[dict]:
    """The file's JSON-object lines (the sample data holds deliberately broken ones: not publishable rows)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def implicit_prompt_pairs(pairs_file: Path) -> list[dict]:
    """reward/pairs.py pairs in trl-lib/ultrafeedback_binarized's layout: the prompt inside chosen/rejected."""
    return [{"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"],
             "score_chosen": 8.0, "score_rejected": 3.0} for row in jsonl(pairs_file)]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_pairs):
    """A local HF cache holding the sample data under the real dataset ids the configs name."""
    work = tmp_path_factory.mktemp("hub")
    specs = [
        {"id": "openlifescienceai/medmcqa", "config": "default", "kind": "records",
         "rows": jsonl(SAMPLE / "medmcqa_train.jsonl")},
        {"id": "GBaker/MedQA-USMLE-4-options", "config": "default", "kind": "records",
         "rows": jsonl(SAMPLE / "medqa_us_test.jsonl")},
        {"id": "qiaojin/PubMedQA", "config": "pqa_labeled", "kind": "records", "rows": pubmedqa_hub_rows()},
        {"id": "trl-lib/ultrafeedback_binarized", "config": "default", "kind": "pairs",
         "rows": implicit_prompt_pairs(tiny_pairs)},
    ]
    (work / "specs.json").write_text(json.dumps(specs))
    env = {**os.environ, "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    build = subprocess.run([sys.executable, "-c", BUILD, str(work), str(work / "specs.json")], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    return work, specs, env


def test_hub_ids_resolve_offline_through_the_toolkit_load_paths(hub_cache, tiny_pairs):
    work, specs, env = hub_cache
    check = subprocess.run([sys.executable, "-c", CHECK, str(work / "specs.json")], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    loaded = json.loads(check.stdout.strip().splitlines()[-1])
    from clinalign.data import load_records

    local = {"openlifescienceai/medmcqa": "medmcqa_train.jsonl", "GBaker/MedQA-USMLE-4-options": "medqa_us_test.jsonl",
             "qiaojin/PubMedQA": "pubmedqa_ori_pqal.json"}
    for hub_id, name in local.items():  # the same questions as the converter reads from the local sample file
        expected = load_records(str(SAMPLE / name)).records
        from_hub = sorted((r["question"], r["answer"]) for r in loaded[hub_id])
        assert from_hub == sorted((r.question, r.answer) for r in expected), hub_id
    assert len(loaded["trl-lib/ultrafeedback_binarized"]) == len(jsonl(tiny_pairs))
    assert {r["source"] for r in loaded["openlifescienceai/medmcqa"]} == {"medmcqa"}
    assert {r["answer"] for r in loaded["qiaojin/PubMedQA"]} <= {"yes", "no", "maybe"}
    # The implicit prompt was split off again: the same prompt and completions reward/pairs.py wrote.
    for hub_row, local in zip(loaded["trl-lib/ultrafeedback_binarized"], jsonl(tiny_pairs), strict=True):
        assert hub_row["prompt"] == local["prompt"]
        assert hub_row["chosen"] == local["chosen"] and hub_row["rejected"] == local["rejected"]
    assert "trl-lib/no-such-preference-set" in loaded["unknown"] and "\n" not in loaded["unknown"]


def test_reward_model_trains_on_a_hub_preference_dataset_offline(hub_cache, tmp_path, tiny_pairs):
    _, _, env = hub_cache
    result = subprocess.run([sys.executable, "reward/train.py", "--config", "configs/reward/tiny.yaml",
                             "--pairs", "trl-lib/ultrafeedback_binarized", "--pairs_split", "train",
                             "--output_dir", str(tmp_path), "--max_steps", "1"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["pairs"]["train"] > 0 and metrics["pairs"]["eval"] > 0
    assert metrics["pairs"]["train"] + metrics["pairs"]["eval"] == len(jsonl(tiny_pairs))
    assert "held-out pairwise accuracy overall" in result.stdout
