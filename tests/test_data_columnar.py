"""The columnar path (clinalign/data/columnar.py) writes what the per-record path writes, byte for byte.

The reference is `load_records` + `write_records`. Every test here converts a file both ways and
compares the JSONL bytes and the report, and checks which way the file went: rows the columnar path
must take (clean and dirty text, every whitespace Python strips, quotes, backslashes, control
characters, "nan", duplicates that only str.lower() finds) and files it must leave whole to the
per-record path (a malformed line, a key missing from one line, a value of another type).
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from json.encoder import encode_basestring

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import REAL_DATA, REPO, requires_real_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinalign.config import ClinalignError
from clinalign.data import SAMPLE_SIZE, columnar, convert_file, load_records, sample_path, write_records

WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())  # none above U+3000
KEY_ORDER_HUB = tuple("id question opa opb opc opd cop choice_type exp subject_name topic_name".split())


def both_ways(path, tmp_path, **options) -> tuple[columnar.Converted | None, bytes]:
    """Convert `path` with the columnar path and the per-record path; assert the same bytes and report."""
    reference = load_records(path, keep_unlabeled=options.get("keep_unlabeled", False), split=options.get("split"))
    write_records(reference.records, tmp_path / "reference.jsonl")
    converted = columnar.convert_jsonl(
        path, tmp_path / "columnar.jsonl", "auto", options.get("keep_unlabeled", False), options.get("split")
    )
    report = convert_file(path, tmp_path / "convert_file.jsonl", **options)
    expected = (tmp_path / "reference.jsonl").read_bytes()
    assert report == reference.report
    assert (tmp_path / "convert_file.jsonl").read_bytes() == expected
    if converted is not None:
        assert converted.report == reference.report
        assert (tmp_path / "columnar.jsonl").read_bytes() == expected
    return converted, expected


def write_rows(tmp_path, rows, name="rows.jsonl", dumps=json.dumps) -> object:
    path = tmp_path / name
    path.write_text("".join(dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ---- text the columnar path writes as it is ------------------------------------------------------


def test_plain_text_breakers_find_every_character_clean_or_json_would_change():
    """A value PLAIN_TEXT_BREAKERS does not match is already what clean() returns and json writes verbatim."""
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    changed = [c for c in chars if c != " " and (c.isspace() or encode_basestring(c) != f'"{c}"')]
    assert set(WHITESPACE) - {" "} <= set(changed) and '"' in changed and "\x1f" in changed and "\u3000" in changed
    found = pc.match_substring_regex(pa.array([f"a{c}b" for c in changed]), columnar.PLAIN_TEXT_BREAKERS)
    assert all(found.to_pylist())
    kept = pc.match_substring_regex(pa.array(["a b", "é ü", "µg", "nan", "x"]), columnar.PLAIN_TEXT_BREAKERS)
    assert not any(kept.to_pylist())
    edges = pc.match_substring_regex(pa.array([" a", "a ", "a  b", " "]), columnar.PLAIN_TEXT_BREAKERS)
    assert all(edges.to_pylist())


def test_lower_differs_finds_every_character_pyarrow_lowers_unlike_python():
    chars = [chr(c) for c in range(0x80, 0x110000) if not 0xD800 <= c < 0xE000]
    lowered = pc.utf8_lower(pa.array(chars)).to_pylist()
    differ = [c for c, low in zip(chars, lowered) if c.lower() != low] + ["Σ"]  # Σ: ς at a word's end
    assert "İ" in differ
    assert all(pc.match_substring_regex(pa.array(differ), columnar.LOWER_DIFFERS).to_pylist())
    assert not any(
        pc.match_substring_regex(pa.array(["é", "ü", "β", "ω", "ж", "Ё", "ı"]), columnar.LOWER_DIFFERS).to_pylist()
    )


# ---- generated files: the columnar path takes them, and agrees -----------------------------------


def dirty_text(rng: random.Random, base: str) -> str:
    """`base`, clean or dirtied the ways real copies are (and a few more)."""
    roll = rng.random()
    if roll < 0.5:
        return base
    if roll < 0.7:  # whitespace Python strips, at either end or inside
        space = rng.choice(WHITESPACE)
        return rng.choice((space + base, base + space, base.replace(" ", space + space, 1), base.replace(" ", space)))
    if roll < 0.8:  # characters json escapes
        return base.replace(" ", rng.choice(('"', "\\", "\x01", '" ', "\\n", "\x7f")), 1)
    if roll < 0.83:  # missing, in every spelling
        return rng.choice(("", " ", "nan", "NaN", " nan ", "NAN", "\u00a0", "nan."))
    return base + rng.choice((" β-blocker", " naïve", " ΣΑΣ", " İstanbul", " Kelvin", " ﬁ"))


def medmcqa_rows(n: int, seed: int, one_based: bool = True, dirty: bool = True) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        options = [f"option {i} {k}" for k in range(4)]
        if dirty and rng.random() < 0.05:  # duplicates, some only case-insensitive, some only by str.lower()
            a, b = rng.sample(range(4), 2)
            options[a] = rng.choice((options[b], options[b].upper(), "İ x", "ΣΑΣ"))
            options[b] = rng.choice((options[b], "i̇ x", "σας"))
        row = {
            "question": f"which nerve {i} supplies the muscle?",
            "exp": rng.choice(("nan", None, f"the nerve {i} does")),
            "cop": rng.randint(1, 4) if one_based else rng.randint(0, 3),
            "opa": options[0],
            "opb": options[1],
            "opc": options[2],
            "opd": options[3],
            "subject_name": rng.choice(("Anatomy", "Physiology", "nan", None, "")),
            "topic_name": rng.choice((None, None, "Nerves of the arm")),
            "id": f"{i:08x}",
            "choice_type": "single",
        }
        if dirty:
            for key in ("question", "exp", "opa", "opb", "opc", "opd", "subject_name", "topic_name", "id"):
                if isinstance(row[key], str):
                    row[key] = dirty_text(rng, row[key])
            if rng.random() < 0.05:
                row["cop"] = rng.choice((-1, 5, None, 99))
        rows.append(row)
    return rows


@pytest.mark.parametrize("keep_unlabeled", [False, True])
@pytest.mark.parametrize("split", [None, "train"])
def test_dirty_rows_agree_with_the_per_record_path(tmp_path, keep_unlabeled, split):
    path = write_rows(tmp_path, medmcqa_rows(3000, seed=1))
    converted, lines = both_ways(path, tmp_path, keep_unlabeled=keep_unlabeled, split=split)
    assert converted is not None and converted.report["read"] == 3000
    # Most rows go whole-column, the rest record by record, and both kinds are in the output.
    assert 1500 < converted.columnar_rows < converted.report["read"]
    skipped = converted.report["skipped"]
    assert {"duplicate_options", "empty_question", "answer_not_in_options"} <= set(skipped)
    assert ("no_answer" in skipped) != keep_unlabeled
    assert lines.count(b"\n") == converted.report["kept"]


def test_the_hub_layout_non_ascii_lines_and_no_ids(tmp_path):
    rows = [{key: row[key] for key in KEY_ORDER_HUB} for row in medmcqa_rows(800, seed=2, one_based=False)]
    for name, dumps in (("ascii.jsonl", json.dumps), ("utf8.jsonl", lambda r: json.dumps(r, ensure_ascii=False))):
        converted, _ = both_ways(write_rows(tmp_path, rows, name, dumps), tmp_path)
        assert converted is not None and converted.columnar_rows > 400
    no_ids = [{k: v for k, v in row.items() if k != "id"} for row in rows]
    converted, lines = both_ways(write_rows(tmp_path, no_ids, "no_ids.jsonl"), tmp_path, split="dev")
    assert converted is not None and b'"id": "medmcqa-dev-0"' in lines


def test_index_base_over_the_whole_file(tmp_path):
    hub_order = [{key: row[key] for key in KEY_ORDER_HUB} for row in medmcqa_rows(300, seed=3, dirty=False)]
    # cop 1-4 in the hub's key order: a 4 (the last of four options) says 1-based ...
    converted, lines = both_ways(write_rows(tmp_path, hub_order, "one.jsonl"), tmp_path)
    first = json.loads(lines.splitlines()[0])
    assert converted.report["kept"] == 300 and first["answer"] == "ABCD"[hub_order[0]["cop"] - 1]
    # ... unless a 0 appears anywhere, even in the last row.
    hub_order[-1]["cop"] = 0
    converted, lines = both_ways(write_rows(tmp_path, hub_order, "zero.jsonl"), tmp_path)
    assert json.loads(lines.splitlines()[0])["answer"] == "ABCD"[hub_order[0]["cop"]]
    assert converted.report["skipped"] == {"answer_not_in_options": sum(r["cop"] == 4 for r in hub_order)}


def test_the_benchmark_rows(tmp_path):
    spec = importlib.util.spec_from_file_location("convert_throughput", REPO / "benchmarks" / "convert_throughput.py")
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("convert_throughput", benchmark)
    spec.loader.exec_module(benchmark)
    benchmark.generate(tmp_path / "bench.jsonl", 3000, seed=5)
    converted, _ = both_ways(tmp_path / "bench.jsonl", tmp_path)
    assert converted.columnar_rows == converted.report["kept"] == 3000


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    texts=st.lists(
        st.text(st.sampled_from(list(WHITESPACE) + list('ab"\\\x00\x01AéΣİ\u2028 ')), max_size=6)
        | st.sampled_from(["nan", "NaN", "", "a", "A"]),
        min_size=8,
        max_size=8,
    ),
    cop=st.integers(-2, 5) | st.none(),
)
def test_any_text_in_any_field_agrees(tmp_path_factory, texts, cop):
    tmp_path = tmp_path_factory.mktemp("any")
    rows = medmcqa_rows(3, seed=4, dirty=False)
    for key, text in zip(("question", "exp", "opa", "opb", "opc", "opd", "subject_name", "id"), texts):
        rows[1][key] = text
    rows[1]["cop"] = cop
    converted, _ = both_ways(write_rows(tmp_path, rows), tmp_path, keep_unlabeled=True)
    assert converted is not None and converted.report["read"] == 3


# ---- files the columnar path leaves to the per-record path ---------------------------------------


def hand_written(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# More rows than the detection sample (parsed by Python, which would catch a bad line there).
CLEAN = [row | {"topic_name": None} for row in medmcqa_rows(SAMPLE_SIZE + 10, seed=6, dirty=False)]
LAST = json.dumps(CLEAN[-1])


@pytest.mark.parametrize(
    "text",
    [
        hand_written(CLEAN) + "{not json}\n",  # an invalid line
        hand_written(CLEAN) + LAST + " " + LAST + "\n",  # two objects on one line
        hand_written(CLEAN) + "\n" + LAST + "\n",  # a blank line
        hand_written(CLEAN).replace("\n", "\r\n"),  # CRLF
        "\ufeff" + hand_written(CLEAN),  # a byte-order mark
        hand_written(CLEAN) + json.dumps({k: v for k, v in CLEAN[0].items() if k != "topic_name"}) + "\n",  # a key absent
        hand_written(CLEAN) + json.dumps(CLEAN[0] | {"year": 2011}) + "\n",  # an extra key
        hand_written(CLEAN) + LAST[:-1] + ', "id": "again"}\n',  # a key twice
        hand_written(CLEAN) + json.dumps(CLEAN[0] | {"cop": "2"}) + "\n",  # the answer as a string
        hand_written(CLEAN) + json.dumps(CLEAN[0] | {"opa": 7}) + "\n",  # an option as a number
        hand_written(CLEAN) + json.dumps(CLEAN[0] | {"choice_type": ["single"]}) + "\n",  # a nested value
        hand_written([r | {"score": 1.5} for r in CLEAN]) + LAST[:-1] + ', "score": Inf}\n',  # not JSON to Python
        hand_written(CLEAN).replace('"topic_name"', '"topic_name" '),  # a key with nulls spelt unlike json.dumps
        hand_written([{k: v for k, v in r.items() if k != "opd"} for r in CLEAN]),  # three options
        hand_written([r | {"cop": 1, "answer": "B"} for r in CLEAN]),  # two answer fields
    ],
    ids=[
        "invalid_line", "two_objects", "blank_line", "crlf", "bom", "absent_key", "extra_key", "duplicate_key",
        "string_answer", "number_option", "nested_value", "inf", "spaced_key", "three_options", "two_answers",
    ],
)  # fmt: skip
def test_files_the_columnar_path_leaves_whole(tmp_path, text):
    path = tmp_path / "rows.jsonl"
    path.write_text(text, encoding="utf-8")
    converted, _ = both_ways(path, tmp_path)
    assert converted is None and not (tmp_path / "columnar.jsonl").exists()


def test_a_file_that_is_not_utf8_is_the_same_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(hand_written(CLEAN).encode() + b'{"question": "\xff"}\n')
    assert columnar.convert_jsonl(path, tmp_path / "out.jsonl", "auto", False, None) is None
    with pytest.raises(ClinalignError, match="not UTF-8"):
        convert_file(path, tmp_path / "out.jsonl")


def test_other_formats_and_inputs_take_the_per_record_path(tmp_path):
    path = write_rows(tmp_path, CLEAN)
    for format in ("instruction", "chat"):
        report = convert_file(path, tmp_path / f"{format}.jsonl", format=format)
        write_records(load_records(path).records, tmp_path / "reference.jsonl", format)
        assert report["kept"] == len(CLEAN)
        assert (tmp_path / f"{format}.jsonl").read_bytes() == (tmp_path / "reference.jsonl").read_bytes()
    with pytest.raises(ClinalignError, match="unknown format"):
        convert_file(path, tmp_path / "x.jsonl", format="xml")


@pytest.mark.parametrize("dataset", ["medmcqa", "medqa", "pubmedqa"])
def test_shipped_samples_agree(tmp_path, dataset):
    both_ways(sample_path(dataset), tmp_path, keep_unlabeled=True)


@requires_real_data
def test_every_real_file_agrees(tmp_path):
    took_columnar = []
    for path in sorted(REAL_DATA.iterdir()):
        if path.suffix in (".json", ".jsonl", ".csv", ".parquet"):
            converted, _ = both_ways(path, tmp_path)
            if converted is not None:
                took_columnar.append(path.name)
    assert "medmcqa__hf_validation_min__first500.jsonl" in took_columnar
