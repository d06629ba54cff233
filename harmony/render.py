"""Records <-> harmony token ids, with openai-harmony's renderer and parser (no hand-written template).

The conversation for a record:

    system      model identity, knowledge cutoff, current date, reasoning effort (harmony's own text)
    developer   # Instructions  CLINICAL_INSTRUCTIONS          (clinalign.prompts)
    user        question_text(record)                          (clinalign.prompts)
    assistant   [analysis: rationale]  final: answer_completion(record)   (training only)

That is `prompt_messages(record)` in harmony's layout; `render_messages_for_completion` renders any
chat messages (a free-text safety prompt) in the same layout.

`render_for_completion` stops after `<|start|>assistant`, so the model itself writes the channel
header; `render_for_training` renders the same prefix and the assistant turn, and its
`completion_mask` marks everything after that prefix: the channel headers, the optional analysis
message, the final message and the closing `<|return|>` (harmony's training render swaps the final
`<|end|>` for `<|return|>`, the token the model emits at inference to stop).
"""

from __future__ import annotations

import datetime
from pathlib import Path

from clinalign.errors import ClinalignError
from clinalign.prompts import answer_completion, prompt_messages
from clinalign.records import Record
from harmony.vocab import HARMONY_SPECIAL_TOKENS, load_encoding

REASONING_EFFORTS = ("low", "medium", "high")
KNOWLEDGE_CUTOFF = "2024-06"  # GPT-OSS's own cutoff, as its chat template states it
START = HARMONY_SPECIAL_TOKENS["<|start|>"]
# A turn that ends with one of these is over: the model stops generating there.
TERMINAL_TOKENS = (HARMONY_SPECIAL_TOKENS["<|return|>"], HARMONY_SPECIAL_TOKENS["<|call|>"])
# The same layout as a Jinja chat template, for TRL's trainers (pinned against openai-harmony by a test).
CHAT_TEMPLATE = Path(__file__).with_name("chat_template.jinja")


def use_harmony_template(tokenizer):
    """Give a GPT-OSS tokenizer clinalign's harmony template, so every stage renders one format.

    The hub's and TRL's gptoss templates differ from openai-harmony's renderer (they add a blank line
    after the developer instructions), so a model trained by SFT on harmony renders would be
    preferred, optimised and rewarded on another prompt. Returns the tokenizer.
    """
    tokenizer.chat_template = CHAT_TEMPLATE.read_text()
    return tokenizer


def _conversation(record: Record, reasoning_effort: str, current_date: str | None, assistant: list | None = None):
    return _messages_conversation(prompt_messages(record), reasoning_effort, current_date, assistant)


def _messages_conversation(
    messages: list[dict[str, str]], reasoning_effort: str, current_date: str | None, assistant: list | None = None
):
    """System (harmony's own), developer (a leading system message's text), then the user/assistant turns."""
    from openai_harmony import (
        Conversation,
        DeveloperContent,
        Message,
        ReasoningEffort,
        Role,
        SystemContent,
    )

    if reasoning_effort not in REASONING_EFFORTS:
        raise ClinalignError(
            f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {reasoning_effort!r}"
        )
    system = (
        SystemContent.new()
        .with_reasoning_effort(ReasoningEffort(reasoning_effort.capitalize()))
        .with_knowledge_cutoff(KNOWLEDGE_CUTOFF)
        .with_conversation_start_date(current_date or datetime.date.today().isoformat())
    )
    rendered = [Message.from_role_and_content(Role.SYSTEM, system)]
    for position, message in enumerate(messages):
        role, text = message.get("role"), message.get("content")
        if not isinstance(text, str):
            raise ClinalignError(f"message {position} ({role}) has no text content")
        if role in ("system", "developer") and position == 0:
            # The chat format's system message holds our instructions: harmony's developer message.
            rendered.append(
                Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(text))
            )
        elif role == "user":
            rendered.append(Message.from_role_and_content(Role.USER, text))
        elif role == "assistant":  # an earlier turn: its answer, as the final channel
            rendered.append(Message.from_role_and_content(Role.ASSISTANT, text).with_channel("final"))
        else:
            raise ClinalignError(
                f"message {position} has role {role!r}: harmony prompts take one leading system message, "
                "then user and assistant turns"
            )
    for channel, text in assistant or []:
        rendered.append(Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel))
    return Conversation.from_messages(rendered)


def render_for_completion(
    record: Record, *, reasoning_effort: str = "low", current_date: str | None = None
) -> list[int]:
    """Token ids of the prompt for `record`, ending with `<|start|>assistant` (the model writes the rest)."""
    from openai_harmony import Role

    conversation = _conversation(record, reasoning_effort, current_date)
    return load_encoding().render_conversation_for_completion(conversation, Role.ASSISTANT)


def render_messages_for_completion(
    messages: list[dict[str, str]], *, reasoning_effort: str = "low", current_date: str | None = None
) -> list[int]:
    """`render_for_completion` for chat messages (the safety prompt set, external prompts).

    The same layout: a leading system message becomes the developer instructions, so
    `render_messages_for_completion(prompt_messages(record))` equals `render_for_completion(record)`.
    """
    from openai_harmony import Role

    conversation = _messages_conversation(messages, reasoning_effort, current_date)
    return load_encoding().render_conversation_for_completion(conversation, Role.ASSISTANT)


def render_for_training(
    record: Record,
    response: str | None = None,
    *,
    rationale: str | None = None,
    reasoning_effort: str = "low",
    current_date: str | None = None,
) -> dict[str, list[int]]:
    """`{"input_ids", "completion_mask"}` for one SFT example; the mask is 1 exactly on the assistant turn.

    `response` (the final-channel text) defaults to `answer_completion(record)`; `rationale`, when
    given, is trained as an analysis-channel message before it (e.g. `response=answer_line(record),
    rationale=record.explanation`). Feed the result to TRL's SFTTrainer with `completion_only_loss=True`:
    TRL 1.16 ignores a `completion_mask` column otherwise and trains on the whole sequence.
    """
    from openai_harmony import RenderConversationConfig

    if response is None:
        if record.answer is None:
            raise ClinalignError(f"record {record.id} has no answer to train on")
        response = answer_completion(record)
    if not response.strip():
        raise ClinalignError(f"record {record.id}: empty response to train on")
    assistant = ([("analysis", rationale)] if rationale and rationale.strip() else []) + [("final", response)]
    encoding = load_encoding()
    prompt = render_for_completion(record, reasoning_effort=reasoning_effort, current_date=current_date)
    conversation = _conversation(record, reasoning_effort, current_date, assistant)
    # Keep the analysis message: harmony drops it from training renders by default.
    input_ids = encoding.render_conversation_for_training(
        conversation, RenderConversationConfig(auto_drop_analysis=False)
    )
    if input_ids[: len(prompt)] != prompt:  # the mask below relies on it
        raise RuntimeError("openai-harmony's training render does not start with its completion prompt")
    return {"input_ids": input_ids, "completion_mask": [0] * len(prompt) + [1] * (len(input_ids) - len(prompt))}


def parse_completion(tokens_or_text: list[int] | str) -> dict:
    """Split a generated assistant turn into `{"analysis", "final", "complete"}`.

    Takes the generated token ids (or their text with special tokens kept, e.g.
    `tokenizer.decode(ids, skip_special_tokens=False)`); a whole rendered conversation also works
    (only assistant messages count). Robust to truncation and missing parts: `final` is the first
    final-channel message (or the partial one a truncated generation stopped inside), None when
    there is none; `analysis` joins the analysis messages, None when there are none; `complete` is
    True only when a final message was closed by `<|return|>` or `<|end|>`. A message with no
    channel counts as final. Eval and reward scoring should read `final` only: harmony's analysis
    channel is not held to the safety standard of the final answer.
    """
    from openai_harmony import HarmonyError, Role, StreamableParser

    encoding = load_encoding()
    if isinstance(tokens_or_text, str):
        tokens = encoding.encode(tokens_or_text, allowed_special="all")
    else:
        tokens = [int(t) for t in tokens_or_text]
    # A generation starts after `<|start|>assistant`; a full conversation starts with `<|start|>`.
    parser = StreamableParser(encoding, None if tokens[:1] == [START] else Role.ASSISTANT, strict=False)
    for token in tokens:
        try:
            parser.process(token)
        except HarmonyError:  # a malformed header or stray token: keep what was parsed so far
            break
        if token in TERMINAL_TOKENS:
            break  # anything after the turn's end (padding, a second turn) is not part of the answer
    closed = [
        (m.channel or "final", "".join(c.text for c in m.content))
        for m in parser.messages
        if m.author.role == Role.ASSISTANT
    ]
    analysis = [text for channel, text in closed if channel == "analysis"]
    finals = [text for channel, text in closed if channel == "final"]
    final, complete = (finals[0], True) if finals else (None, False)
    open_channel = parser.current_channel if parser.current_role in (None, Role.ASSISTANT) else None
    if final is None and parser.current_content and open_channel in ("final", None):
        final = parser.current_content  # truncated inside the final message
    elif not finals and open_channel == "analysis" and parser.current_content:
        analysis.append(parser.current_content)  # truncated inside the analysis
    return {"analysis": "\n".join(analysis) if analysis else None, "final": final, "complete": complete}
