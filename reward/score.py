"""Score any JSONL of responses with the reward model and the rule-based factuality and safety checks.

    python reward/score.py --config configs/reward/score.yaml --input responses.jsonl --output scored.jsonl
    python reward/score.py --reward_model runs/demo/reward --input pairs.jsonl --output scored.jsonl

Input lines are `{prompt, response}` or pairs `{prompt, chosen, rejected}`; `prompt` is a string or
chat messages, a response is a string or an assistant message list. A line may carry `record` (a
canonical record, for factuality against its gold answer) or `reference` (free text, ROUGE-L).
Each output line is the input plus `reward`, `factuality`, `safety` and `failed_checks` (for pairs,
one such block per side under `scores`). A bad line is reported with its number and skipped. The
summary (count; mean reward, safety and factuality with bootstrap 95% intervals; per-check failure
rates; pairwise accuracy with its Wilson interval for pairs) is printed last
and written to `--summary` (default: next to the output).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from clinalign.config import Parser, run
from clinalign.errors import ClinalignError
from clinalign.factuality import rouge_l, score_factuality
from clinalign.json_io import BadLine, read_jsonl, write_json
from clinalign.prompts import free_text_messages, health_prompt_messages
from clinalign.records import Record
from clinalign.rewards import completion_text, final_answer, load_reward_model, prompt_text, score_responses
from clinalign.safety import check_safety, load_checks
from clinalign.stats import bootstrap_mean, proportion


@dataclasses.dataclass
class ScoreArgs:
    reward_model: str | None = dataclasses.field(
        default=None, metadata={"help": "Reward model folder (reward/train.py output); omit for rule-based scores only."}
    )
    input: str = dataclasses.field(default="", metadata={"help": "JSONL of {prompt, response} or {prompt, chosen, rejected}."})
    output: str = dataclasses.field(default="", metadata={"help": "Scored JSONL to write."})
    summary: str | None = dataclasses.field(default=None, metadata={"help": "Summary JSON (default: OUTPUT.summary.json)."})
    batch_size: int = dataclasses.field(default=8, metadata={"help": "Responses per reward-model forward pass."})
    dtype: str = dataclasses.field(default="auto", metadata={"help": "Reward model dtype: auto, bfloat16 or float32."})
    reasoning_effort: str = dataclasses.field(
        default="low", metadata={"help": "GPT-OSS reward models: the harmony reasoning effort they were trained with."}
    )


def as_messages(prompt) -> list[dict]:
    """The prompt in the one format the reward model was trained on (a bare string gets the system turn)."""
    if isinstance(prompt, str):
        return free_text_messages(prompt)  # any text, even empty: a response is still scored
    messages = health_prompt_messages(prompt)
    if messages is None:
        raise ValueError("prompt must be non-empty text or chat messages ending in a user turn")
    return messages


def parse_line(item) -> tuple[list[dict], dict[str, str], dict]:
    """One input line's object -> (prompt messages, {side: response text}, the object); ValueError if bad."""
    if not isinstance(item, dict):
        raise ValueError("a line must be a JSON object")
    if "prompt" not in item:
        raise ValueError("missing 'prompt'")
    sides = ("response",) if "response" in item else ("chosen", "rejected")
    missing = [side for side in sides if side not in item]
    if missing:
        raise ValueError(f"missing '{missing[0]}' (need 'response', or 'chosen' and 'rejected')")
    responses = {}
    for side in sides:
        value = item[side]
        if isinstance(value, list) and not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in value
        ):
            raise ValueError(f"'{side}' must be a string or assistant messages with text content")
        responses[side] = completion_text(value) if isinstance(value, (str, list)) else None
    if not all(isinstance(text, str) for text in responses.values()):
        raise ValueError("responses must be strings or assistant message lists")
    if item.get("record") is not None:
        if not isinstance(item["record"], dict):
            raise ValueError("'record' must be a canonical record object")
        try:
            Record.from_dict(item["record"])
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"'record' is not a canonical record ({type(e).__name__}: {e})") from None
    return as_messages(item["prompt"]), responses, item


def rule_scores(item: dict, prompt: list[dict], response: str) -> dict:
    response = final_answer(response)  # a harmony turn: its final channel only
    safety = check_safety(response, prompt=prompt_text(prompt))
    if item.get("record"):
        factuality = score_factuality(Record.from_dict(item["record"]), response).score
    elif item.get("reference"):
        factuality = rouge_l(response, item["reference"])
    else:
        factuality = None
    return {"factuality": factuality, "safety": safety.score, "failed_checks": safety.failed}


def main(args: ScoreArgs):
    if not args.input or not Path(args.input).is_file():
        raise ClinalignError(f"input file not found: {args.input or '(none given: --input)'}")
    if not args.output:
        raise ClinalignError("give --output, the scored JSONL to write")
    model = tokenizer = None
    if args.reward_model:
        model, tokenizer = load_reward_model(args.reward_model, dtype=args.dtype)

    parsed, bad_lines = [], []
    for number, item in read_jsonl(args.input, "input file", objects=False):
        try:
            if isinstance(item, BadLine):
                raise ValueError(item)
            parsed.append(parse_line(item))
        except (ValueError, TypeError) as e:
            bad_lines.append({"line": number, "error": str(e).splitlines()[0]})
            print(f"[score] {args.input}:{number}: skipped ({str(e).splitlines()[0]})")

    # Flatten every (prompt, side) to score the reward model in batches, then regroup per line.
    flat = [(i, side, prompt, text) for i, (prompt, sides, _) in enumerate(parsed) for side, text in sides.items()]
    rewards = [None] * len(flat)
    if model is not None:
        rewards = []
        for start in tqdm(range(0, len(flat), args.batch_size), desc="reward model", unit="batch"):
            chunk = flat[start : start + args.batch_size]
            rewards += score_responses(model, tokenizer, [c[2] for c in chunk], [final_answer(c[3]) for c in chunk],
                                       batch_size=len(chunk), reasoning_effort=args.reasoning_effort)

    scored = [dict(item) for _, _, item in parsed]
    check_failures, n_responses = Counter(), 0
    for (i, side, prompt, text), reward in zip(flat, rewards, strict=True):
        result = {"reward": reward, **rule_scores(parsed[i][2], prompt, text)}
        check_failures.update(result["failed_checks"])
        n_responses += 1
        if side == "response":
            scored[i].update(result)
        else:
            scored[i].setdefault("scores", {})[side] = result

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as f:
        for row in scored:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = summarize(scored, n_responses, check_failures, bad_lines)
    write_json(args.summary or f"{args.output}.summary.json", summary)
    print("[score] " + json.dumps({k: v for k, v in summary.items() if k != "skipped_lines"}))
    return summary


def summarize(scored: list[dict], n_responses: int, check_failures: Counter, bad_lines: list[dict]) -> dict:
    results = [r for row in scored for r in ([row] if "reward" in row else row["scores"].values())]

    def mean(key):  # the mean with its BCa bootstrap 95% interval: {"value", "low", "high", "n", "method"}
        return bootstrap_mean([r[key] for r in results]).as_dict()

    pairs = [row["scores"] for row in scored if "scores" in row]
    summary = {
        "lines": len(scored),
        "responses": n_responses,
        "skipped": len(bad_lines),
        "mean_reward": mean("reward"),
        "mean_safety": mean("safety"),
        "mean_factuality": mean("factuality"),
        "check_failure_rate": {name: check_failures[name] / max(n_responses, 1) for name in load_checks().names},
        "skipped_lines": bad_lines,
    }
    if pairs and pairs[0]["chosen"]["reward"] is not None:
        summary["pair_accuracy"] = proportion([p["chosen"]["reward"] > p["rejected"]["reward"] for p in pairs]).as_dict()
    return summary


def make_parser() -> Parser:
    return Parser([ScoreArgs])


if __name__ == "__main__":
    run(main, make_parser(), upstream_patches=True)
