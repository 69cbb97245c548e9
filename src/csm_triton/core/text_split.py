"""A long text cut into segments of whole sentences (csm_prepare; core.segments chains them).

The splitter is sentencex (pinned in pyproject.toml), run window by window behind a time
budget with a linear fallback scan after it, so that no text costs more than the budget
plus one window; sentences are then packed into segments of at most SEGMENT_MAX_CHARS.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from csm_triton import constants as C

__all__ = ["HEAD_MAX_CHARS", "sentence_count", "split_head", "split_pieces", "split_text"]

# normalize_texts: sentences -> the same sentences as spoken
Normalize = Callable[[list[str]], list[str]]
# split_head normalizes sentences of at most this many characters in all looking for the
# first segment's end (normalized text is seldom shorter than written): a bounded cost
# before the first audio.
HEAD_MAX_CHARS = 4 * C.SEGMENT_MAX_CHARS
# What a stream's first audio waits for is its first segment's normalization, and wetext's
# cost follows the digits it reads (~0.3 ms each on a 2-vCPU AMD EPYC; words ~0.1 ms a
# character: loadtest/results/normalize_cpu.md). So a normalized first segment holds at
# most this many digits of the text as written: it ends before the sentence that would
# pass them, and the first sentence with words, when it alone would, is cut at the
# whitespace before the word that does. The "short first chunk" of streaming TTS, decided by a count, not a clock: the
# same text always makes the same segments. Not with one sentence per segment
# (SENTENCE_SEGMENTS), whose segments are whole sentences.
HEAD_MAX_DIGITS = 48


# Titles that never end a sentence: sentencex sometimes cuts after them ("... with Ms. |
# Øyelaran is confirmed."), which pysbd, the splitter before it, never did.
_TITLES = frozenset({"mr.", "mrs.", "ms.", "dr.", "prof.", "rev.", "hon.", "capt.", "sgt.", "lt.", "gen."})
_TERMINATORS = frozenset(".!?…")
_CLOSERS = frozenset("\"')]}»”’")


def _window_starts(window: str) -> list[int]:
    """Where sentences start in `window` (the first at 0), cut from the original text so
    that nothing (a paragraph break, say) is lost between them."""
    import sentencex  # imported on first use: only long texts need it

    starts = [0] + [b["start_index"] for b in sentencex.get_sentence_boundaries("en", window)[1:]]
    # a library that ever answered out of order or out of range gets no say
    if any(not a < b for a, b in zip(starts, starts[1:])) or starts[-1] >= len(window):
        return [0]
    return starts


def _scan_sentences(text: str) -> list[str]:
    """The fallback: a cut after every run of terminators (and closing quotes or brackets)
    that whitespace follows. Each character is looked at once or twice: linear on any text."""
    sentences, start, i, n = [], 0, 0, len(text)
    while i < n:
        if text[i] not in _TERMINATORS:
            i += 1
            continue
        while i < n and (text[i] in _TERMINATORS or text[i] in _CLOSERS):
            i += 1
        if i < n and text[i].isspace():
            while i < n and text[i].isspace():
                i += 1
            sentences.append(text[start:i])
            start = i
    if start < n:
        sentences.append(text[start:])
    return sentences


def _sentences(
    text: str, window_chars: int = C.SENTENCE_WINDOW_CHARS, budget_seconds: float = C.SENTENCE_SPLIT_BUDGET_SECONDS
) -> list[str]:
    """`text` cut into sentences that join back into exactly `text`.

    sentencex runs on one window at a time; a window's last sentence may be cut short by
    the window's end, so it is looked at again at the start of the next window. Past the
    budget (checked between windows) the rest of the text goes to the linear scan: a
    slow input costs at most the budget plus one window."""
    deadline = time.perf_counter() + budget_seconds
    sentences: list[str] = []
    position = 0
    while position < len(text):
        if time.perf_counter() > deadline:
            sentences += _scan_sentences(text[position:])
            break
        window = text[position : position + window_chars]
        starts = _window_starts(window)
        if position + len(window) == len(text):
            ends = starts[1:] + [len(window)]
        elif len(starts) > 1:
            ends = starts[1:]
        else:  # no boundary in a whole window: cut at its last space, never inside a word
            space = max(window.rfind(" "), window.rfind("\n"))
            ends = [space + 1 if space > 0 else len(window)]
        sentences += [window[a:b] for a, b in zip(starts, ends)]
        position += ends[-1]
    return _glue(sentences)


def _glue(sentences: list[str]) -> list[str]:
    """A piece after a title joins it, and so does a blank one (sentencex returns a
    paragraph break as a piece of its own)."""
    groups: list[list[str]] = []
    for sentence in sentences:
        last_words = groups[-1][-1][-16:].split() if groups else []  # a tail: linear however many
        if groups and (not sentence.strip() or (last_words and last_words[-1].lower() in _TITLES)):
            groups[-1].append(sentence)
        else:
            groups.append([sentence])
    return ["".join(group) for group in groups]


def _hard_split(sentence: str, max_chars: int) -> list[str]:
    """A sentence longer than a segment, cut at the last space before the limit (or at
    the limit when there is none): rare, and better than a prompt that does not fit."""
    pieces = []
    while len(sentence) > max_chars:
        cut = sentence.rfind(" ", 0, max_chars + 1)
        cut = cut if cut > 0 else max_chars
        pieces.append(sentence[:cut])
        sentence = sentence[cut:]
    return pieces + [sentence]


def _pieces(text: str, max_chars: int) -> list[str]:
    """`text` as sentences of at most `max_chars` characters that join back into it."""
    pieces: list[str] = []
    for sentence in _sentences(text):
        pieces += _hard_split(sentence, max_chars)
    return pieces


def _digits(text: str) -> int:
    return sum(character.isdigit() for character in text)


def _head_budget(normalize, per_sentence: bool) -> bool:
    """Whether the first segment's digit budget (HEAD_MAX_DIGITS) applies: to a normalized
    text not split one sentence per segment."""
    return normalize is not None and not per_sentence


def _cut_costly_first(pieces: list[str]) -> list[str]:
    """The first sentence with words cut in two before its digit number HEAD_MAX_DIGITS + 1,
    after the last whitespace before that digit's word (a sentence whose words before it
    hold no whitespace stays whole)."""
    first_index = next((index for index, piece in enumerate(pieces) if _speakable(piece)), None)
    if first_index is None or _digits(pieces[first_index]) <= HEAD_MAX_DIGITS:
        return pieces
    first, seen = pieces[first_index], 0
    for position, character in enumerate(first):
        seen += character.isdigit()
        if seen > HEAD_MAX_DIGITS:
            cut = next((at + 1 for at in range(position - 1, -1, -1) if first[at].isspace()), 0)
            if not _speakable(first[:cut]):
                return pieces
            return [*pieces[:first_index], first[:cut], first[cut:], *pieces[first_index + 1 :]]
    return pieces


def _speakable(text: str) -> bool:
    return any(character.isalnum() for character in text)


# A part of a segment: (its text as spoken, and when it is a sentence's first part the
# length of its sentence as written and the digits in it, else 0 and 0).
Part = tuple[str, int, int]


def _starts_segment(
    current: str, part: str, max_chars: int, per_sentence: bool, written: int = 0, head_digits: int = 0
) -> bool:
    """Whether `part` begins a new segment after `current`, the segment so far (_pack's
    rule, which split_head follows too): when it would not fit as spoken, or its sentence
    would not fit as written (`written`: so that split_head ends a head before normalizing
    the sentence after it, which normalization seldom shortens), or, in the first segment of
    a normalized text, when its digits with those before would pass HEAD_MAX_DIGITS
    (`head_digits`: their sum), or, one sentence per segment, when both are sentences with
    words (a "..." or a closing quote stays with the sentence before it, or goes with the
    next one when nothing came before)."""
    if not current:
        return False
    if len(current) + max(len(part), written) > max_chars:
        return True
    if not per_sentence and head_digits > HEAD_MAX_DIGITS and _speakable(current):
        return True
    return per_sentence and _speakable(part) and _speakable(current)


def _spoken_parts(written: Sequence[str], spoken: Sequence[str], max_chars: int) -> list[Part]:
    """Each sentence as spoken, cut again where it grew past `max_chars`, its first part
    carrying the sentence's length as written."""
    parts: list[Part] = []
    for as_written, as_spoken in zip(written, spoken):
        cut = _recut([as_spoken], max_chars)
        first = (len(as_written), _digits(as_written))
        parts += [(part, *(first if position == 0 else (0, 0))) for position, part in enumerate(cut)]
    return parts


def _pack(parts: list[Part], max_chars: int, per_sentence: bool = False, head: bool = True) -> list[str]:
    """Consecutive parts grouped into segments of at most `max_chars` (stripped, none
    blank); with `per_sentence`, each sentence a segment of its own."""
    segments: list[str] = []
    # The digits of the first segment with words (`head`: the parts begin a text), until it ends.
    head_digits: int | None = 0 if head else None
    current = ""
    for piece, written, digits in parts:
        head_digits = head_digits + digits if head_digits is not None else None
        if _starts_segment(current, piece, max_chars, per_sentence, written, head_digits or 0):
            segments.append(current)
            current = ""
            head_digits = None if segments[-1].strip() else digits
        current += piece
    segments.append(current)
    segments = [segment.strip() for segment in segments]
    return [segment for segment in segments if segment]


def sentence_count(text: str, max_chars: int = C.SEGMENT_MAX_CHARS) -> int:
    """How many segments `text` makes at most, one per sentence (SENTENCE_SEGMENTS): its
    sentences as written, each past `max_chars` counted as the pieces it is cut into."""
    return len(_pieces(text, max_chars))


def split_text(
    text: str, max_chars: int = C.SEGMENT_MAX_CHARS, normalize: Normalize | None = None, per_sentence: bool = False
) -> list[str]:
    """The text as segments of whole sentences, each at most `max_chars` characters
    (stripped; a text that fits is one segment, unchanged), or with `per_sentence` each
    sentence a segment of its own (SENTENCE_SEGMENTS: its times are the sentence's).

    With `normalize` (core.normalize.normalize_texts) the segments hold the text as it
    is to be spoken, and the limit applies to that. The order: the raw text is cut into
    sentences first, because the splitter reads "3.5", "Dr." and "a.m." as the author
    wrote them (normalized, "$5.30." and "etc." lose the marks it goes by, and the
    normalizer must never see more than a segment at once: its cost grows with the
    input); then each sentence is normalized; then the normalized sentences are packed
    into segments, a sentence that grew past `max_chars` cut again (and one that would not
    fit as written starting a new segment too: split_head decides that before normalizing it)."""
    budget = _head_budget(normalize, per_sentence)
    whole = len(text) <= max_chars and not per_sentence and not (budget and _digits(text) > HEAD_MAX_DIGITS)
    pieces = [text] if whole else _pieces(text, max_chars)
    if budget and not whole:
        pieces = _cut_costly_first(pieces)
    if normalize is not None:
        spoken = normalize(pieces)
        if len(spoken) == 1 and len(spoken[0]) <= max_chars:
            return spoken
        return _pack(_spoken_parts(pieces, spoken, max_chars), max_chars, per_sentence)
    if len(pieces) == 1:
        return pieces
    return _pack([(piece, 0, 0) for piece in pieces], max_chars, per_sentence)


def split_pieces(
    raw: list[str],
    max_chars: int = C.SEGMENT_MAX_CHARS,
    normalize: Normalize | None = None,
    *,
    spoken: Sequence[str] = (),
    per_sentence: bool = False,
) -> list[str]:
    """The segments of split_head's rest, as split_text packs them: `spoken`, sentence
    parts normalized already, then the sentences `raw`, normalized here."""
    parts = (
        [(piece, 0, 0) for piece in raw] if normalize is None else _spoken_parts(raw, normalize(list(raw)), max_chars)
    )
    # Never a first segment (the head came before): no digit budget.
    return _pack([(piece, 0, 0) for piece in spoken] + parts, max_chars, per_sentence, head=False)


def split_head(
    text: str, max_chars: int = C.SEGMENT_MAX_CHARS, normalize: Normalize | None = None, per_sentence: bool = False
) -> tuple[list[str], list[str], list[str]]:
    """(split_text's first segment, the rest's parts normalized already, the rest's raw
    sentences), normalizing only the sentences the first segment needs, so that a long
    text's first audio does not wait for the normalization of all of it:
    split_text(text, ...) == head + split_pieces(raw, ..., spoken=spoken) (with the same
    `per_sentence`: then the head is the first sentence). A text that
    fits one segment has no rest; so has one whose first segment does not end within its
    first HEAD_MAX_CHARS characters (it is split whole: a bounded cost either way)."""
    budget = _head_budget(normalize, per_sentence)
    if len(text) <= max_chars and not (budget and _digits(text) > HEAD_MAX_DIGITS):
        return split_text(text, max_chars, normalize, per_sentence), [], []
    pieces = _pieces(text, max_chars)
    if budget:
        pieces = _cut_costly_first(pieces)
    current, read, digits = "", 0, 0
    for index, raw in enumerate(pieces):
        read += len(raw)
        if read > HEAD_MAX_CHARS + max_chars:
            break
        # _pack's rules, known before normalizing: the sentence would not fit as written, or
        # its digits would pass the head's.
        over = budget and digits + _digits(raw) > HEAD_MAX_DIGITS and _speakable(current)
        if current.strip() and (len(current) + len(raw) > max_chars or over):
            return _head(current, [], pieces[index:])
        parts = [(raw, 0, 0)] if normalize is None else _spoken_parts([raw], normalize([raw]), max_chars)
        for position, (part, written, part_digits) in enumerate(parts):
            digits += part_digits
            new_segment = _starts_segment(current, part, max_chars, per_sentence, written, digits)
            if current.strip() and new_segment:  # `current` is the head
                return _head(current, [piece for piece, _, _ in parts[position:]], pieces[index + 1 :])
            if new_segment:  # a blank segment: _pack drops it
                current, digits = "", part_digits
            current += part
    return split_text(text, max_chars, normalize, per_sentence), [], []


def _head(current: str, spoken: list[str], raw: list[str]) -> tuple[list[str], list[str], list[str]]:
    """split_head's answer once the head is known: only blanks left make no rest."""
    if not any(piece.strip() for piece in (*spoken, *raw)):
        return [current.strip()], [], []
    return [current.strip()], spoken, raw


def _recut(pieces: list[str], max_chars: int) -> list[str]:
    """Normalized sentences, each that grew past `max_chars` cut again."""
    return [part for piece in pieces for part in (_pieces(piece, max_chars) if len(piece) > max_chars else [piece])]
