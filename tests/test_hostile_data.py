"""Hostile input to the converters and the JSONL reader (issue 17 items 2, 4, 6, 10): each a regression test."""

import json
from pathlib import Path

from clinalign.data import load_records
from clinalign.data.__main__ import main
from clinalign.json_io import BadLine, read_jsonl

REPO = Path(__file__).resolve().parents[1]
ROW = {"question": "Which nerve?", "opa": "ulnar", "opb": "radial", "opc": "median", "opd": "axillary", "cop": 1, "id": "q1"}


def _line(**changes):
    return json.dumps({**ROW, **changes})


def test_read_jsonl_bom_u2028_and_bad_bytes_keep_line_numbers(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"a": "x\u2028y"}\n'.encode() + b"\xff\xfe\n[1]\n{\"b\": NaN}\n{\"c\": 1}\n")
    rows = list(read_jsonl(path, "test file"))
    assert [n for n, _ in rows] == [1, 2, 3, 4, 5]
    assert rows[0][1] == {"a": "x\u2028y"} and rows[4][1] == {"c": 1}
    assert all(isinstance(v, BadLine) for _, v in rows[1:4])


def test_lone_surrogate_is_replaced_and_output_is_written(tmp_path, capsys):
    src = tmp_path / "medmcqa.jsonl"
    src.write_text(_line(question="Which \\ud800 nerve?").replace("\\\\ud800", "\\ud800") + "\n" + _line(id="q2") + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["convert", str(src), "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 2 and "\ufffd" in lines[0]["question"]


def test_nan_is_a_counted_skip_and_output_is_strict_json(tmp_path):
    src = tmp_path / "medmcqa.jsonl"
    src.write_text(_line().replace('"cop": 1', '"cop": NaN') + "\n" + _line(id="q2") + "\n")
    report = load_records(src).report
    assert report["read"] == 2 and report["kept"] == 1 and report["skipped"] == {"invalid_json": 1}


def test_duplicate_key_in_id_keyed_json_is_counted(tmp_path):
    record = {"QUESTION": "Is it?", "CONTEXTS": ["c"], "final_decision": "yes"}
    body = json.dumps(record)
    src = tmp_path / "pubmedqa.json"
    other = body.replace("Is it?", "Is it really?")
    src.write_text(f'{{"111": {body}, "222": {other}, "111": {body}}}')
    report = load_records(src).report
    assert report["read"] == 3 and report["skipped"].get("duplicate_id") == 1


def test_csv_quoted_newline_survives_and_unterminated_quote_is_an_error(tmp_path, capsys):
    src = tmp_path / "medmcqa.csv"
    src.write_text('question,opa,opb,opc,opd,cop\n"What is\nthe cause?",a,b,c,d,1\n')
    records = load_records(src).records
    assert records[0].question.startswith("What is") and "the cause" in records[0].question
    assert "isthe" not in records[0].question
    bad = tmp_path / "bad.csv"
    bad.write_text('question,opa,opb,opc,opd,cop\n"Unterminated,a,b,c,d,1\nQ2,a,b,c,d,1\n')
    assert main(["convert", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_out_is_a_folder_is_one_line_error_and_failed_run_leaves_no_file(tmp_path, capsys):
    src = tmp_path / "medmcqa.jsonl"
    src.write_text(_line() + "\n")
    assert main(["convert", str(src), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    assert main(["convert", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert not (tmp_path / "o.jsonl").exists()


def test_score_reader_skips_each_bad_line_with_its_number(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    lines = [
        b'\xef\xbb\xbf{"prompt": "q", "response": "first"}',  # a BOM must not drop the first line
        b'{"prompt": "q", "response": ["x"]}',
        b'{"prompt": [{"role": "user", "content": 3}], "response": "a"}',
        b'{"prompt": [{"content": "hi"}], "response": "a"}',
        b'{"prompt": "q", "response": [{"role": "assistant", "content": null}]}',
        b'{"prompt": "q", "response": "a", "record": "str"}',
        ('{"prompt": "q", "response": "one\u2028line"}').encode(),
        b"[" * 5000 + b"]" * 5000,
        b"\xff",
    ]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    script = Path(__file__).resolve().parents[1] / "reward" / "score.py"
    done = subprocess.run([sys.executable, str(script), "--input", str(src), "--output", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["lines"] == 2 and summary["skipped"] == 7
    assert [b["line"] for b in summary["skipped_lines"]] == [2, 3, 4, 5, 6, 8, 9]
    assert [json.loads(x)["response"] for x in out.read_text(encoding="utf-8").split("\n") if x] == ["first", "one\u2028line"]


# ---- defect 2: one record relabels a whole file ---------------------------------------------------------


def test_one_records_keys_never_relabel_its_file(tmp_path):
    """An `exp` field (MedMCQA's explanation key) on 1 of 64 MedQA records once made all of them
    `medmcqa`; now the file's name and its majority decide, and the odd record is a counted skip."""
    import collections

    rows = [json.loads(line) for line in (REPO / "clinalign/sample_data/medqa_us_test.jsonl").open()]
    rows = [{"question": r["question"], "options": r["options"], "answer_idx": r.get("answer_idx")} for r in rows]
    rows[7]["exp"] = "An explanation."
    path = tmp_path / "medqa_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = load_records(str(path))
    assert collections.Counter(r.source for r in result.records) == {"medqa": len(result.records)}
    assert result.report["skipped"]["medmcqa_record_in_medqa_file"] == 1
    assert result.report["read"] == len(result.records) + sum(result.report["skipped"].values())
    assert all(r.id.startswith("medqa") for r in result.records)
    # The same file under a name that says nothing: no clear majority of votes, so the content decides.
    anonymous = tmp_path / "questions.jsonl"
    anonymous.write_text(path.read_text())
    assert {r.source for r in load_records(str(anonymous)).records} == {"medqa"}
    # --dataset still overrides everything, the odd record included.
    forced = load_records(str(path), dataset="medqa")
    assert "medmcqa_record_in_medqa_file" not in forced.report["skipped"]


# ---- reward/score.py's reader under random lines ----------------------------------------------------------


def test_the_score_reader_scores_every_good_line_and_counts_every_bad_one(tmp_path_factory):
    """Random JSON values, broken bytes and valid lines mixed: the run never raises, every valid line
    comes out scored and unchanged in order, and every other line is a counted skip with its number."""
    import runpy

    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    entry = runpy.run_path(str(REPO / "reward" / "score.py"), run_name="score_fuzz")
    text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=30)
    json_value = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
        max_leaves=8,
    )
    hostile_object = st.dictionaries(st.sampled_from(["prompt", "response", "chosen", "rejected", "record", "x"]),
                                     json_value, max_size=4)  # fmt: skip
    valid = st.builds(lambda p, r: {"prompt": p, "response": r}, text, text)
    line = (
        valid.map(lambda v: ("good", json.dumps(v).encode()))
        | (json_value | hostile_object).map(lambda v: ("unknown", json.dumps(v).encode()))
        | st.binary(max_size=20).map(lambda b: ("unknown", b.replace(b"\n", b" ").replace(b"\r", b" ")))
    )

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.lists(line, min_size=1, max_size=15))
    @example([("unknown", b"\xef\xbb\xbf")])  # a file of only a BOM: blank, neither scored nor skipped
    def check(lines):
        folder = tmp_path_factory.mktemp("score")
        source = folder / "in.jsonl"
        source.write_bytes(b"\n".join(raw for _, raw in lines) + b"\n")
        summary = entry["main"](*entry["make_parser"]().parse(
            ["--input", str(source), "--output", str(folder / "out.jsonl")]))  # fmt: skip
        scored = [json.loads(x) for x in (folder / "out.jsonl").read_text().split("\n") if x]  # not splitlines: U+0085
        skipped = [s["line"] for s in summary["skipped_lines"]]
        # A UTF-8 byte-order mark opening the file marks its encoding, not content: a line of only that is blank.
        content = [raw[3:] if i == 1 and raw.startswith(b"\xef\xbb\xbf") else raw for i, (_, raw) in enumerate(lines, 1)]
        nonblank = [i for i, raw in enumerate(content, 1) if raw.strip()]
        assert len(scored) + len(skipped) == len(nonblank)
        assert set(skipped) <= set(nonblank)
        good = [json.loads(raw) for kind, raw in lines if kind == "good"]
        kept = [{k: row[k] for k in ("prompt", "response")} for row in scored if set(row) >= {"prompt", "response"}]
        assert [g for g in good] == [k for k in kept if k in good][: len(good)]  # every valid line, unchanged, in order
        assert all("safety" in row for row in scored)

    check()
