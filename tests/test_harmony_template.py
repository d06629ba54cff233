"""One GPT-OSS format for every stage: the Jinja template TRL's trainers use (reward model, DPO, PPO)
renders token for token what openai-harmony renders for SFT and eval (harmony/render.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clinalign.data import load_records, sample_path
from clinalign.prompts import answer_completion, free_text_messages, prompt_messages
from clinalign.tasks import load_safety_prompts
from harmony.render import render_for_training, render_messages_for_completion, use_harmony_template
from harmony.vocab import gpt_oss_tokenizer, vocab_file

pytestmark = pytest.mark.skipif(vocab_file() is None, reason="needs the o200k vocabulary (TIKTOKEN_ENCODINGS_BASE)")
DATE = "2026-12-05"


@pytest.fixture(scope="module")
def tokenizer():
    return use_harmony_template(gpt_oss_tokenizer())


def _records():
    return [r for family in ("pubmedqa", "medmcqa", "medqa") for r in load_records(sample_path(family)).records]


def _ids(tokenizer, messages, effort, **kwargs):
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, reasoning_effort=effort, current_date=DATE, **kwargs
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("effort", ["low", "high"])
def test_prompts_of_every_record_and_safety_prompt_are_token_identical(tokenizer, effort):
    conversations = [prompt_messages(r) for r in _records()]
    conversations += [free_text_messages(p.prompt) for p in load_safety_prompts()]
    assert len(conversations) >= 150
    for messages in conversations:
        expected = render_messages_for_completion(messages, reasoning_effort=effort, current_date=DATE)
        assert _ids(tokenizer, messages, effort, add_generation_prompt=True) == expected


def test_training_renders_with_and_without_rationale_are_token_identical(tokenizer):
    checked = 0
    for record in _records():
        if record.answer is None:
            continue
        for rationale in (None, record.explanation):
            expected = render_for_training(record, rationale=rationale, current_date=DATE)["input_ids"]
            reply = {"role": "assistant", "content": answer_completion(record)}
            if rationale and rationale.strip():
                reply["thinking"] = rationale
            assert _ids(tokenizer, prompt_messages(record) + [reply], "low") == expected
            checked += 1
    assert checked >= 150


def test_the_completion_trl_splits_off_is_harmony_training_mask(tokenizer):
    # TRL renders prompt (with generation prompt) and prompt + completion, and trains on the difference:
    # that difference must be exactly what SFT's completion_mask marks.
    record = next(r for r in _records() if r.explanation)
    reply = {"role": "assistant", "content": answer_completion(record)}
    prompt = _ids(tokenizer, prompt_messages(record), "low", add_generation_prompt=True)
    full = _ids(tokenizer, prompt_messages(record) + [reply], "low")
    trained = render_for_training(record, current_date=DATE)
    assert full[: len(prompt)] == prompt
    assert [i for i, m in zip(trained["input_ids"], trained["completion_mask"]) if m] == full[len(prompt):]


def test_trl_gptoss_template_is_not_harmony(tokenizer):
    # Why the project ships its own template: TRL's (like the hub's) adds a blank line after the
    # developer instructions. If upstream ever matches harmony, this fails and the template can go.
    import trl

    messages = prompt_messages(_records()[0])
    stock = gpt_oss_tokenizer()
    stock.chat_template = (Path(trl.__file__).parent / "chat_templates" / "gptoss.jinja").read_text()
    text = stock.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, reasoning_effort="low")
    date = text[text.index("Current date: ") + 14 :][:10]
    ids = stock(text.replace(date, DATE), add_special_tokens=False)["input_ids"]
    assert ids != render_messages_for_completion(messages, current_date=DATE)
    # The one difference: "\n\n" after the developer instructions.
    assert text.replace(date, DATE).replace("\n\n<|end|><|start|>user", "<|end|><|start|>user") == tokenizer.decode(
        render_messages_for_completion(messages, current_date=DATE)
    )


def test_gpt_oss_tokenizers_loaded_by_the_toolkit_carry_the_harmony_template(tmp_path):
    from clinalign.models import load_tokenizer

    saved = gpt_oss_tokenizer()
    import trl

    saved.chat_template = (Path(trl.__file__).parent / "chat_templates" / "gptoss.jinja").read_text()
    saved.save_pretrained(tmp_path)  # a hub-style GPT-OSS tokenizer with the stock template
    (tmp_path / "config.json").write_text('{"model_type": "gpt_oss"}')
    assert load_tokenizer(str(tmp_path)).chat_template == use_harmony_template(gpt_oss_tokenizer()).chat_template
