"""Multiple-choice accuracy by log-likelihood, exactly as lm-evaluation-harness 0.4 scores it.

The protocol of lm-eval's `pubmedqa`, `medmcqa` and `medqa_4options` tasks (0-shot, no chat
template), so numbers compare with published ones:

    pubmedqa        "Abstract: {contexts joined by \\n}\\nQuestion: {question}\\nAnswer:"
                    choices " yes" / " no" / " maybe"
    medmcqa         "Question: {question}\\nChoices:\\nA. {opa}\\n...D. {opd}\\nAnswer:"   choices " A".." D"
    medqa_4options  "Question: {question}\\nA. {A}\\n...D. {D}\\nAnswer:"               choices " A".." D"

Which layout follows the record: options None -> pubmedqa; source "medmcqa" -> medmcqa; any other
multiple-choice record -> the medqa layout with all its options (a 5-option MedQA record is scored
over A-E and reported as task "medqa", not "medqa_4options").

Each choice is a continuation with a leading space (lm-eval's target_delimiter " "), tokenized as
lm-eval's `_encode_pair` does: encode context + continuation whole and the context alone, and take
the continuation tokens as whole[len(context):]. The model input is context tokens + continuation
tokens (left-truncated to the model's maximum length the way HFLM does); the score is the sum of
the continuation tokens' log-probabilities. acc takes the argmax of the scores, acc_norm the argmax
of score / len(choice) (characters, without the leading space); ties go to the first choice.

`layout="chat"` scores the same choices in the format SFT trains on instead: the tokenizer's chat
template over clinalign.prompts' messages with the generation prompt, then "Answer:" (the trained
reply starts "Answer: B. ..." or "Answer: yes"), encoded without added special tokens as the chat
template's own text. lm-eval's layout is what published numbers use; the chat layout is what the
trained adapter was taught, so a stage can look worse in one and better in the other.

Speed: every option of a question shares the context tokens, so the context runs once. One
forward over a batch of contexts yields the first continuation token of every option (for the
letters and yes/no/maybe of most tokenizers, the whole continuation); only continuations longer
than one token run a second, short forward over the cached context. lm-eval instead runs one
padded sequence per option (or, with its logits cache, per question) and projects every position
onto the vocabulary; here only the positions that are scored are projected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from clinalign.errors import ClinalignError
from clinalign.models import no_router_logits
from clinalign.prompts import prompt_messages
from clinalign.records import DECISIONS, Record
from clinalign.stats import proportion

# lm-eval's defaults (lm_eval.models.utils): the length used when neither config nor tokenizer says.
DEFAULT_MAX_LENGTH = 2048
TOKENIZER_INFINITY = 1000000000000000019884624838656
TARGET_DELIMITER = " "


@dataclasses.dataclass
class McPrediction:
    """One record's scores: `loglikelihoods[i]` belongs to `choices[i]`; pred/gold are choice labels."""

    id: str
    task: str
    choices: list[str]
    loglikelihoods: list[float]
    pred: str
    pred_norm: str
    gold: str | None
    correct: bool | None
    correct_norm: bool | None


# ----------------------------------------------------------------------------------------------
# lm-eval's prompt layouts


def lm_eval_task(record: Record) -> str:
    """The lm-eval task whose layout scores this record: pubmedqa, medmcqa, medqa_4options or medqa."""
    if record.options is None:
        return "pubmedqa"
    if record.source == "medmcqa":
        return "medmcqa"
    return "medqa_4options" if len(record.options) == 4 else "medqa"


def lm_eval_context(record: Record) -> str:
    """The 0-shot context lm-eval's task builds for this record (its `doc_to_text`)."""
    task = lm_eval_task(record)
    if task == "pubmedqa":
        # lm-eval joins the abstract's sections with newlines; a converter that kept them as a list
        # in meta["contexts"] lets us do the same, otherwise the (whitespace-normalized) context is used.
        sections = record.meta.get("contexts")
        contexts = "\n".join(sections) if isinstance(sections, list) else (record.context or "")
        return f"Abstract: {contexts}\nQuestion: {record.question}\nAnswer:"
    options = "".join(f"{letter}. {text}\n" for letter, text in record.options.items())
    if task == "medmcqa":
        return f"Question: {record.question}\nChoices:\n{options}Answer:"
    return f"Question: {record.question}\n{options}Answer:"


def chat_context(tokenizer, record: Record) -> str:
    """The trained prompt up to the answer: the chat template's rendering, generation prompt, "Answer:"."""
    messages = prompt_messages(record)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + "Answer:"


def lm_eval_choices(record: Record) -> list[str]:
    """The choice strings (without the delimiter): yes/no/maybe or the option letters."""
    return list(DECISIONS) if record.options is None else list(record.options)


# ----------------------------------------------------------------------------------------------
# Tokenization, as lm-eval's HFLM does it


def max_length(model, tokenizer) -> int:
    """HFLM's maximum sequence length: config n_positions / max_position_embeddings / n_ctx, else the tokenizer's."""
    config = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max != TOKENIZER_INFINITY:
        return int(model_max)
    return DEFAULT_MAX_LENGTH


def _encode(tokenizer, text: str, special_tokens: bool = True) -> list[int]:
    if not special_tokens:  # a chat template's text carries its own special tokens
        return tokenizer.encode(text, add_special_tokens=False)
    # HFLM.tok_encode: the tokenizer's own special-token default, unless the text already starts
    # with the prefix (BOS, else EOS) token.
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix_id is not None and text.startswith(tokenizer.decode(prefix_id)):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_pair(
    tokenizer, context: str, continuation: str, special_tokens: bool = True
) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing spaces move to the continuation, which is cut from the joint encoding."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = _encode(tokenizer, context + continuation, special_tokens)
    context_ids = _encode(tokenizer, context, special_tokens)
    return context_ids, whole[len(context_ids) :]


@dataclasses.dataclass
class _Question:
    record: Record
    task: str
    choices: list[str]
    context_ids: list[int]
    continuations: list[list[int]]

    def fits(self, limit: int) -> bool:
        return all(len(self.context_ids) + len(c) <= limit + 1 for c in self.continuations)


def _question(tokenizer, record: Record, layout: str = "lm_eval") -> _Question:
    if not record.question:
        raise ClinalignError(f"record {record.id}: empty question, cannot be scored")
    chat = layout == "chat"
    context = chat_context(tokenizer, record) if chat else lm_eval_context(record)
    choices = lm_eval_choices(record)
    pairs = [encode_pair(tokenizer, context, TARGET_DELIMITER + choice, not chat) for choice in choices]
    if any(not continuation for _, continuation in pairs):
        raise ClinalignError(f"record {record.id}: a choice encodes to no tokens after its context")
    return _Question(record, lm_eval_task(record), choices, pairs[0][0], [c for _, c in pairs])


# ----------------------------------------------------------------------------------------------
# Scoring


def _pad(rows: Sequence[Sequence[int]], pad_id: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _score_shared_context(model, questions: list[_Question], pad_id: int) -> list[list[float]]:
    """Score a batch of questions with each context run once (see the module docstring)."""
    device = _device(model)
    # Contexts are left-padded (with explicit positions, as generate does) so that every row's last
    # context token sits in the last slot: a sliding-window cache then keeps each row's own tokens.
    ids, mask = _pad([q.context_ids for q in questions], pad_id, left=True)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    tails = [(qi, oi) for qi, q in enumerate(questions) for oi, c in enumerate(q.continuations) if len(c) > 1]
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        logits_to_keep=1,
        use_cache=bool(tails),
        **no_router_logits(model),
    )
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()
    scores = [[first[qi, c[0]].item() for c in q.continuations] for qi, q in enumerate(questions)]
    if not tails:
        return scores

    # Continuations of several tokens: feed continuation[:-1] after the cached context, one row per
    # such option, at the positions that follow its own context.
    cache = out.cache
    rows = torch.tensor([qi for qi, _ in tails])
    cache.batch_select_indices(rows.to(device))
    tail_ids, tail_mask = _pad([questions[qi].continuations[oi][:-1] for qi, oi in tails], pad_id)
    tail_positions = positions[rows, -1:] + 1 + torch.arange(tail_ids.shape[1])
    tail_out = model(
        input_ids=tail_ids.to(device),
        attention_mask=torch.cat([mask[rows], tail_mask], dim=1).to(device),
        position_ids=tail_positions.to(device),
        cache=cache,
        use_cache=False,
        **no_router_logits(model),
    )
    logprobs = torch.log_softmax(tail_out.logits.float(), dim=-1).cpu()
    for row, (qi, oi) in enumerate(tails):
        targets = torch.tensor(questions[qi].continuations[oi][1:])
        scores[qi][oi] += logprobs[row, torch.arange(len(targets)), targets].sum().item()
    return scores


@torch.no_grad()
def _score_truncated(model, question: _Question, limit: int, pad_id: int) -> list[float]:
    """HFLM's path for a context too long for the model: each option left-truncated on its own."""
    device = _device(model)
    inputs = [(question.context_ids + c)[-(limit + 1) :][:-1] for c in question.continuations]
    ids, mask = _pad(inputs, pad_id)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **no_router_logits(model)).logits
    scores = []
    for row, continuation in enumerate(question.continuations):
        end = len(inputs[row])
        logprobs = torch.log_softmax(logits[row, end - len(continuation) : end].float(), dim=-1).cpu()
        scores.append(logprobs[torch.arange(len(continuation)), torch.tensor(continuation)].sum().item())
    return scores


def choose(choices: Sequence[str], loglikelihoods: Sequence[float]) -> tuple[str, str]:
    """lm-eval's picks: (argmax of the log-likelihoods, argmax of log-likelihood / len(choice)); ties -> first."""
    normed = [ll / len(choice) for choice, ll in zip(choices, loglikelihoods)]
    best = max(range(len(choices)), key=lambda i: (loglikelihoods[i], -i))
    best_norm = max(range(len(choices)), key=lambda i: (normed[i], -i))
    return choices[best], choices[best_norm]


def _prediction(question: _Question, scores: list[float]) -> McPrediction:
    pred, pred_norm = choose(question.choices, scores)
    gold = question.record.answer
    return McPrediction(
        id=question.record.id,
        task=question.task,
        choices=question.choices,
        loglikelihoods=scores,
        pred=pred,
        pred_norm=pred_norm,
        gold=gold,
        correct=None if gold is None else pred == gold,
        correct_norm=None if gold is None else pred_norm == gold,
    )


def score_multiple_choice(
    model, tokenizer, records: Sequence[Record], *, batch_size: int = 8, progress: bool = True, layout: str = "lm_eval"
) -> list[McPrediction]:
    """Log-likelihood of every choice of every record; one prediction per record, in order.

    `layout`: "lm_eval" (lm-eval's protocol) or "chat" (the format SFT trains on; module docstring).
    `batch_size` counts questions per forward pass. Works for base models and PeftModels in any dtype
    (log-probabilities are taken in float32). Raises `ClinalignError` for a record that cannot be scored.
    """
    if batch_size < 1:
        raise ClinalignError(f"batch_size must be at least 1, got {batch_size}")
    if layout not in ("lm_eval", "chat"):
        raise ClinalignError(f"unknown multiple-choice layout '{layout}' (lm_eval or chat)")
    questions = [_question(tokenizer, r, layout) for r in records]
    limit = max_length(model, tokenizer)
    was_training = model.training
    model.eval()  # dropout would make the scores random
    try:
        scores = _score_questions(model, questions, limit, tokenizer, batch_size, progress)
    finally:
        model.train(was_training)
    return [_prediction(q, s) for q, s in zip(questions, scores)]


def _score_questions(model, questions, limit, tokenizer, batch_size, progress) -> list[list[float]]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[list[float] | None] = [None] * len(questions)
    # Longest first, like lm-eval: batches of similar length pad little.
    order = sorted(range(len(questions)), key=lambda i: -len(questions[i].context_ids))
    fitting = [i for i in order if questions[i].fits(limit)]
    bar = tqdm(total=len(questions), desc="log-likelihood scoring", unit="q", disable=not progress)
    for start in range(0, len(fitting), batch_size):
        chunk = fitting[start : start + batch_size]
        for i, s in zip(chunk, _score_shared_context(model, [questions[i] for i in chunk], pad_id)):
            scores[i] = s
        bar.update(len(chunk))
    for i in order:
        if scores[i] is None:
            scores[i] = _score_truncated(model, questions[i], limit, pad_id)
            bar.update(1)
    bar.close()
    return scores


def mc_accuracy(predictions: Sequence[McPrediction]) -> dict[str, float | int | None]:
    """acc and acc_norm over the labeled predictions (`n` of them), each with its Wilson 95% interval
    (`acc_low`, `acc_high`, ...); None when there are none."""
    labeled = [p for p in predictions if p.gold is not None]
    acc, acc_norm = proportion([p.correct for p in labeled]), proportion([p.correct_norm for p in labeled])
    return {
        "acc": acc.value, "acc_low": acc.low, "acc_high": acc.high,
        "acc_norm": acc_norm.value, "acc_norm_low": acc_norm.low, "acc_norm_high": acc_norm.high,
        "n": len(labeled),
    }  # fmt: skip
