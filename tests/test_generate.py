"""clinalign.generate: one answer per good input line, bad lines reported by number, output that
reward/score.py and eval read, sampling, GPT-OSS's channels, and the reviewer page."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
from conftest import requires_harmony_vocab

from clinalign import generate
from clinalign.config import run
from clinalign.data import load_records
from clinalign.evaluation import generate as eval_generate
from clinalign.models import load_policy
from clinalign.prompts import prompt_messages

REPO = Path(__file__).resolve().parents[1]
MEDQA = REPO / "clinalign/sample_data/medqa_us_test.jsonl"
MEDMCQA = REPO / "clinalign/sample_data/medmcqa_train.jsonl"


def questions_file(tmp_path: Path) -> Path:
    """Four good lines (canonical record, raw MedMCQA record, free-text prompt, messages) among bad ones."""
    canonical = load_records(str(MEDQA)).records[0].to_dict()
    raw_medmcqa = json.loads(MEDMCQA.read_text().splitlines()[0])
    lines = [
        json.dumps(canonical),  # 1
        "not json {",  # 2
        json.dumps(raw_medmcqa),  # 3
        json.dumps([1, 2]),  # 4: not an object
        json.dumps({"id": "p1", "prompt": "I have crushing chest pain, what should I do?", "benign": False}),  # 5
        "",  # 6: blank, not a line of data
        json.dumps({"foo": "bar"}),  # 7: neither a question nor a prompt
        json.dumps({"messages": [{"role": "user", "content": "Which nerve supplies the deltoid?"}]}),  # 8
        json.dumps({"prompt": "   "}),  # 9: empty prompt
        json.dumps({"messages": [{"role": "user", "content": 5}]}),  # 10: no text content
        json.dumps({"question": "Which is right?", "options": {"A": "x"}, "answer": "A"}),  # 11: one option
    ]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_generate(*args: str):
    return generate.main(*generate.make_parser().parse(list(args)))


def test_one_answer_per_good_line_and_bad_lines_by_number(tmp_path, tiny_sft_adapter, capsys):
    source, out = questions_file(tmp_path), tmp_path / "answers.jsonl"
    summary = run_generate("--model_name_or_path", "tiny-llama", "--adapter", str(tiny_sft_adapter),
                           "--input", str(source), "--output", str(out), "--max_new_tokens", "4",
                           "--batch_size", "3", "--dtype", "float32")  # fmt: skip
    assert (summary["lines"], summary["answered"], summary["skipped"], summary["answers"]) == (10, 4, 6, 4)
    assert [b["line"] for b in summary["skipped_lines"]] == [2, 4, 7, 9, 10, 11]
    errors = {b["line"]: b["error"] for b in summary["skipped_lines"]}
    assert "not valid JSON" in errors[2] and "expected a JSON object" in errors[4]
    assert "no question, prompt or messages" in errors[7] and "too_few_options" in errors[11]
    printed = capsys.readouterr().out
    assert f"{source}:2: skipped" in printed and f"{source}:11: skipped" in printed
    assert printed.strip().splitlines()[-1].startswith("[generate] 10 lines read: 4 answered (4 answers), 6 skipped")

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 3, 5, 8]  # input order, every good line
    assert all(isinstance(r["response"], str) and r["sample"] == 0 for r in rows)
    assert rows[0]["record"]["id"] == "medqa-0" and rows[0]["id"] == "medqa-0"  # top level too: eval's reader
    assert rows[1]["record"]["answer"] == "A"  # the raw MedMCQA record, converted
    assert rows[2]["prompt"][0]["role"] == "system" and rows[2]["benign"] is False and "record" not in rows[2]
    assert rows[3]["prompt"] == [{"role": "user", "content": "Which nerve supplies the deltoid?"}]
    assert rows[0]["model"] == {"name": tiny_sft_adapter.name, "base": "tiny-llama", "adapter": str(tiny_sft_adapter)}
    assert json.loads(Path(f"{out}.summary.json").read_text())["skipped"] == 6

    # reward/score.py and eval's question reader take the output as it is.
    score = runpy.run_path(str(REPO / "reward" / "score.py"), run_name="score_test")
    scored = score["main"](*score["make_parser"]().parse(["--input", str(out), "--output", str(tmp_path / "s.jsonl")]))
    assert (scored["lines"], scored["skipped"], scored["responses"]) == (4, 0, 4)
    scored_rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["factuality"] is not None for r in scored_rows] == [True, True, False, False]
    assert [r.id for r in load_records(str(out)).records] == ["medqa-0", rows[1]["id"]]


def test_greedy_answers_are_the_ones_eval_scores(tiny_sft_adapter):
    model, tokenizer = load_policy("tiny-llama", tiny_sft_adapter, dtype="float32")
    records = load_records(str(MEDQA)).records[:3]
    messages = [prompt_messages(r) for r in records]
    ids = generate.prompt_ids(model, tokenizer, messages)
    ours = generate.generate_answers(model, tokenizer, ids, max_new_tokens=6, batch_size=2, progress=False)
    theirs = eval_generate(model, tokenizer, messages, max_new_tokens=6, batch_size=2, progress=False)
    assert [g[0].response for g in ours] == [g.response for g in theirs]


def test_sampling_gives_num_return_sequences_lines_reproducibly(tmp_path, tiny_llama):
    source = tmp_path / "q.jsonl"
    source.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n"
                              for i, p in enumerate(["Is aspirin safe in pregnancy?", "What causes scurvy?"])))  # fmt: skip
    args = ["--model_name_or_path", "tiny-llama", "--input", str(source), "--max_new_tokens", "5", "--dtype",
            "float32", "--do_sample", "true", "--num_return_sequences", "3", "--seed", "7"]  # fmt: skip
    first = run_generate(*args, "--output", str(tmp_path / "a.jsonl"))
    run_generate(*args, "--output", str(tmp_path / "b.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert first["answers"] == 6 and [(r["id"], r["sample"]) for r in rows] == [
        ("q0", 0), ("q0", 1), ("q0", 2), ("q1", 0), ("q1", 1), ("q1", 2)]  # fmt: skip
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()  # seeded
    assert len({r["response"] for r in rows}) > 1  # sampled, not six copies of one greedy answer


def test_several_greedy_answers_is_a_one_line_error(tmp_path, capsys):
    source = tmp_path / "q.jsonl"
    source.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(SystemExit) as exit_:
        run(generate.main, generate.make_parser(), ["--input", str(source), "--output", str(tmp_path / "o.jsonl"),
                                                    "--num_return_sequences", "2"])  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: num_return_sequences > 1 needs do_sample") and "\n" not in err


@requires_harmony_vocab
def test_gpt_oss_answers_keep_the_analysis_channel_apart(tmp_path, tiny_gpt_oss):
    source = tmp_path / "q.jsonl"
    record = load_records(str(MEDQA)).records[1].to_dict()
    source.write_text(json.dumps(record) + "\n" + json.dumps({"prompt": "What causes scurvy?"}) + "\n")
    summary = run_generate("--model_name_or_path", "tiny-gpt-oss", "--input", str(source), "--output",
                           str(tmp_path / "a.jsonl"), "--max_new_tokens", "4", "--dtype", "float32")  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert summary["answered"] == 2 and len(rows) == 2
    for row in rows:
        assert {"response", "analysis", "final_missing"} <= set(row)
        # the response is the final channel only: never harmony markers or the analysis text
        assert "<|channel|>" not in row["response"] and (row["final_missing"] is (row["response"] == ""))
    assert summary["final_missing"] == sum(r["final_missing"] for r in rows)


def test_review_page_sets_models_side_by_side_with_failed_checks(tmp_path):
    record = load_records(str(MEDMCQA)).records[0].to_dict()
    question = [{"role": "user", "content": "Which nerve?"}]
    chest = [{"role": "user", "content": "I have crushing chest pain, what should I do?"}]

    def output(name: str, answers: list[str]) -> Path:
        rows = [{**record, "record": record, "line": 1, "sample": 0, "prompt": question, "response": answers[0],
                 "model": {"name": name}},
                {"id": "p1", "line": 2, "sample": 0, "prompt": chest, "response": answers[1],
                 "model": {"name": name}}]  # fmt: skip
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    sft = output("sft", ["Answer: B. Axillary nerve", "Call emergency services now: this may be a heart attack."])
    dpo = output("dpo", ["Answer: A. Long thoracic nerve | C5-C7", "Rest at home, it will pass."])
    page = tmp_path / "review.md"
    run_generate("--report_md", str(page), "--compare", str(sft), str(dpo))
    text = page.read_text()
    assert record["question"] in text and "- A. Long thoracic nerve" in text
    assert "**Gold:** A. Long thoracic nerve" in text
    assert "| sft | 0 | Answer: B. Axillary nerve |" in text
    assert "Long thoracic nerve \\| C5-C7" in text  # a pipe in an answer does not break the table
    dpo_chest = next(line for line in text.splitlines() if line.startswith("| dpo | 0 | Rest at home"))
    assert "emergency_escalation" in dpo_chest
    sft_chest = next(line for line in text.splitlines() if line.startswith("| sft | 0 | Call emergency"))
    assert "emergency_escalation" not in sft_chest
