"""The reward model (load, score) and the reward functions online RL optimises.

A reward model here is a sequence-classification head (one logit) over a causal-LM backbone: the
base model, optionally with an SFT stage adapter merged in, plus a LoRA adapter and the trained
`score` head (PEFT `modules_to_save`). Its folder carries `clinalign_base.json`, naming the base
and the merged SFT adapter, so `load_reward_model(folder)` rebuilds exactly what was trained.

Responses are scored in the same layout the RewardTrainer trained on: the prompt messages plus the
response as an assistant turn, rendered with the tokenizer's chat template.

The reward functions follow TRL's `reward_funcs` signature, `f(prompts, completions, **columns)`,
and return one float (or None: not applicable) per completion.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from clinalign.config import ClinalignError
from clinalign.models import PROVENANCE_FILE, ensure_pad_token, load_tokenizer, resolve_dtype, resolve_model


def reward_backbone(base: str, sft_adapter: str | Path | None = None, *, dtype="auto"):
    """A one-logit sequence classifier over `base`, with `sft_adapter` (a causal-LM LoRA) merged in.

    The SFT adapter's module names (model.layers.N...) are the same in the classifier, so PEFT
    loads it there directly; merging leaves a plain model on which a fresh reward LoRA is trained.
    """
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(base), num_labels=1, dtype=resolve_dtype(dtype)
    )
    if sft_adapter is not None:
        if not (Path(sft_adapter) / "adapter_config.json").is_file():
            raise ClinalignError(f"SFT adapter not found: {sft_adapter} (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, sft_adapter).merge_and_unload()
    return model


def load_reward_model(path: str | Path, *, dtype="auto"):
    """Load a reward model saved by reward/train.py -> (model in eval mode, tokenizer)."""
    from peft import PeftModel

    path = Path(path)
    provenance = path / PROVENANCE_FILE
    if not (path / "adapter_config.json").is_file() or not provenance.is_file():
        raise ClinalignError(f"reward model not found: {path} (expected adapter_config.json and {PROVENANCE_FILE})")
    recorded = json.loads(provenance.read_text())
    model = reward_backbone(recorded["base"], recorded.get("merged_adapter"), dtype=dtype)
    model = PeftModel.from_pretrained(model, path)
    tokenizer = load_tokenizer(str(path))
    ensure_pad_token(tokenizer, model)
    model.eval()
    return model, tokenizer


@torch.no_grad()
def score_responses(
    model, tokenizer, prompts: Sequence[list[dict]], responses: Sequence[str], *, batch_size: int = 8, max_length=1024
) -> list[float]:
    """Reward-model scores for (prompt messages, response) pairs, batched, right-padded."""
    texts = [
        tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)
        for prompt, response in zip(prompts, responses, strict=True)
    ]
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
            add_special_tokens=False,  # the chat template already holds them
        ).to(device)
        scores.extend(model(**batch).logits[:, 0].float().tolist())
    return scores


def completion_text(completion) -> str:
    """TRL passes conversational completions as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion)
    return completion


def prompt_text(prompt) -> str:
    """The user's words in a prompt (the last user turn), for the safety checks."""
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return users[-1] if users else ""
    return prompt


class RewardModelReward:
    """TRL reward function: the reward model's score of each completion."""

    __name__ = "reward_model"

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def __call__(self, prompts, completions, **_):
        prompts = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
        responses = [completion_text(c) for c in completions]
        return score_responses(self.model, self.tokenizer, prompts, responses, batch_size=self.batch_size)


def factuality_reward(prompts, completions, record=None, **_):
    """1 correct / 0 wrong / partial for no commitment, against the gold answer; None without one."""
    from clinalign.data.records import Record
    from clinalign.factuality import score_factuality

    records = record if record is not None else [None] * len(completions)
    scores = []
    for raw, completion in zip(records, completions, strict=True):
        if not raw:
            scores.append(None)
            continue
        parsed = Record.from_dict(json.loads(raw) if isinstance(raw, str) else raw)
        scores.append(score_factuality(parsed, completion_text(completion)).score if parsed.answer else None)
    return scores


def safety_reward(prompts, completions, **_):
    """The weighted pass rate of the rule-based clinical safety checks, in [0, 1]."""
    from clinalign.safety import check_safety

    return [
        check_safety(completion_text(c), prompt=prompt_text(p)).score for p, c in zip(prompts, completions, strict=True)
    ]
