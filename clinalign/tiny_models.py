"""Tiny random models for tests and smoke runs: a fixed-corpus BPE tokenizer and a 2-layer Llama.

Built offline and deterministically (fixed seed); clinalign.model_store caches them under the
built-in name `tiny-llama` (harmony.gpt_oss builds `tiny-gpt-oss` from the same pieces).
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_SEED = 1234

# A short fixed corpus: enough for a byte-level BPE to learn medical sub-words; every byte is in the
# initial alphabet, so any text still tokenizes.
_TINY_CORPUS = """
Question: A 45-year-old man presents with crushing chest pain radiating to the left arm.
Which of the following is the most likely diagnosis? Options: A. Myocardial infarction B. Pericarditis
C. Pneumothorax D. Costochondritis. Answer: A. Myocardial infarction. Explanation: the history is typical.
Does metformin reduce mortality in type 2 diabetes? Answer: yes. Context: randomized controlled trial.
The patient should call emergency services immediately. Please consult your doctor or pharmacist.
Which vitamin deficiency causes scurvy? Vitamin C. Which nerve supplies the deltoid? Axillary nerve.
Hypertension, tachycardia, bradycardia, anaphylaxis, epinephrine, stroke, aspirin, insulin, dose mg.
""".strip()

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a fixed corpus, with a ChatML chat template.

    It has no pad token on purpose, like many real models: loaders must add one (see `ensure_pad_token`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    tokenizer.chat_template = _CHATML_TEMPLATE
    return tokenizer


def tiny_shape(tokenizer) -> dict:
    """The config fields every tiny model shares: 2 layers of width 64, 4 heads over 2 KV heads."""
    return dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)  # fmt: skip


def save_seeded(model_class, config, tokenizer, out: Path) -> None:
    """`model_class(config)` with weights drawn from TINY_SEED, saved with its tokenizer into `out`."""
    torch.manual_seed(TINY_SEED)
    model_class(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_tiny_llama(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        **tiny_shape(tokenizer), intermediate_size=128, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id
    )
    save_seeded(LlamaForCausalLM, config, tokenizer, out)
