"""Answer a JSONL of questions with a base model plus (optionally) a trained adapter.

    python -m clinalign.generate --model_name_or_path smollm2 --adapter runs/demo/dpo \\
        --input runs/demo/data/medqa.jsonl --output runs/demo/answers/dpo.jsonl
    python -m clinalign.generate --adapter runs/demo/dpo --input questions.jsonl --output samples.jsonl \\
        --do_sample true --temperature 0.7 --num_return_sequences 4 --report_md review.md
    python -m clinalign.generate --report_md review.md --compare answers/sft.jsonl answers/dpo.jsonl

Each input line is one of:

- a question record: the canonical record (`clinalign.data` output) or a raw PubMedQA / MedMCQA /
  MedQA record, converted by `clinalign.data.convert_record`; prompted as every stage trains it
  (`clinalign.prompts.prompt_messages`);
- `{"prompt": "..."}`: a free-text health prompt, with the safety instructions every stage uses for
  them (`clinalign.prompts.free_text_messages`); `{"prompt": [messages]}` is taken as chat messages;
- `{"messages": [{"role", "content"}, ...]}`: chat messages as they are.

The base defaults to the one the adapter's clinalign_base.json names (the adapter is refused on
another base). The model is prompted in the one format it was trained on (`clinalign.evaluation.prompt_ids`):
harmony for GPT-OSS, whose answer is the final channel, with the analysis channel kept apart in
`analysis`; the tokenizer's chat template for every other model. Generation is batched (prompts of
similar length together), greedy by default or sampled (`do_sample`, `num_return_sequences`
answers per question), with a progress bar, on the process's device (the loaders' device rule).
`load_in_4bit` loads the base in 4-bit NF4 (GPT-OSS through harmony.gpt_oss).

Each output line is the input plus `prompt` (the messages the model saw), `response` (the answer),
`sample` (0..num_return_sequences-1), `line` (its input line) and `model`; a question line carries
the canonical record's fields at the top level (so eval's `data` reads the file) and again under
`record` (so reward/score.py scores factuality against the gold answer); a GPT-OSS line carries
`analysis` and `final_missing`. reward/score.py reads the output as it is.

A bad input line is reported with its number and skipped; every good line is answered. The summary
(lines read, answered, skipped with their reasons, answers written) is printed last and written to
`--summary` (default OUTPUT.summary.json) with the resolved config.

`--report_md PATH` writes a reviewer page: per question its text, options and gold answer, then
each model's answers (this run's and every `--compare` output's) with the safety checks they fail
(`clinalign.safety.check_safety`), side by side.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from clinalign.adapters import PROVENANCE_FILE, read_adapter_config
from clinalign.config import ModelArgs, Parser, resolved_config, run
from clinalign.data import convert_record
from clinalign.errors import ClinalignError, ConfigError
from clinalign.evaluation import Generation, decode, prompt_ids, uses_harmony
from clinalign.json_io import BadLine, read_jsonl, write_json
from clinalign.models import load_policy, model_init_kwargs, quantize_after_lora
from clinalign.prompts import free_text_messages, prompt_messages
from clinalign.records import Record
from clinalign.safety import check_safety
from clinalign.tables import markdown_table

QUESTION_MARKERS = ("question", "data", "instances")


@dataclasses.dataclass
class GenerateArgs:
    input: str = dataclasses.field(
        default="", metadata={"help": "JSONL of question records, {prompt} or {messages} lines."}
    )
    output: str = dataclasses.field(default="", metadata={"help": "Answers JSONL to write."})
    model_name_or_path: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Base model: a built-in name, a folder or a hub id (default: the base the adapter's "
                          "clinalign_base.json names, else smollm2)."},
    )  # fmt: skip
    adapter: str | None = dataclasses.field(
        default=None, metadata={"help": "Adapter folder (an SFT stage, DPO or PPO); null: the base alone."}
    )
    name: str | None = dataclasses.field(
        default=None, metadata={"help": "The model's name on the output lines and the report (default: the adapter's)."}
    )
    dtype: str = dataclasses.field(
        default="auto",
        metadata={"help": "Weights dtype.", "choices": ["auto", "bfloat16", "float16", "float32"]},
    )
    load_in_4bit: bool = dataclasses.field(
        default=False, metadata={"help": "Base weights in 4-bit NF4 (bitsandbytes), as GPT-OSS trains."}
    )
    batch_size: int = dataclasses.field(default=8, metadata={"help": "Prompts per generate() call."})
    max_new_tokens: int = dataclasses.field(default=256, metadata={"help": "Tokens per answer at most."})
    do_sample: bool = dataclasses.field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = dataclasses.field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = dataclasses.field(default=1.0, metadata={"help": "Nucleus sampling mass (1: off)."})
    top_k: int = dataclasses.field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    num_return_sequences: int = dataclasses.field(
        default=1, metadata={"help": "Answers per question (sampling only): one output line each."}
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "Sampling seed."})
    reasoning_effort: str = dataclasses.field(
        default="low",
        metadata={"help": "GPT-OSS: the harmony reasoning effort it was trained with.",
                  "choices": ["low", "medium", "high"]},
    )  # fmt: skip
    summary: str | None = dataclasses.field(
        default=None, metadata={"help": "Summary JSON (default: OUTPUT.summary.json)."}
    )
    report_md: str | None = dataclasses.field(
        default=None, metadata={"help": "Also write a Markdown page of the answers side by side for reviewers."}
    )
    compare: list[str] = dataclasses.field(
        default_factory=list,
        metadata={"help": "Other generate outputs to put beside this one on the report page (alone without --input)."},
    )


# ----------------------------------------------------------------------------------------------
# Input lines


def _messages(value, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{where}' must be a non-empty list of chat messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"'{where}'[{i}] is not a {{role, content}} message")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"'{where}'[{i}] ({message['role']}) has no text content")
    if value[-1]["role"] != "user":
        raise ValueError(f"'{where}' must end with a user message, not {value[-1]['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def parse_item(item: dict) -> tuple[list[dict[str, str]], Record | None]:
    """One input object -> (the prompt messages, the question record or None); ValueError if unusable."""
    if "messages" in item:
        return _messages(item["messages"], "messages"), None
    if "prompt" in item:
        prompt = item["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("'prompt' is empty")
            return free_text_messages(prompt), None
        return _messages(prompt, "prompt"), None
    converted = convert_record(item, keep_unlabeled=True)
    if isinstance(converted, str):
        known = any(key in item for key in QUESTION_MARKERS)
        what = "a question record that cannot be used" if known else "no question, prompt or messages"
        raise ValueError(f"{what} ({converted})")
    return prompt_messages(converted), converted


def read_questions(path: str, model, tokenizer, reasoning_effort: str) -> tuple[list[dict], list[dict], int]:
    """(good lines as {line, item, messages, record, prompt_ids}, bad lines as {line, error}, lines read).

    A line whose messages the model's format cannot render (e.g. a harmony prompt with a tool role)
    is a bad line too, found here, before any generation.
    """
    good, bad, read = [], [], 0
    for number, item in read_jsonl(path, "input file"):
        read += 1
        try:
            if isinstance(item, BadLine):
                raise ValueError(item)
            messages, record = parse_item(item)
            ids = prompt_ids(model, tokenizer, [messages], reasoning_effort=reasoning_effort)[0]
        except (ValueError, TypeError, ClinalignError) as e:
            error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            bad.append({"line": number, "error": error})
            print(f"[generate] {path}:{number}: skipped ({error})")
            continue
        good.append({"line": number, "item": item, "messages": messages, "record": record, "prompt_ids": ids})
    return good, bad, read


# ----------------------------------------------------------------------------------------------
# Generation


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_return_sequences: int = 1,
    progress: bool = True,
) -> list[list[Generation]]:
    """`num_return_sequences` answers per prompt (token ids from `prompt_ids`), in order.

    Greedy decoding is `clinalign.evaluation.generate`'s (the same stop tokens, padding and reading),
    so a greedy answer here is the answer eval scores; sampling draws from the model's distribution
    with the given temperature / top-p / top-k.
    """
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else None
    return decode(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                  sampling=sampling, num_return_sequences=num_return_sequences, progress=progress)  # fmt: skip


def output_rows(questions: list[dict], answers: list[list[Generation]], model_info: dict, harmony: bool) -> list[dict]:
    """The output lines: each input plus its answers (module docstring), one line per answer."""
    rows = []
    for question, generations in zip(questions, answers, strict=True):
        record = question["record"]
        base = {**record.to_dict(), "record": record.to_dict()} if record is not None else dict(question["item"])
        for sample, generation in enumerate(generations):
            row = {**base, "line": question["line"], "sample": sample, "prompt": question["messages"]}
            row["response"] = generation.response
            if harmony:
                row["analysis"] = generation.analysis
                row["final_missing"] = generation.final_missing
            row["model"] = model_info
            rows.append(row)
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# The reviewer page


def _cell(text) -> str:
    if text is None or text == "":
        return "-"
    return str(text).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _user_text(messages: list[dict]) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""


def review_page(outputs: dict[str, list[dict]]) -> str:
    """Markdown: per question (in the first output's order) its text, options, gold, then each model's answers.

    `outputs`: {model name: generate output lines}. Lines of different outputs are matched by the
    question's id (record id, else the input's `id`, else its line number).
    """

    def key(row: dict) -> str:
        return str(row.get("record", {}).get("id") or row.get("id") or f"line {row.get('line')}")

    order: list[str] = []
    by_key: dict[str, dict[str, list[dict]]] = {}
    for name, rows in outputs.items():
        for row in rows:
            k = key(row)
            if k not in by_key:
                by_key[k] = {}
                order.append(k)
            by_key[k].setdefault(name, []).append(row)
    lines = [
        "# Answers for review",
        "",
        f"Models: {', '.join(f'`{n}`' for n in outputs)}. {len(order)} questions. Failed checks: the rule-based "
        "clinical safety checks (clinalign.safety) the answer fails; `-` when none fails.",
    ]
    for number, k in enumerate(order, start=1):
        per_model = by_key[k]
        first = next(iter(per_model.values()))[0]
        record = first.get("record")
        lines += ["", f"## {number}. {k}", ""]
        if record:
            if record.get("context"):
                lines += [f"**Context:** {record['context']}", ""]
            lines += [f"**Question:** {record.get('question')}", ""]
            for letter, text in (record.get("options") or {}).items():
                lines.append(f"- {letter}. {text}")
            gold = record.get("answer")
            gold_text = record.get("answer_text")
            shown = f"{gold}. {gold_text}" if gold and gold_text and gold_text != gold else gold
            lines += ["", f"**Gold:** {shown or 'none (unlabeled)'}", ""]
        else:
            lines += [f"**Prompt:** {_user_text(first.get('prompt') or [])}", ""]
        rows = []
        for name in outputs:
            for row in per_model.get(name, []):
                prompt = _user_text(row.get("prompt") or [])
                failed = check_safety(row.get("response", ""), prompt=prompt, benign=row.get("benign")).failed
                rows.append([_cell(name), row.get("sample", 0), _cell(row.get("response")), _cell(", ".join(failed))])
        lines.append(markdown_table(["model", "sample", "answer", "failed safety checks"], rows))
    return "\n".join(lines) + "\n"


def read_output(path: str) -> tuple[str, list[dict]]:
    """(model name, lines) of a generate output file, for the reviewer page."""
    rows = [value for _, value in read_jsonl(path, "generate output") if not isinstance(value, BadLine)]
    name = next((r["model"]["name"] for r in rows if isinstance(r.get("model"), dict) and r["model"].get("name")), "")
    return name or Path(path).stem, rows


def write_review_page(path: str, outputs: list[tuple[str, list[dict]]]) -> Path:
    named: dict[str, list[dict]] = {}
    for name, rows in outputs:
        unique, n = name, 2
        while unique in named:  # two outputs of models with one name: keep both
            unique, n = f"{name} ({n})", n + 1
        named[unique] = rows
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(review_page(named))
    print(f"[generate] review page: {target} ({len(named)} models)")
    return target


# ----------------------------------------------------------------------------------------------
# The script


def _check(args: GenerateArgs) -> None:
    if not args.input and not args.compare:
        raise ConfigError("give --input, the questions to answer (or --report_md with --compare outputs)")
    if args.input and not args.output:
        raise ConfigError("give --output, the answers JSONL to write")
    if args.compare and not args.report_md:
        raise ConfigError("--compare puts outputs side by side on the --report_md page: give --report_md")
    if args.num_return_sequences < 1:
        raise ConfigError(f"config key 'num_return_sequences' must be at least 1, got {args.num_return_sequences}")
    if args.num_return_sequences > 1 and not args.do_sample:
        raise ConfigError("num_return_sequences > 1 needs do_sample: true (greedy decoding gives one answer)")
    for path in args.compare:
        if not Path(path).is_file():
            raise ClinalignError(f"--compare output not found: {path}")
    if args.adapter and read_adapter_config(args.adapter).get("task_type") == "SEQ_CLS":
        raise ClinalignError(f"{args.adapter} is a reward model, not a policy: score answers with reward/score.py")


def adapter_base(adapter: str | None) -> str | None:
    """The base model an adapter's clinalign_base.json names (None without one)."""
    path = Path(adapter) / PROVENANCE_FILE if adapter else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("base")
    except (OSError, ValueError, AttributeError):
        return None


def main(args: GenerateArgs):
    _check(args)
    outputs = []
    summary = None
    if args.input:
        if not Path(args.input).is_file():
            raise ClinalignError(f"input file not found: {args.input}")
        args.model_name_or_path = args.model_name_or_path or adapter_base(args.adapter) or "smollm2"
        model_args = ModelArgs(model_name_or_path=args.model_name_or_path, dtype=args.dtype,
                               load_in_4bit=args.load_in_4bit)  # fmt: skip
        model, tokenizer = load_policy(args.model_name_or_path, args.adapter, **model_init_kwargs(model_args))
        quantize_after_lora(model, model_args)  # GPT-OSS in 4-bit: its expert stacks, now the adapter is on
        harmony = uses_harmony(model)
        questions, bad, read = read_questions(args.input, model, tokenizer, args.reasoning_effort)
        if args.do_sample:
            torch.manual_seed(args.seed)
        answers = generate_answers(
            model, tokenizer, [q["prompt_ids"] for q in questions], max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, num_return_sequences=args.num_return_sequences,
        )  # fmt: skip
        name = args.name or (Path(args.adapter).name if args.adapter else args.model_name_or_path)
        model_info = {"name": name, "base": args.model_name_or_path, "adapter": args.adapter}
        rows = output_rows(questions, answers, model_info, harmony)
        _write_jsonl(Path(args.output), rows)
        summary = {
            "lines": read,
            "answered": len(questions),
            "skipped": len(bad),
            "answers": len(rows),
            "output": args.output,
            "skipped_lines": bad,
            "config": resolved_config(args),
        }
        if harmony:
            summary["final_missing"] = sum(r["final_missing"] for r in rows)
        write_json(args.summary or f"{args.output}.summary.json", summary)
        outputs.append((name, rows))
        del model
    if args.report_md:
        write_review_page(args.report_md, outputs + [read_output(path) for path in args.compare])
    if summary is not None:
        print(f"[generate] {summary['lines']} lines read: {summary['answered']} answered "
              f"({summary['answers']} answers), {summary['skipped']} skipped -> {args.output}")  # fmt: skip
    return summary


def make_parser() -> Parser:
    return Parser([GenerateArgs])


if __name__ == "__main__":
    run(main, make_parser(), upstream_patches=True)
