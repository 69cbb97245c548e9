"""A long text's first segment is split and normalized alone (text_split.split_head), the
rest after it (split_pieces): together exactly the segments split_text makes of the
whole, whatever the text, and the head's cost bounded by HEAD_MAX_CHARS, not by the text."""

from __future__ import annotations

import functools
import random
import time
from pathlib import Path

import pytest

from csm_triton import constants as C
from csm_triton.core import normalize, text_split

TEXTS = Path(__file__).resolve().parents[2] / "loadtest" / "data" / "texts.txt"
# Five-digit numbers and nothing else: wetext's worst case per character.
NUMBER_SOUP = " ".join(str((n * 7919) % 100_000) for n in range(1, 120)) + ". "
DENSE = "On 2026-12-06 at 10:45am, Dr. Smith paid $5.30 for 3/4 lb at 12 km/h; call 555-0100 or 1st Ave. "


def unbudgeted(pieces):
    """normalize_texts without its time budget: a loaded machine must not change the
    comparison (past the budget, sentences are spoken as written, by design)."""
    return normalize.normalize_texts(pieces, budget_seconds=1e9)


def texts() -> list[str]:
    base = TEXTS.read_text()
    words = base.split()
    rng = random.Random(7)
    made = [
        base * 2,
        (DENSE * 30)[:3000],
        ("Plain prose without any numbers. " * 120)[:4000],
        base[:650],
        ("x" * 290 + ". ") * 5,
        ("1234567890 " * 40 + ". ") * 4,
        "   \n\n   " * 50 + "Hello there. " * 40,
        "A. " * 200,
        NUMBER_SOUP,
        NUMBER_SOUP[:280] + ".",  # fits one segment, yet too many digits for a first one
        "Hi there. " + NUMBER_SOUP,
        "12345 " * 3 + "9" * 60 + " and 7 more. " + "Then words. " * 30,  # a word of digits past the budget
        " " * 320 + NUMBER_SOUP,  # leading blanks: the first sentence with words is the one cut
        "— " + "9" * 60 + " then 12345 67890 " * 6 + ". Done.",  # no cut leaves a head without words
        "Lines\n" + "\n".join(["12345 67890"] * 12) + ". Then prose follows here. " * 4,  # newlines are cut points
    ]
    made += [" ".join(rng.choice(words) for _ in range(rng.randint(40, 700))) for _ in range(12)]
    return made


@pytest.fixture(scope="module")
def loaded():
    """wetext's normalizer, its readings remembered for this module: each test here
    normalizes its texts twice (head and rest, then the whole) and the packed and
    per-sentence layouts share most pieces, so wetext saw each of its 155 distinct pieces
    5.5 times (its tag and verbalize, ~7 ms a piece, were most of this module's time).
    wetext is deterministic: a remembered reading is the reading; what is compared is
    how the texts are cut and put back together."""
    normalizer = normalize.load()
    if normalizer is None:  # not loadable: the tests fail on their readings, as before
        yield
        return
    normalizer.normalize = functools.cache(normalizer.normalize)  # normalize._chunk calls it with the text alone
    try:
        yield
    finally:
        del normalizer.normalize  # the process's normalizer reads afresh for the other modules


@pytest.mark.parametrize("per_sentence", [False, True], ids=["packed", "per-sentence"])
@pytest.mark.parametrize("spoken", [False, True], ids=["as-written", "normalized"])
def test_head_and_rest_are_the_whole_split(loaded, spoken, per_sentence):
    norm = unbudgeted if spoken else None
    for text in texts():
        head, spoken_rest, raw_rest = text_split.split_head(text, normalize=norm, per_sentence=per_sentence)
        rest = (
            text_split.split_pieces(raw_rest, normalize=norm, spoken=spoken_rest, per_sentence=per_sentence)
            if raw_rest or spoken_rest
            else []
        )
        assert head + rest == text_split.split_text(text, normalize=norm, per_sentence=per_sentence), text[:80]
        if len(text) > 2 * C.SEGMENT_MAX_CHARS:
            assert len(head) == 1 and (raw_rest or spoken_rest), "a long text gets a head of one segment"
        assert any(character.isalnum() for character in head[0]), f"a head without words: {head[0]!r}"


def test_a_text_that_fits_one_segment_has_no_rest(loaded):
    assert text_split.split_head("It costs $5.30.", normalize=unbudgeted) == (
        ["It costs five dollars and thirty cents."],
        [],
        [],
    )


def test_the_head_normalizes_only_the_start_of_a_long_text(loaded):
    seen = []

    def counting(pieces):
        seen.extend(pieces)
        return unbudgeted(pieces)

    text = (DENSE * 200)[: C.MAX_LONG_TEXT_CHARS]
    started = time.perf_counter()
    head, _, raw_rest = text_split.split_head(text, normalize=counting)
    assert sum(map(len, seen)) <= text_split.HEAD_MAX_CHARS + C.SEGMENT_MAX_CHARS
    assert len(head) == 1 and "".join(raw_rest) in text
    print(f"\n[head] {len(text)} characters: first segment in {1000 * (time.perf_counter() - started):.1f} ms")


def test_a_head_followed_by_blanks_only_has_no_rest(loaded):
    """Else the stream would budget a one-segment text as a long text's segment (csm_tts
    gives it the request's own cap) and ask for a rest of nothing."""
    text = "Hello world." + " " * 400
    for norm in (None, unbudgeted):
        assert text_split.split_head(text, normalize=norm) == (text_split.split_text(text, normalize=norm), [], [])


def test_per_sentence_each_sentence_is_a_segment_and_marks_without_words_stay_with_one(loaded):
    text = "… Hello there. It costs $5.30! Is it? …"
    assert text_split.split_text(text, per_sentence=True) == ["… Hello there.", "It costs $5.30!", "Is it? …"]
    assert text_split.split_text(text, normalize=unbudgeted, per_sentence=True)[1] == (
        "It costs five dollars and thirty cents!"
    )
    assert text_split.split_text(text) == [text], "packed, a short text stays one segment"
    assert text_split.split_text("One sentence only.", per_sentence=True) == ["One sentence only."]


def test_per_sentence_splits_only_at_sentences_and_still_cuts_one_past_a_segment(loaded):
    text = "First one. " + "word " * 100 + "end. Last one."
    segments = text_split.split_text(text, per_sentence=True)
    assert segments[0] == "First one." and segments[-1] == "Last one."
    assert all(len(segment) <= C.SEGMENT_MAX_CHARS for segment in segments)
    assert " ".join(segments[1:-1]).split() == ("word " * 100 + "end.").split()


def _digits(texts) -> int:
    return sum(character.isdigit() for text in texts for character in text)


@pytest.mark.parametrize(
    "text",
    [
        NUMBER_SOUP,
        NUMBER_SOUP[:280] + ".",
        (DENSE * 30)[:3000],
        " " * 320 + NUMBER_SOUP,
        "Lines\n" + "\n".join(["12345 67890"] * 12) + ". Then prose.",
    ],
    ids=["soup", "short soup", "dense", "leading blanks", "newlines"],
)
def test_a_normalized_first_segment_reads_at_most_head_max_digits(loaded, text):
    """What a stream's first audio waits for is bounded by the digits it normalizes (wetext's
    cost follows them), whatever the text: the head ends at a word before the digit that
    would pass HEAD_MAX_DIGITS, and the rest follows as split_text has it."""
    seen = []

    def counting(pieces):
        seen.extend(pieces)
        return unbudgeted(pieces)

    head, spoken_rest, raw_rest = text_split.split_head(text, normalize=counting)
    assert len(head) == 1 and (raw_rest or spoken_rest)
    assert 0 < _digits(seen) <= text_split.HEAD_MAX_DIGITS
    written_head = text[: len(text) - len("".join(raw_rest))] if not spoken_rest else None
    if written_head is not None:  # cut at whitespace, never inside a number
        assert written_head[-1].isspace()
    assert head[0] == text_split.split_text(text, normalize=unbudgeted)[0]


def test_the_digit_budget_applies_to_the_first_segment_only_and_not_per_sentence(loaded):
    segments = text_split.split_text(NUMBER_SOUP * 3, normalize=unbudgeted)
    assert segments[0].count("thousand") <= text_split.HEAD_MAX_DIGITS // 5  # five-digit numbers
    assert max(map(len, segments[1:])) > 250  # later segments are packed as before
    as_written = text_split.split_text(NUMBER_SOUP, normalize=None)
    assert as_written[0].startswith(NUMBER_SOUP[:250])  # no normalization, no cost: no cut
    per_sentence = text_split.split_text(
        "Count " + "10 " * 26 + "then stop. Next.", normalize=unbudgeted, per_sentence=True
    )
    assert len(per_sentence) == 2  # a sentence stays whole
