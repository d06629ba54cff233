"""The o200k harmony vocabulary, offline.

openai-harmony reads `$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken` (and checks its sha256), or
downloads it. This module finds that file, loads the harmony encoding with one clear error when it
cannot, and builds a Hugging Face tokenizer with the same token ids (for TRL, which wants a
`processing_class`, and for decoding), cached under `$CLINALIGN_HOME`.
"""

from __future__ import annotations

import base64
import functools
import os
from pathlib import Path

from clinalign.model_store import home

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_SIZE = 201088  # o200k_base ranks (199,998) + harmony special and reserved tokens up to 201,087

# o200k's pre-tokenizer pattern (tiktoken's o200k_base definition).
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

HARMONY_SPECIAL_TOKENS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}


class VocabularyMissing(RuntimeError):
    pass


def vocab_file() -> Path | None:
    """`$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken` when that file exists, else None."""
    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if base and (Path(base) / VOCAB_FILE).is_file():
        return Path(base) / VOCAB_FILE
    return None


@functools.cache
def load_encoding():
    """The harmony GPT-OSS encoding, or one error that says which variable to set."""
    from openai_harmony import HarmonyEncodingName, HarmonyError, load_harmony_encoding

    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except HarmonyError as e:
        raise VocabularyMissing(
            f"openai-harmony could not load the o200k vocabulary ({e}). Offline, set TIKTOKEN_ENCODINGS_BASE to a "
            f"folder holding {VOCAB_FILE} (sha256 {VOCAB_SHA256[:12]}...), e.g. ../shared/vendor"
        ) from None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE tokenizers."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _build_tokenizer_json(path: Path, out: Path) -> None:
    """Write a `tokenizers` BPE with o200k's ranks as ids; merges are recovered from the ranks."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    byte_map = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        # tiktoken merges any adjacent pair whose concatenation is a token, lowest resulting rank
        # first; a BPE merge list reproduces that when it holds every split of every token, ordered
        # by the rank of the token the merge produces.
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], to_str(left), to_str(right)))
    merges.sort()
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], ignore_merges=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    named = {v: k for k, v in HARMONY_SPECIAL_TOKENS.items()}
    specials = [named.get(i, f"<|reserved_{i}|>") for i in range(len(ranks), VOCAB_SIZE)]
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bpe.save(str(out))


def gpt_oss_tokenizer():
    """A `PreTrainedTokenizerFast` with the o200k harmony ids, or None when the vocabulary is absent.

    Built once (a few seconds) and cached; later calls load the cached tokenizer.json.
    """
    from transformers import PreTrainedTokenizerFast

    path = vocab_file()
    if path is None:
        return None
    cache = home() / "tokenizers" / "o200k_harmony.json"
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
        _build_tokenizer_json(path, tmp)
        os.replace(tmp, cache)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(cache),
        bos_token="<|startoftext|>",
        eos_token="<|return|>",
        pad_token="<|endoftext|>",
    )
    # clinalign's harmony template (token-identical to openai-harmony's render), not TRL's gptoss.jinja.
    tokenizer.chat_template = (Path(__file__).with_name("chat_template.jinja")).read_text()
    return tokenizer
