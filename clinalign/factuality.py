"""Answer extraction and correctness against the gold answer: used by reward pairs, PPO rewards and eval.

`extract_answer(response, choices)` finds the one choice a response commits to, trying in order:

1. the toolkit's own format (clinalign/prompts.py): a first line "Answer: B. <text>" / "Answer: yes";
2. explicit statements anywhere: "the (correct|final|best) answer is (B)", "Answer: B", "I would choose
   B", "Option B is correct", "In conclusion, yes". A "final answer" wins over other statements;
   statements that disagree are no commitment;
3. a response that opens with a choice: "B.", "b)", "(B)", "Option B: ...", "B - text", "Yes, ...";
4. unless the response hedges ("I'm not sure", "cannot determine", ...): a choice named alone in a
   short reply ("Probably B", "Not B, but C"), then the text of exactly one option restated (the first
   line first, then the whole reply; the longer of two nested option texts wins).

Negated mentions ("not B", "rather than aspirin", "B is incorrect") never count, and naming two
choices ("B or C") is no commitment: the result is then None. A letter wins over option text when
both are given ("Answer: B. <the text of C>" is B).

`score_factuality` scores 1.0 for the gold answer, 0.0 for a wrong one, and 1 / number of choices (the
expected score of a guess) when the response commits to nothing, so hedging never beats answering.
Records without a gold answer but with a reference text are scored by ROUGE-L against it.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from clinalign.errors import ClinalignError
from clinalign.records import DECISIONS, Record

_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.S | re.I)
_MARKDOWN = re.compile(r"[*`]+|__")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " "})

# The toolkit's own answer line, and "Final answer: ..." lines.
_ANSWER_LINE = re.compile(
    r"^[\s>#\-]*(?:the\s+)?(?P<final>final\s+)?(?:correct\s+|best\s+)?answer\s*(?:is\s*)?[:=\-\u2013]\s*(?P<p>.+)$",
    re.I | re.M,
)
_STATEMENTS = [
    re.compile(
        r"\b(?:the\s+)?(?P<final>final\s+)?(?:correct\s+|right\s+|best\s+|most\s+\w+\s+)?(?:answer|option|choice)\s+"
        r"(?:here\s+|then\s+)?(?:is|would\s+be|should\s+be|must\s+be|will\s+be|seems\s+to\s+be|appears\s+to\s+be)"
        r"\s*:?\s*(?P<p>[^\n]+)",
        re.I,
    ),
    re.compile(r"\bI(?:'d|\s+would|\s+will|'ll)?\s+(?:choose|pick|select|go\s+with|say|answer)\s+(?P<p>[^\n]+)", re.I),
    re.compile(r"\banswer\s*[:=]\s*(?P<p>[^\n]+)", re.I),
    re.compile(
        r"(?P<p>(?:option|choice)\s+[A-Za-z]|\([A-Za-z]\)|\b[A-Z])\s+is\s+(?:the\s+)?(?:correct|right|best|most\s+appropriate|most\s+likely)\b",
        re.I,
    ),
]
_CONCLUSION = re.compile(
    r"\b(?:in\s+conclusion|in\s+summary|to\s+conclude|overall|in\s+short|so|therefore|thus),?\s+"
    r"(?P<p>yes|no|maybe)\b(?=\s*[,.;!]|\s*$)",
    re.I,
)
_NEGATED_PAYLOAD = re.compile(r"(?:not|never|neither)\b", re.I)
_HEDGE = re.compile(
    r"\b(?:not\s+sure|unsure|uncertain|cannot\s+(?:be\s+)?(?:determine|determined|tell|say)|can't\s+(?:be\s+)?"
    r"(?:determine|determined|tell|say)|impossible\s+to\s+(?:say|tell|determine)|(?:don't|do\s+not)\s+know|no\s+idea|"
    r"insufficient\s+information|not\s+enough\s+information|unclear|it\s+depends|depending\s+on|could\s+be\s+either|"
    r"(?:yes|no|maybe)\s+or\s+(?:yes|no|maybe))\b",
    re.I,
)
_LETTER_START = re.compile(
    r"\s*(?P<prefix>(?:option|choice)(?:\s+|\s*(?=[(\[])))?(?P<open>[(\[])?\s*(?P<letter>[A-Za-z])\s*(?P<close>[)\]])?(?P<rest>.*)",
    re.I | re.S,
)
_CONNECTOR = re.compile(r"\s+(?:because|since|as|is|seems|looks)\b")
_DECISION_START = re.compile(r"\s*(?P<d>yes|no|maybe)\s*(?:[,.!;:\-\u2013]|$)", re.I)
_BARE_LETTER = re.compile(r"(?<![\w'])\(?([A-Z])\)?(?![\w'])")
_BARE_DECISION = re.compile(r"(?<![\w'])(yes|no|maybe)(?=\s*[,.;!]|\s*$)", re.I)  # "no" before a noun is not a reply
_NEGATORS = re.compile(
    r"\b(?:not|never|neither|nor|except|rather\s+than|instead\s+of|other\s+than|over|unlike)\s*$", re.I
)
_SHORT_REPLY_WORDS = 8
_MIN_LETTERS_FOR_TEXT_MATCH = 3


@dataclasses.dataclass(frozen=True)
class FactualityScore:
    score: float  # 1 correct, 0 wrong, 1/len(choices) no commitment; ROUGE-L F1 for free-text references
    extracted: str | None  # the choice key the response committed to
    gold: str | None
    method: str  # "choice" or "rouge_l"

    @property
    def correct(self) -> bool:
        return self.extracted is not None and self.extracted == self.gold


def _prepare(response: str) -> str:
    text = _THINK.sub("", (response or "").translate(_QUOTES))
    return _MARKDOWN.sub("", text).strip()


def _words(text: str) -> list[str]:
    """Lower-case words, with "n't" spelled "not" so negations survive."""
    return re.findall(r"[a-z0-9]+", re.sub(r"n't\b", " not", text.lower()))


@functools.lru_cache(maxsize=65536)
def _option_words(text: str) -> tuple[str, ...]:
    return tuple(_words(text))


def _is_decision(choices: dict[str, str]) -> bool:
    return set(choices) <= set(DECISIONS)


def _letter_at_start(text: str) -> str | None:
    """The letter a text opens with when it is used as a choice label ("B.", "b)", "(B)", "Option B:")."""
    m = _LETTER_START.match(text)
    if not m:
        return None
    letter, rest = m["letter"], m["rest"]
    if rest[:1].isalnum():  # a word, not a label ("Aspirin", "A patient")
        return None
    upper = letter.upper()
    if m["close"] or m["prefix"]:
        return upper
    if not rest.strip(" \t.:!") or re.match(r"[.:]", rest):
        return upper
    if letter.isupper() and (re.match(r",|\s*[-\u2013\u2014]\s", rest) or _CONNECTOR.match(rest)):
        return upper
    return None


def _option_at_start(text: str, choices: dict[str, str]) -> str | None:
    """The choice whose text a payload opens with (the longest, when one option text extends another)."""
    words = _option_words(text)
    best, best_len = None, 0
    for key, option in choices.items():
        option_words = _option_words(option)
        if option_words and words[: len(option_words)] == option_words and len(option_words) > best_len:
            best, best_len = key, len(option_words)
    return best


def _from_payload(payload: str, choices: dict[str, str]) -> str | None:
    """The choice an answer statement's payload names ("(B) Aspirin", "aspirin", "yes, because ...")."""
    payload = payload.strip(" \t\"'")
    if _NEGATED_PAYLOAD.match(payload):
        return None
    if _is_decision(choices):
        m = _DECISION_START.match(payload) or re.match(r"\s*(yes|no|maybe)\b", payload, re.I)
        return m.group(1).lower() if m and m.group(1).lower() in choices else None
    letter = _letter_at_start(payload)
    if letter is not None:
        return letter if letter in choices else None
    return _option_at_start(payload, choices)


def _negated(text: str, start: int, anywhere: bool = False) -> bool:
    """Whether a negation precedes `start` in its clause: right before it, or `anywhere` in the clause."""
    clause = re.split(r"[.;:!?\n]|,\s*(?:but|however)\b", text[max(0, start - 40) : start])[-1]
    if anywhere and re.search(r"\b(?:not|never|n't)\b|n't\b", clause, re.I):
        return True
    return bool(_NEGATORS.search(clause.rstrip("( ")))


def _statements(text: str, choices: dict[str, str]) -> str | None:
    """The choice named by explicit answer statements (a final answer wins; disagreement is None)."""
    found: list[tuple[int, str, bool]] = []
    patterns = [_ANSWER_LINE, *_STATEMENTS] + ([_CONCLUSION] if _is_decision(choices) else [])
    for pattern in patterns:
        for m in pattern.finditer(text):
            if _negated(text, m.start(), anywhere=True):
                continue
            key = _from_payload(m["p"], choices)
            if key is not None:
                final = bool(m.groupdict().get("final"))
                found.append((m.start(), key, final))
    finals = sorted(f for f in found if f[2])
    if finals:
        return finals[-1][1]
    keys = {key for _, key, _ in found}
    return keys.pop() if len(keys) == 1 else None


def _bare_mentions(text: str, choices: dict[str, str]) -> set[str]:
    """Choices named on their own in a short reply ("Probably B", "Not B, but C"), negated ones dropped."""
    keys = set()
    if _is_decision(choices):
        for m in _BARE_DECISION.finditer(text):
            if not _negated(text, m.start()):
                keys.add(m.group(1).lower())
        return keys
    for m in _BARE_LETTER.finditer(text):
        letter = m.group(1)
        after = text[m.end() : m.end() + 2]
        if letter in ("A", "I") and re.match(r"\s[a-z]", after):  # an article or a pronoun
            continue
        if letter in choices and not _negated(text, m.start()):
            keys.add(letter)
    return keys


def _text_mentions(text: str, choices: dict[str, str]) -> set[str]:
    """Options whose full text appears, not negated and not inside a longer option's match."""
    words = _words(text)
    positions: dict[str, list[int]] = {}
    for i, word in enumerate(words):
        positions.setdefault(word, []).append(i)
    spans = []
    for key, option in choices.items():
        option_words = _option_words(option)
        if sum(len(w) for w in option_words if not w.isdigit()) < _MIN_LETTERS_FOR_TEXT_MATCH:
            continue  # "2", "C" or "IV" would match too much running text
        n = len(option_words)
        for i in positions.get(option_words[0], ()):
            if tuple(words[i : i + n]) == option_words:
                spans.append((i, i + n, key))
    kept = set()
    for start, end, key in spans:
        if any(s <= start and end <= e and (e - s) > (end - start) for s, e, _ in spans):
            continue
        before = " ".join(words[max(0, start - 3) : start])
        if _NEGATORS.search(before) or re.search(r"\b(?:not|never|neither|nor|except)\b", before):
            continue
        kept.add(key)
    return kept


def extract_answer(response: str, choices: dict[str, str]) -> str | None:
    """The choice key (option letter, or yes/no/maybe) a response commits to; None if it commits to none.

    Args:
        response: the model's reply (its final channel for harmony models).
        choices: `record.choices`: {"A": text, ...}, or {"yes": "yes", "no": "no", "maybe": "maybe"}.
    """
    text = _prepare(response)
    if not text or not choices:
        return None
    first_line = text.split("\n", 1)[0]
    m = _ANSWER_LINE.match(first_line)
    if m:  # the trained format: trust its first line
        key = _from_payload(m["p"], choices)
        if key is not None and not _negated(first_line, m.start()):
            return key
    key = _statements(text, choices)
    if key is not None:
        return key
    if _is_decision(choices):
        m = _DECISION_START.match(first_line)
        if m:
            return m["d"].lower()
    else:
        letter = _letter_at_start(first_line)
        if letter in choices:
            return letter
    if _HEDGE.search(text):
        return None
    if len(text.split()) <= _SHORT_REPLY_WORDS:
        keys = _bare_mentions(text, choices)
        if keys:
            return keys.pop() if len(keys) == 1 else None
    if _is_decision(choices):
        return None
    for part in (first_line, text):
        keys = _text_mentions(part, choices)
        if keys:
            return keys.pop() if len(keys) == 1 else None
    return None


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of a prediction against a reference (rouge-score, Porter stemming; English tokens)."""
    return _rouge_scorer().score(reference or "", prediction or "")["rougeL"].fmeasure


def score_factuality(record: Record, response: str, no_commitment: float | None = None) -> FactualityScore:
    """Score a response against a record's gold answer (see the module docstring).

    Args:
        record: a canonical record; unlabeled records need an `explanation` or `answer_text` reference.
        response: the model's reply.
        no_commitment: the score of a reply that commits to no choice (default 1 / number of choices).
    """
    if record.answer is None:
        reference = record.explanation or record.answer_text
        if not reference:
            raise ClinalignError(f"record {record.id!r} has no gold answer and no reference text to score against")
        return FactualityScore(rouge_l(response, reference), None, None, "rouge_l")
    choices = record.choices
    extracted = extract_answer(response, choices)
    if extracted is None:
        score = 1.0 / len(choices) if no_commitment is None else no_commitment
    else:
        score = 1.0 if extracted == record.answer else 0.0
    return FactualityScore(score, extracted, record.answer, "choice")
