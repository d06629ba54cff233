"""The reward model (load, score) and the reward functions online RL optimises.

A reward model here is a sequence-classification head (one logit) over a causal-LM backbone: the
base model, optionally with an SFT stage adapter merged in, plus a LoRA adapter and the trained
`score` head (PEFT `modules_to_save`). Its folder carries `clinalign_base.json`, naming the base,
the merged SFT adapter and the 4-bit settings (if any), so `load_reward_model(folder)` rebuilds what
was trained. In 4-bit the backbone is quantized like every other stage's base (GPT-OSS through
harmony.gpt_oss), with the SFT adapter merged in 16-bit before quantization (`reward_backbone`).

Responses are scored in the same layout the RewardTrainer trained on: the prompt messages plus the
response as an assistant turn, rendered with the tokenizer's chat template and the same
`chat_template_kwargs` (the harmony reasoning effort, for GPT-OSS templates).

The reward functions follow TRL's `reward_funcs` signature, `f(prompts, completions, **columns)`,
and return one float (or None: not applicable) per completion. What they score is `final_answer`:
for a GPT-OSS (harmony) completion its final channel only, never its analysis channel.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from trl import RewardTrainer

from clinalign.adapters import PROVENANCE_FILE, check_adapter_base, require_adapter_folder
from clinalign.compat import keep_bnb_gradients_on_cpu
from clinalign.devices import device_map, process_device, resolve_dtype, whole_on_every_rank
from clinalign.errors import ClinalignError
from clinalign.model_store import ADAPTER_CONFIG, is_adapter_folder, require_safetensors
from clinalign.models import ensure_pad_token, load_tokenizer, model_type, resolve_model
from clinalign.prompts import health_prompt_messages
from clinalign.sampling import PairLengthGrouping, length_sorted_batches


class LengthGroupedRewardTrainer(PairLengthGrouping, RewardTrainer):
    """TRL's RewardTrainer; with `train_sampling_strategy: group_by_length`, pairs of similar length share a batch."""


def reward_backbone(
    base: str, sft_adapter: str | Path | None = None, *, dtype="auto", quantization_config=None, whole: bool = False
):
    """A one-logit sequence classifier over `base`, with `sft_adapter` (a causal-LM LoRA) merged in.

    The SFT adapter's module names (model.layers.N...) are the same in the classifier, so PEFT
    loads it there directly; merging leaves a plain model on which a fresh reward LoRA is trained.

    `quantization_config` (a `BitsAndBytesConfig`, as `clinalign.models.model_init_kwargs` builds it
    from the config): the backbone in 4-bit, like every other training stage; the `score` head stays
    16-bit. The SFT adapter is merged into 16-bit weights first and the sum is quantized, NF4(W + BA):
    merging into already-quantized weights would round twice, NF4(NF4(W) + BA). Either way the merged
    backbone is not bit-identical to the SFT policy as trained (NF4(W) + BA); this order gives the
    smaller error, one rounding of the same size as the quantization of W itself.

    `whole`: load outside DeepSpeed's `zero.Init` (a model that is only scored: see clinalign.devices).
    Every load goes to the process's device by the one device rule (`clinalign.devices.device_map`).

    GPT-OSS (any dtype) loads through `harmony.gpt_oss.load_gpt_oss`: MXFP4 dequantized on load,
    eager attention. In 4-bit its attention projections are quantized here and its expert stacks
    stay 16-bit: quantize them (`clinalign.models.quantize_after_lora`) once the reward LoRA is attached.
    """
    from transformers import AutoModelForSequenceClassification

    from harmony.gpt_oss import load_gpt_oss, quantize_linear

    dtype = resolve_dtype(dtype)
    path = resolve_model(base)
    gpt_oss = model_type(path) == "gpt_oss"
    if gpt_oss and quantization_config is not None and not quantization_config.load_in_4bit:
        raise ClinalignError("a GPT-OSS reward model loads in 16-bit or in 4-bit (load_in_4bit), not in 8-bit")
    if sft_adapter is not None:
        require_adapter_folder(sft_adapter)
    # Dense and no adapter to merge: transformers quantizes while it loads. Otherwise load 16-bit first.
    load_directly = quantization_config is not None and sft_adapter is None and not gpt_oss
    whole = whole or sft_adapter is not None or quantization_config is not None
    with whole_on_every_rank() if whole else contextlib.nullcontext():
        # device_map() inside the context: a whole copy goes to this rank's device, a sharded one nowhere yet.
        direct = {"quantization_config": quantization_config, "device_map": device_map()}
        if gpt_oss:
            model = load_gpt_oss(
                path, dtype=dtype, load_in_4bit=False, model_class=AutoModelForSequenceClassification, num_labels=1
            )
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=dtype, use_safetensors=True,
                **(direct if load_directly else {"device_map": direct["device_map"]}),
            )  # fmt: skip
        if sft_adapter is not None:
            check_adapter_base(sft_adapter, base, model)
            model = _merged(model, sft_adapter)
        if quantization_config is not None and gpt_oss:
            quantize_linear(model, dtype)
        elif quantization_config is not None and not load_directly:
            # transformers' own bitsandbytes loader, fed the merged weights (same result as a direct load).
            model = type(model).from_pretrained(
                None, config=model.config, state_dict=model.state_dict(), dtype=dtype, **direct
            )
    keep_bnb_gradients_on_cpu(model)
    return model


def restore_score_dtype(model, dtype) -> int:
    """Give the trained `score` head back `dtype`; returns how many tensors were cast.

    TRL's RewardTrainer casts every trainable tensor of a model transformers loaded in 4-bit to bf16
    (the QLoRA recipe for LoRA weights). The head is a plain `nn.Linear` fed hidden states in the
    compute dtype, so without bf16 autocast (fp32 training, a CPU without AVX512-BF16) its forward
    fails: "expected m1 and m2 to have the same dtype".
    """
    dtype = resolve_dtype(dtype)
    cast = 0
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and "score" in name.split(".") and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
            cast += 1
    return cast


def _merged(model, adapter_dir):
    """`model` with a causal-LM LoRA merged in. The adapter loads as a task-less PeftModel: its recorded
    CAUSAL_LM task would wrap the classifier in PeftModelForCausalLM, which needs generation methods."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(adapter_dir)
    config.task_type = None
    return PeftModel.from_pretrained(model, adapter_dir, config=config).merge_and_unload()


def load_reward_model(path: str | Path, *, dtype="auto"):
    """Load a reward model saved by reward/train.py -> (model in eval mode, tokenizer).

    The backbone is rebuilt as it was trained (`clinalign_base.json`: base, merged SFT adapter,
    quantization): a 4-bit model loads in 4-bit, in its training compute dtype (`dtype` may only
    repeat it), so it scores with the weights its LoRA and head were trained against.
    """
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    path = Path(path)
    provenance = path / PROVENANCE_FILE
    if not is_adapter_folder(path) or not provenance.is_file():
        raise ClinalignError(f"reward model not found: {path} (expected {ADAPTER_CONFIG} and {PROVENANCE_FILE})")
    recorded = json.loads(provenance.read_text())
    quantization = recorded.get("quantization")
    quantization_config = BitsAndBytesConfig.from_dict(quantization) if quantization else None
    if quantization_config is not None and quantization_config.load_in_4bit:
        trained = quantization_config.bnb_4bit_compute_dtype
        if dtype not in (None, "auto") and resolve_dtype(dtype) != trained:
            raise ClinalignError(
                f"reward model {path} was trained in 4-bit with compute dtype {str(trained).removeprefix('torch.')}: "
                "load it with dtype auto or that dtype"
            )
        dtype = trained
    # Scoring only: a whole, unsharded copy on every rank's device, even under ZeRO-3 (clinalign.devices).
    model = reward_backbone(recorded["base"], recorded.get("merged_adapter"), dtype=dtype,
                            quantization_config=quantization_config, whole=True)  # fmt: skip
    require_safetensors(path)
    model = PeftModel.from_pretrained(model, path)
    if quantization_config is not None and model.config.model_type == "gpt_oss":
        from harmony.gpt_oss import quantize_experts

        quantize_experts(model, resolve_dtype(dtype))  # after the adapter is attached, as in training
        model.to(process_device())  # quantize_experts put the stacks there; the rest follows
    tokenizer = load_tokenizer(str(path))
    ensure_pad_token(tokenizer, model)
    model.eval()
    return model, tokenizer


@torch.no_grad()
def score_responses(
    model,
    tokenizer,
    prompts: Sequence[list[dict]],
    responses: Sequence[str | list[dict]],
    *,
    batch_size: int = 8,
    max_length=1024,
    reasoning_effort: str = "low",
) -> list[float]:
    """Reward-model scores for (prompt messages, response) pairs, batched, right-padded.

    Rendered as reward/train.py trained the model: the chat template with `reasoning_effort` (a
    harmony template's system message; other templates ignore it). A response holding harmony
    markers (raw GPT-OSS text) is scored by its final channel only (`final_answer`).
    """
    texts = [
        tokenizer.apply_chat_template(
            # a response: text, or a pair's completion turns (TRL's conversational format) as they are
            [*prompt, *([{"role": "assistant", "content": final_answer(response)}]
                        if isinstance(response, str) else response)],
            tokenize=False,
            reasoning_effort=reasoning_effort,
        )
        for prompt, response in zip(prompts, responses, strict=True)
    ]
    device = next(model.parameters()).device
    encode = dict(truncation=True, max_length=max_length, add_special_tokens=False)  # the template holds them
    lengths = tokenizer(texts, **encode)["input_ids"]
    scores: list[float] = [0.0] * len(texts)
    # Batches of similar length: padding a short safety answer to a PubMedQA abstract is wasted compute.
    for batch in length_sorted_batches(lengths, batch_size):
        padded = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, **encode).to(device)
        for i, score in zip(batch, model(**padded).logits[:, 0].float().tolist(), strict=True):
            scores[i] = score
    return scores


def completion_text(completion) -> str:
    """TRL passes conversational completions as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion)
    return completion


def is_harmony_turn(completion_ids: Sequence[int]) -> bool:
    """Token ids of a GPT-OSS (harmony) assistant turn: they hold its `<|channel|>` or `<|message|>` marker.

    Those ids are harmony's special tokens in the o200k vocabulary; a model with a smaller vocabulary
    never emits them (one with a larger, different vocabulary could: none that this toolkit trains).
    """
    from harmony.vocab import HARMONY_SPECIAL_TOKENS

    markers = (HARMONY_SPECIAL_TOKENS["<|channel|>"], HARMONY_SPECIAL_TOKENS["<|message|>"])
    return any(int(t) in markers for t in completion_ids)


def final_answer(completion, completion_ids: Sequence[int] | None = None) -> str:
    """The part of a policy's completion that is scored.

    A harmony (GPT-OSS) turn, recognized by its token ids (TRL passes `completion_ids`; its decoded
    text has lost the markers) or by markers kept in the text: its final channel only, "" when it
    stopped before one (no answer), never its analysis. Any other completion: its text.
    """
    if completion_ids is not None and is_harmony_turn(completion_ids):
        return _final_channel(list(completion_ids))
    text = completion_text(completion)
    if "<|channel|>" in text or "<|message|>" in text:
        return _final_channel(text)
    return text


def _final_channel(tokens_or_text) -> str:
    from harmony.render import parse_completion

    return parse_completion(tokens_or_text)["final"] or ""


def prompt_text(prompt) -> str:
    """The user's words in a prompt (the last user turn), for the safety checks."""
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return users[-1] if users else ""
    return prompt


class RewardModelReward:
    """TRL reward function: the reward model's score of each completion."""

    __name__ = "reward_model"

    def __init__(self, model, tokenizer, batch_size: int = 8, reasoning_effort: str = "low"):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.reasoning_effort = reasoning_effort  # as reward/train.py rendered the reward model's pairs

    def __call__(self, prompts, completions, completion_ids=None, **_):
        prompts = [health_prompt_messages(p) for p in prompts]  # a bare string gets the system turn
        ids = _each(completion_ids, completions)
        responses = [final_answer(c, i) for c, i in zip(completions, ids, strict=True)]
        return score_responses(
            self.model, self.tokenizer, prompts, responses, batch_size=self.batch_size,
            reasoning_effort=self.reasoning_effort,
        )  # fmt: skip


def _each(completion_ids, completions) -> list:
    """TRL's `completion_ids` column, or one None per completion when a caller passes none."""
    return list(completion_ids) if completion_ids is not None else [None] * len(completions)


def factuality_reward(prompts, completions, record=None, completion_ids=None, **_):
    """1 correct / 0 wrong / partial for no commitment, against the gold answer; None without one.

    Scores `final_answer`: a GPT-OSS completion's final channel only.
    """
    from clinalign.factuality import score_factuality
    from clinalign.records import Record

    records = record if record is not None else [None] * len(completions)
    scores = []
    for raw, completion, ids in zip(records, completions, _each(completion_ids, completions), strict=True):
        if not raw:
            scores.append(None)
            continue
        parsed = Record.from_dict(json.loads(raw) if isinstance(raw, str) else raw)
        scores.append(score_factuality(parsed, final_answer(completion, ids)).score if parsed.answer else None)
    return scores


def safety_reward(prompts, completions, completion_ids=None, **_):
    """The weighted pass rate of the rule-based clinical safety checks, in [0, 1].

    Checks `final_answer`: a GPT-OSS completion's final channel only (its analysis is not what the user reads).
    """
    from clinalign.safety import check_safety

    return [
        check_safety(final_answer(c, ids), prompt=prompt_text(p)).score
        for p, c, ids in zip(prompts, completions, _each(completion_ids, completions), strict=True)
    ]
