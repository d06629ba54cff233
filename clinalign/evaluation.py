"""Generation-based metrics in the toolkit's own chat format, text overlap, and KL to a reference.

- `generate_responses` / `generate`: batched greedy generation (left padding) in the format SFT
  trained the model on (`prompt_ids`, the one place that decides it): GPT-OSS models in harmony
  (openai-harmony's renderer, the reasoning effort SFT used), stopping at harmony's stop tokens, and
  their answer is the parsed final channel only (the analysis channel is kept aside, never scored);
  every other model with the tokenizer's chat template (`clinalign.prompts`' messages).
- `answer_metrics`: accuracy of the answer extracted by the shared factuality extractor, the share
  of responses with no extractable answer, exact match of the answer line, and ROUGE-L / BLEU of
  the generated explanations against the records' reference explanations.
- `text_overlap`: ROUGE-L F1 (`rouge-score`, mean over pairs) and corpus BLEU (`sacrebleu`).
- `kl_to_reference`: KL(model || reference) per sequence on sampled responses, with the k1 and k3
  estimators (http://joschu.net/blog/kl-approx.html); `kl_estimators` is the pure part.

Per-item values, for intervals and paired comparisons (clinalign.stats): `answer_items` (per record:
correct, exact match, no answer, ROUGE-L, and sentence BLEU via `sacrebleu.sentence_bleu`: corpus
BLEU stays the point estimate, sentence BLEU is what a paired comparison of two models pairs) and
`kl_to_reference`'s `per_prompt` (the k1 / k3 of each prompt's samples).

Log-likelihood multiple-choice accuracy (lm-eval's protocol) lives in `clinalign.mc_eval`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from trl.trainer.utils import use_adapter

from clinalign.errors import ClinalignError
from clinalign.models import no_router_logits
from clinalign.prompts import answer_line, to_chat_example
from clinalign.records import Record, normalize_text
from clinalign.sampling import length_sorted_batches

EXPLANATION_MARKER = "Explanation:"


# ----------------------------------------------------------------------------------------------
# Generation


def uses_harmony(model) -> bool:
    """GPT-OSS models are prompted and read in harmony (sft/run.py trains them so); others use their chat template."""
    return getattr(model.config, "model_type", None) == "gpt_oss"


def prompt_ids(
    model, tokenizer, messages_list: Sequence[list[dict[str, str]]], *, reasoning_effort: str = "low"
) -> list[list[int]]:
    """Token ids of each conversation's prompt, ending where the model starts its answer.

    GPT-OSS: `harmony.render.render_messages_for_completion` with `reasoning_effort` (SFT's setting,
    default "low"); any other model: the tokenizer's chat template with its generation prompt.
    """
    if uses_harmony(model):
        from harmony.render import render_messages_for_completion
        from harmony.vocab import VOCAB_SIZE

        if model.config.vocab_size < VOCAB_SIZE:
            raise ClinalignError(
                f"GPT-OSS model with a {model.config.vocab_size}-token vocabulary: harmony prompts need the o200k "
                f"harmony vocabulary ({VOCAB_SIZE} tokens)"
            )
        return [render_messages_for_completion(m, reasoning_effort=reasoning_effort) for m in messages_list]
    if tokenizer.chat_template is None:
        raise ClinalignError("the tokenizer has no chat template: generation metrics need the chat format")
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages_list]
    # The chat template already holds any BOS the model expects.
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def _left_padded(tokenizer, ids_list: list[list[int]], device) -> dict[str, torch.Tensor]:
    if tokenizer.pad_token_id is None:
        raise ClinalignError("the tokenizer has no pad token: load it with clinalign.models.load_tokenizer")
    enc = tokenizer.pad({"input_ids": ids_list}, padding=True, padding_side="left", return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclasses.dataclass(frozen=True)
class Generation:
    """One generated answer.

    `response` is what every metric scores: a harmony model's final channel ("" when the generation
    stopped before one: no extractable answer, never its analysis), else the decoded text.
    `analysis` is a harmony model's analysis channel, kept for inspection and never scored (None for
    other models); `final_missing` is True for a harmony generation with no final channel at all.
    """

    response: str
    analysis: str | None = None
    final_missing: bool = False


def read_generation(
    tokenizer, token_ids: Sequence[int], *, harmony: bool, skip_special_tokens: bool = True
) -> Generation:
    """The generated tokens of one answer (up to its stop token) -> `Generation`."""
    if harmony:
        from harmony.render import parse_completion

        parsed = parse_completion(list(token_ids))
        return Generation(parsed["final"] or "", parsed["analysis"], final_missing=parsed["final"] is None)
    return Generation(tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens).strip())


@torch.no_grad()
def generate(
    model,
    tokenizer,
    messages_list: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    reasoning_effort: str = "low",
    skip_special_tokens: bool = True,
    progress: bool = True,
) -> list[Generation]:
    """Greedy answers, one per conversation, in order, prompted and read as `prompt_ids` / `read_generation` say.

    `reasoning_effort` is the harmony setting SFT trained with (GPT-OSS only); `skip_special_tokens`
    applies to chat-template models (a harmony answer is parsed from its tokens).
    """
    prompts = prompt_ids(model, tokenizer, messages_list, reasoning_effort=reasoning_effort)
    answers = decode(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     skip_special_tokens=skip_special_tokens, progress=progress)  # fmt: skip
    return [only for (only,) in answers]


@torch.no_grad()
def decode(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    sampling: dict | None = None,
    num_return_sequences: int = 1,
    skip_special_tokens: bool = True,
    progress: bool = True,
) -> list[list[Generation]]:
    """The one decoding loop: `num_return_sequences` answers per prompt (token ids), in order; greedy, or
    sampled with `sampling` ({temperature, top_p, top_k}). Left-padded batches, the model's stop tokens,
    the padding after each stop dropped, each answer read by `read_generation`."""
    harmony = uses_harmony(model)
    device = next(model.parameters()).device
    stop_ids = _eos_ids(model, tokenizer)
    options = (
        {"do_sample": True, **sampling}
        if sampling is not None
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    answers: list[list[Generation]] = [[] for _ in prompts]
    with _eval_mode(model):
        for batch in tqdm(length_sorted_batches(list(prompts), batch_size), desc="generating", unit="batch", disable=not progress):
            enc = _left_padded(tokenizer, [prompts[i] for i in batch], device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_return_sequences,
                eos_token_id=sorted(stop_ids),
                pad_token_id=tokenizer.pad_token_id,
                **options,
                **no_router_logits(model),  # GPT-OSS's aux-loss path fails on padded batches while decoding
            )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            keep = _response_mask(new_tokens, stop_ids).bool()  # drop the padding after each stop token
            # generate() returns each prompt's sequences next to each other
            for row, (tokens, kept) in enumerate(zip(new_tokens, keep)):
                answers[batch[row // num_return_sequences]].append(
                    read_generation(tokenizer, tokens[kept].tolist(), harmony=harmony,
                                    skip_special_tokens=skip_special_tokens)  # fmt: skip
                )
    return answers


def generate_responses(
    model,
    tokenizer,
    messages_list: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    skip_special_tokens: bool = True,
    progress: bool = True,
    reasoning_effort: str = "low",
) -> list[str]:
    """Greedy responses, one per conversation, in order: the text that is scored (see `generate`).

    For GPT-OSS that is the final channel of each harmony answer, "" where there is none.
    """
    generations = generate(
        model, tokenizer, messages_list, max_new_tokens=max_new_tokens, batch_size=batch_size,
        reasoning_effort=reasoning_effort, skip_special_tokens=skip_special_tokens, progress=progress,
    )  # fmt: skip
    return [g.response for g in generations]


# ----------------------------------------------------------------------------------------------
# Answer and text metrics


def response_explanation(response: str) -> str:
    """The explanation part of a response: after 'Explanation:', else everything after an 'Answer:' line."""
    if EXPLANATION_MARKER in response:
        return response.split(EXPLANATION_MARKER, 1)[1].strip()
    lines = response.strip().splitlines()
    if lines and lines[0].strip().lower().startswith("answer"):
        lines = lines[1:]
    return "\n".join(lines).strip()


def text_overlap(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | int]:
    """ROUGE-L F1 (mean over pairs, 0-1, Porter stemming) and corpus BLEU (sacrebleu, 0-100)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ClinalignError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ClinalignError("text_overlap needs at least one prediction/reference pair")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)])
    return {"rougeL": sum(rouge) / len(rouge), "bleu": bleu.score, "n": len(rouge)}


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100) of predictions against one reference each."""
    import sacrebleu

    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score


def text_overlap_items(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """Per pair: ROUGE-L F1 (as `text_overlap`) and sentence BLEU (`sacrebleu.sentence_bleu`, 0-100)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ClinalignError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return {
        "rougeL": [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)],
        "bleu": [sacrebleu.sentence_bleu(pred, [ref]).score for pred, ref in zip(predictions, references)],
    }


def answer_items(records: Sequence[Record], responses: Sequence[str]) -> dict[str, list]:
    """One value per record for each metric of `answer_metrics` (None where it does not apply).

    `gen_acc` / `exact_match`: bool for labeled records, None otherwise; `no_answer`: bool;
    `rougeL` / `bleu` (sentence BLEU): float for records with a reference explanation, None otherwise;
    `explanation` / `reference`: the generated and reference explanation texts (None where no reference).
    """
    from clinalign.factuality import extract_answer  # written alongside; imported when used

    if len(records) != len(responses):
        raise ClinalignError(f"{len(records)} records but {len(responses)} responses")

    def first_line(text: str) -> str:
        return normalize_text(text.strip().split("\n", 1)[0]).casefold()

    extracted = [extract_answer(response, record.choices) for record, response in zip(records, responses)]
    explained = [i for i, r in enumerate(records) if r.explanation]
    hypotheses = [response_explanation(responses[i]) for i in explained]
    overlap = text_overlap_items(hypotheses, [records[i].explanation for i in explained])
    items: dict[str, list] = {
        "gen_acc": [None if r.answer is None else e == r.answer for r, e in zip(records, extracted)],
        "exact_match": [None if r.answer is None else first_line(resp) == first_line(answer_line(r))
                        for r, resp in zip(records, responses)],
        "no_answer": [e is None for e in extracted],
        "answer": extracted,
    }
    for key in ("rougeL", "bleu", "explanation", "reference"):
        items[key] = [None] * len(records)
    for j, i in enumerate(explained):
        items["rougeL"][i], items["bleu"][i] = overlap["rougeL"][j], overlap["bleu"][j]
        items["explanation"][i], items["reference"][i] = hypotheses[j], records[i].explanation
    return items


def answer_metrics(records: Sequence[Record], responses: Sequence[str]) -> dict[str, float | int | None]:
    """Metrics of generated responses against their records.

    - `acc`: the answer extracted by `clinalign.factuality.extract_answer` equals the gold answer
      (no answer counts as wrong), over the `n` labeled records;
    - `exact_match`: the response's first line is exactly the reference answer line of the trained
      format ('Answer: B. <option text>' / 'Answer: yes'), up to whitespace and case;
    - `no_answer`: share of all responses with no extractable answer;
    - `rougeL`, `bleu`: the generated explanations against the `n_explained` records that have a
      reference explanation (None when none has).
    """
    items = answer_items(records, responses)

    def share(flags: list) -> float | None:
        known = [f for f in flags if f is not None]
        return sum(known) / len(known) if known else None

    explained = [i for i, e in enumerate(items["reference"]) if e is not None]
    n = sum(r.answer is not None for r in records)
    return {
        "acc": share(items["gen_acc"]),
        "exact_match": share(items["exact_match"]),
        "no_answer": share(items["no_answer"]),
        "n": n,
        "rougeL": sum(items["rougeL"][i] for i in explained) / len(explained) if explained else None,
        "bleu": corpus_bleu([items["explanation"][i] for i in explained], [items["reference"][i] for i in explained])
        if explained else None,
        "n_explained": len(explained),
    }


# ----------------------------------------------------------------------------------------------
# Completion NLL: the held-out loss SFT minimises, per record


def trained_example(model, tokenizer, record: Record, *, reasoning_effort: str = "low") -> tuple[list[int], list[int]]:
    """(input ids, completion mask) of a record's SFT example, as sft/run.py trains it: harmony's render for
    GPT-OSS; otherwise the chat template over the prompt and prompt + reply, the reply's tokens marked."""
    if uses_harmony(model):
        from harmony.render import render_for_training

        example = render_for_training(record, reasoning_effort=reasoning_effort)
        return example["input_ids"], example["completion_mask"]
    example = to_chat_example(record)
    kwargs = {"tokenize": True, "return_dict": True}
    prompt = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, **kwargs)["input_ids"]
    full = tokenizer.apply_chat_template(example["prompt"] + example["completion"], **kwargs)["input_ids"]
    if full[: len(prompt)] != prompt:
        raise ClinalignError(f"record {record.id}: the chat template renders the prompt differently inside the reply")
    return full, [0] * len(prompt) + [1] * (len(full) - len(prompt))


@torch.no_grad()
def completion_nll(
    model, tokenizer, records: Sequence[Record], *, batch_size: int = 8, reasoning_effort: str = "low"
) -> list[float]:
    """Mean negative log-likelihood per reply token of each labelled record's trained reply (answer line,
    then explanation) given its prompt, in the format SFT trains on; lower is better."""
    examples = [trained_example(model, tokenizer, r, reasoning_effort=reasoning_effort) for r in records]
    values: list[float] = [0.0] * len(examples)
    device = next(model.parameters()).device
    with _eval_mode(model):
        for batch in length_sorted_batches([ids for ids, _ in examples], batch_size):
            width = max(len(examples[i][0]) for i in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention, scored = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
            for row, i in enumerate(batch):  # right padding: positions need no offset
                tokens, mask = examples[i]
                ids[row, : len(tokens)] = torch.tensor(tokens)
                attention[row, : len(tokens)] = 1
                scored[row, : len(tokens)] = torch.tensor(mask, dtype=torch.bool)
            # Only positions from the batch's earliest reply token on reach the vocabulary projection
            # (position t predicts token t + 1): a long prompt's logits are never made, which for
            # GPT-OSS's 201k-token vocabulary is most of the memory of the batch.
            first = int(scored.int().argmax(-1).min())
            logits = model(
                input_ids=ids.to(device), attention_mask=attention.to(device), logits_to_keep=width - first + 1,
                **no_router_logits(model),
            ).logits  # fmt: skip
            targets, scored = ids[:, first:].to(device), scored[:, first:].to(device)
            logp = torch.log_softmax(logits[:, :-1][scored].float(), dim=-1).gather(-1, targets[scored][:, None])
            for i, row in zip(batch, torch.split(logp.squeeze(-1), scored.sum(-1).tolist()), strict=True):
                values[i] = -row.mean().item()
    return values


# ----------------------------------------------------------------------------------------------
# KL to a reference


def kl_estimators(
    logp_model: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of the k1 and k3 KL(model || ref) estimators over the masked tokens.

    With tokens sampled from the model and log r = logp_ref - logp_model per token:
    k1 = -log r (unbiased, can be negative), k3 = (r - 1) - log r (unbiased, never negative).
    Inputs are [batch, tokens]; returns two [batch] tensors.
    """
    mask = mask.to(torch.float64)
    log_ratio = logp_ref.to(torch.float64) - logp_model.to(torch.float64)
    k1 = (-log_ratio * mask).sum(-1)
    k3 = ((torch.expm1(log_ratio) - log_ratio) * mask).sum(-1)
    return k1, k3


def _response_mask(response_ids: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """1 for generated tokens up to and including the first EOS; 0 for the padding after it."""
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= response_ids == eos
    ended_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~ended_before).long()


@torch.no_grad()
def _response_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, n_response: int) -> torch.Tensor:
    device = next(model.parameters()).device
    sequences, attention_mask = sequences.to(device), attention_mask.to(device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=positions,
        logits_to_keep=n_response + 1,
        **no_router_logits(model),
    ).logits[:, :-1]
    targets = sequences[:, -n_response:]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1).cpu()


def _eos_ids(model, tokenizer) -> set[int]:
    """Where a generated answer ends: the model's and tokenizer's EOS, plus harmony's `<|return|>` and
    `<|call|>` for GPT-OSS (not `<|end|>`: it closes the analysis message, and the final one follows)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if uses_harmony(model):
        from harmony.render import TERMINAL_TOKENS

        ids.update(TERMINAL_TOKENS)
    return ids


def kl_to_reference(
    model,
    reference,
    tokenizer,
    messages_list: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int = 64,
    num_samples: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    reasoning_effort: str = "low",
) -> dict[str, float | int]:
    """KL(model || reference) per sequence on responses sampled from the model (temperature 1, no top-k/p).

    `reference` is another model sharing the tokenizer, None for the same PeftModel with its
    adapters disabled, or the name of another adapter of that PeftModel (TRL's frozen "ref"). Returns the mean over sequences of the k1 and k3 sums (nats per sequence),
    the number of sequences `n` and their mean response length in tokens, and `per_prompt` (k1 and k3 per
    prompt, averaged over its samples, in the order of `messages_list`: what a paired comparison pairs). Prompts and stop tokens are
    the model's own format (`prompt_ids`: harmony with `reasoning_effort` for GPT-OSS); for harmony
    the whole sampled turn counts (analysis and final channels).
    """
    if not messages_list:
        raise ClinalignError("kl_to_reference needs at least one prompt")
    if (reference is None or isinstance(reference, str)) and not hasattr(model, "disable_adapter"):
        raise ClinalignError("reference=None means 'the model without its adapters': the model has no adapters")
    prompts = prompt_ids(model, tokenizer, messages_list, reasoning_effort=reasoning_effort)
    device = next(model.parameters()).device
    eos_ids = _eos_ids(model, tokenizer)
    k1_all, k3_all, lengths, owners = [], [], [], []
    batches = length_sorted_batches(prompts, batch_size)
    with _eval_mode(model), torch.random.fork_rng():
        torch.manual_seed(seed)
        for batch in tqdm(batches, desc="KL to reference", unit="batch", disable=not progress):
            enc = _left_padded(tokenizer, [prompts[i] for i in batch], device)
            with torch.no_grad():
                sequences = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    num_return_sequences=num_samples,
                    eos_token_id=sorted(eos_ids),
                    pad_token_id=tokenizer.pad_token_id,
                    **no_router_logits(model),
                )
            n_prompt = enc["input_ids"].shape[1]
            response_mask = _response_mask(sequences[:, n_prompt:], eos_ids)
            attention = torch.cat([enc["attention_mask"].repeat_interleave(num_samples, 0), response_mask], dim=1)
            n_response = sequences.shape[1] - n_prompt
            logp_model = _response_logprobs(model, sequences, attention, n_response)
            if reference is None or isinstance(reference, str):
                # the model's own base (adapters disabled) or another adapter of it (e.g. TRL's frozen "ref")
                with use_adapter(model, reference):
                    logp_ref = _response_logprobs(model, sequences, attention, n_response)
            else:
                with _eval_mode(reference):
                    logp_ref = _response_logprobs(reference, sequences, attention, n_response)
            k1, k3 = kl_estimators(logp_model, logp_ref, response_mask.cpu())
            k1_all += k1.tolist()
            k3_all += k3.tolist()
            lengths += response_mask.sum(-1).tolist()
            owners += [i for i in batch for _ in range(num_samples)]  # generate() repeats each prompt in place
    n = len(k1_all)
    per_prompt = {"kl_k1": [[] for _ in prompts], "kl_k3": [[] for _ in prompts]}
    for owner, k1, k3 in zip(owners, k1_all, k3_all):
        per_prompt["kl_k1"][owner].append(k1)
        per_prompt["kl_k3"][owner].append(k3)
    return {
        "kl_k1": sum(k1_all) / n,
        "kl_k3": sum(k3_all) / n,
        "n": n,
        "mean_response_tokens": sum(lengths) / n,
        "per_prompt": {key: [sum(v) / len(v) for v in values] for key, values in per_prompt.items()},
    }
