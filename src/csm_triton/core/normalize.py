"""English text normalization before tokenization: "$5.30 on Jan. 3rd" is spoken as
"five dollars and thirty cents on the third of january", not as the tokenizer's guess.

The reading of numbers, money, percentages, dates, times, years, fractions, units,
URLs and e-mail addresses is wetext's (pinned in pyproject.toml: WeTextProcessing's
prebuilt English FSTs run by kaldifst, no pynini, nothing downloaded). A pre-pass
rewrites what wetext reads wrong (each rule says why) and abbreviations and titles,
which it covers only in part; a post-pass undoes two artefacts of its output.

Cost: wetext takes 0.05-0.1 ms per character of ordinary text and up to 0.6 ms on
digit soups (20,000 characters in one call: 8 s), so it never sees a whole text: only
windows around the words that need it (a digit, "&", an e-mail or a domain), two words
of context each side, within one sentence or segment of at most NORMALIZE_MAX_CHARS.
A text without such words costs a regex scan and comes back exactly as it was. One
request's sentences share a time budget (`normalize_texts`); past it, and past the
normalized length limit, the rest is spoken as written. Any failure of the library
leaves that window as written, with a logged warning: normalization never fails a
request. loadtest/normalize_bench.py measures it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Sequence

from csm_triton import constants as C

__all__ = ["normalize_text", "normalize_texts", "load"]

LOG = logging.getLogger(__name__)
# Loads the FSTs once per process and lets one thread at a time into them (kaldifst is not
# documented thread-safe; csm_prepare handles one request at a time per instance anyway).
_LOCK = threading.Lock()
_state: dict = {}  # "normalizer" once loaded, or "error" once loading failed (not retried per request)


def load():
    """wetext's English normalizer, loaded on first use (about 0.5 s: every FST in its
    wheel); None when it cannot be loaded (logged once)."""
    with _LOCK:
        if not _state:
            try:
                from wetext import Normalizer

                _state["normalizer"] = Normalizer(lang="en", operator="tn")  # "auto" takes "2026" for Chinese
            except Exception as error:  # noqa: BLE001 - a server without it still speaks, unnormalized
                _state["error"] = error
                LOG.error("text normalization is off: wetext could not be loaded (%s: %s)", type(error).__name__, error)
        return _state.get("normalizer")


# --- pre-pass: what wetext 0.1.8 reads wrong, and abbreviations -------------------------------
_CURRENCIES = {
    "$": ("dollar", "dollars", "cent", "cents"),
    "€": ("euro", "euros", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
    "¥": ("yen", "yen", None, None),
}
_SCALE = r"\s?(?:[kKmMbB]n?|thousand|million|billion|trillion)\b"
# wetext reads "$5.30" as "five point three dollars": amounts with cents become words it reads right.
_MONEY_CENTS = re.compile(
    r"(?<![\w.,])([$€£])([0-9]{1,3}(?:,[0-9]{3})+|[0-9]*)\.([0-9][0-9])"
    r"(?![0-9]|,[0-9]|\.[0-9]|" + _SCALE + r")"
)
# "$5/hour" became "dollar five slash hour".
_MONEY_RATE = re.compile(
    r"([$€£¥][0-9][0-9,.]*(?:" + _SCALE + r")?)\s?/\s?(hour|hr|h|day|week|wk|month|mo|year|yr"
    r"|night|person|head|unit|kg|lb|mile|km)\b"
)
_RATE_UNITS = {"hr": "hour", "h": "hour", "wk": "week", "mo": "month", "yr": "year"}
# wetext drops the "one" of 1,000-1,999 ("1,500" -> "thousand five hundred").
_ONE_THOUSAND = re.compile(r"(?<![\w.,])([$€£¥]?)1,([0-9]{3})(?![,0-9])(?!" + _SCALE + r")")
# "1990s" became "one thousand nine hundred and ninety seconds"; "19 90s" is "nineteen nineties".
_DECADES = re.compile(r"\b(1[1-9]|20)([1-9])0s\b")
_CENTURIES = re.compile(r"\b(1[1-9])00s\b")
# "2020-2025" became "two thousand and twenty to two thousand and twenty five".
_YEAR_RANGE = re.compile(r"\b(1[1-9][0-9][0-9]|20[0-9][0-9]) ?[-–] ?(1[1-9][0-9][0-9]|20[0-9][0-9])\b")
# "2nd-largest" became "two nd-largest".
_ORDINAL_HYPHEN = re.compile(r"\b([0-9]+(?:st|nd|rd|th))-(?=[A-Za-z])")
# "#1" and "No. 1" crash wetext or become "Number. one".
_NUMBER_SIGN = re.compile(r"(?<!\w)#(?=[0-9])|\bNo\. ?(?=[0-9])")
_TWENTY_FOUR_SEVEN = re.compile(r"\b24/7\b")  # "twenty four sevenths"
_PLUS = re.compile(r"(?<![\w+])\+(?=[0-9])")  # "+5" crashes wetext
_GLUED_FRACTION = re.compile(r"(?<=[0-9])(?=[¼-¾⅐-⅞])")  # "2½" crashes it; "2 ½" is "two and a half"
# Units wetext does not know, or reads otherwise ("100 m" was "one hundred minutes").
_UNITS = {
    "m/s²": ("meter per second squared", "meters per second squared"),
    "m/s": ("meter per second", "meters per second"),
    "km/s": ("kilometer per second", "kilometers per second"),
    "m": ("meter", "meters"),
    "hr": ("hour", "hours"),
    "hrs": ("hour", "hours"),
    "sec": ("second", "seconds"),
    "secs": ("second", "seconds"),
    "kHz": ("kilohertz", "kilohertz"),
    "kWh": ("kilowatt hour", "kilowatt hours"),
}
_UNIT = re.compile(
    r"(?<![\w.,$€£¥])([0-9]+(?:\.[0-9]+)?) ?("
    + "|".join(re.escape(u) for u in sorted(_UNITS, key=len)[::-1])
    + r")(?![\w/²])"
)
_SCHEME = re.compile(r"\b(?:https?|ftp)://(?=\w)")  # "HTTPS colon slash slash": nobody reads it out
# Titles (before a name; wetext knows some, reads "Ms." as "Miss" and misses the rest).
_TITLES = {
    "Mr.": "Mister",
    "Mrs.": "Missus",
    "Ms.": "Miz",
    "Prof.": "Professor",
    "Capt.": "Captain",
    "Sgt.": "Sergeant",
    "Lt.": "Lieutenant",
    "Col.": "Colonel",
    "Gen.": "General",
    "Rev.": "Reverend",
    "Gov.": "Governor",
    "Sen.": "Senator",
    "Rep.": "Representative",
    "Pres.": "President",
    "Mt.": "Mount",
    "e.g.": "for example",
    "i.e.": "that is",
    "vs.": "versus",
    "approx.": "approximately",
    "ca.": "circa",
}
# Abbreviations that may end a sentence: their period stays when they do.
_ENDINGS = {
    "etc.": "et cetera",
    "Inc.": "Incorporated",
    "Corp.": "Corporation",
    "Co.": "Company",
    "Ltd.": "Limited",
    "Jr.": "Junior",
    "Sr.": "Senior",
    "Ave.": "Avenue",
    "Blvd.": "Boulevard",
    "Rd.": "Road",
    "Dept.": "Department",
}
# "St. Louis" / "Main St.", "Dr. Who" / "Mulholland Dr.": the place after a capitalized
# word or a number ("5th St.") unless a capital follows, else the title.
_EITHER = {"St.": ("Saint", "Street"), "Dr.": ("Doctor", "Drive")}
_PLACE_BEFORE = re.compile(r"(?:[A-Z][\w'-]*|[0-9]\w*) $")
_SUFFIXES = frozenset({"Jr.", "Sr."})  # "King Jr. Day": a capital after them starts no sentence
_ABBREVIATION = re.compile(
    r"(?<![\w.])("
    + "|".join(re.escape(a) for a in sorted({**_TITLES, **_ENDINGS, **_EITHER}, key=len)[::-1])
    + r")(?!\w)"
)
_CAPITAL_NEXT = re.compile(r"\s+[\"'“‘(]?[A-Z]")
_NAME_NEXT = re.compile(r"\s+[\"'“‘(]?[A-Z][\w'-]*+(?!\.)")  # "St. Louis", not "St. Apt. 3"
_SENTENCE_END = re.compile(r"[\s\"'”’)\]]*$")


def _plural(count: str, one: str, many: str) -> str:
    return f"{count} {one if count == '1' else many}"


def _money_cents(match: re.Match) -> str:
    major_one, major_many, minor_one, minor_many = _CURRENCIES[match[1]]
    whole, cents = match[2] or "0", str(int(match[3]))
    if cents == "0":
        return _plural(whole, major_one, major_many)
    if whole.strip("0") == "":
        return _plural(cents, minor_one, minor_many)
    return f"{_plural(whole, major_one, major_many)} and {_plural(cents, minor_one, minor_many)}"


def _one_thousand(match: re.Match) -> str:
    rest = int(match[2])
    words = f"one thousand {rest}" if rest else "one thousand"
    return f"{words} {_CURRENCIES[match[1]][1]}" if match[1] else words


def _abbreviation(match: re.Match) -> str:
    text, end = match.string, match.end()
    abbreviation = match[1]
    if abbreviation in _TITLES:
        return _TITLES[abbreviation]
    capital_next = bool(_CAPITAL_NEXT.match(text, end))
    if abbreviation in _EITHER:
        name, place = _EITHER[abbreviation]
        if _NAME_NEXT.match(text, end) or not _PLACE_BEFORE.search(text, 0, match.start()):
            return name
        words = place
    else:
        words = _ENDINGS[abbreviation]
    ends = _SENTENCE_END.match(text, end) or (capital_next and abbreviation not in _SUFFIXES)
    return words + "." if ends else words


def _year_range(match: re.Match) -> str:
    first, last = match[1], match[2]
    return f"{first} to {last}" if int(last) > int(first) else match[0]


def prepass(text: str) -> str:
    """The rewrites wetext needs before it reads `text` (and the abbreviations)."""
    text = _SCHEME.sub("", text)
    text = _MONEY_RATE.sub(lambda m: f"{m[1]} per {_RATE_UNITS.get(m[2], m[2])}", text)
    text = _MONEY_CENTS.sub(_money_cents, text)
    text = _ONE_THOUSAND.sub(_one_thousand, text)
    text = _DECADES.sub(lambda m: f"{m[1]} tens" if m[2] == "1" else f"{m[1]} {m[2]}0s", text)
    text = _CENTURIES.sub(r"\1 hundreds", text)
    text = _YEAR_RANGE.sub(_year_range, text)
    text = _ORDINAL_HYPHEN.sub(r"\1 ", text)
    text = _NUMBER_SIGN.sub("number ", text)
    text = _TWENTY_FOUR_SEVEN.sub("twenty four seven", text)
    text = _PLUS.sub("plus ", text)
    text = _GLUED_FRACTION.sub(" ", text)
    text = _UNIT.sub(lambda m: f"{m[1]} {_UNITS[m[2]][0 if m[1] == '1' else 1]}", text)
    return _ABBREVIATION.sub(_abbreviation, text)


# --- which words wetext sees -------------------------------------------------------------------
# Digits and fractions, "R&D", e-mail addresses, "www.", domains and file names ("file.txt").
_NEEDS_LIBRARY = re.compile(r"[0-9¼-¾⅐-⅞]|&|\w@\w|(?<!\S)www\.|\w\.[a-z]{2,}")
_CONTEXT_WORDS = 2  # "Jan. 3rd, 2026", "10:45 a.m.", "5 km/h", "$2.5 million" read as one
# Only words that can change a number's reading are context: not a plain lowercase word of
# four letters or more ("items", "hours": read the same either way, and wetext's cost is per
# character: a third less on number-dense text), except scales, months and days. Names and
# abbreviations ("Jan.", "Monday"), short words and symbols ("of", "a.m.", "kg", "°F") stay.
_READING_WORDS = (
    "hundred|thousand|million|billion|trillion|january|february|march|april|june|july|august|september"
    "|october|november|december|monday|tuesday|wednesday|thursday|friday|saturday|sunday"
)
_PLAIN_WORD = re.compile(r"[\"'“‘(]*(?!(?:" + _READING_WORDS + r")s?\b)[a-z]{4,}[.,;:!?\"'”’)]*")
# Characters wetext's tagger fails on next to a digit ("[2020]", a zero-width space; "5*" and
# the like fail too, and are read word by word or left as written):
# they cut a window into chunks, read one by one, and stay as they were.
_SEPARATORS = re.compile("[" + re.escape('[]{}<>"“”«»') + "\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]+")
_WORD = re.compile(r"\S+")
# wetext reads 1905 as "nineteen zero five".
_YEAR_ZERO = re.compile(
    r"\b(ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty)"
    r" zero (one|two|three|four|five|six|seven|eight|nine)\b"
)
_ESCAPED = re.compile(r'\\(["\\])')  # wetext's output escapes quotes and backslashes


def _windows(text: str) -> list[tuple[int, int]]:
    """(start, end) of each run of words wetext reads: the words that need it and their
    context, never across anything but a single space (wetext fails on runs of spaces)."""
    words = [match.span() for match in _WORD.finditer(text)]

    def _context(index: int) -> bool:
        return _PLAIN_WORD.fullmatch(text, *words[index]) is None

    linked = [text[a[1] : b[0]] == " " for a, b in zip(words, words[1:])]  # word i to word i + 1
    runs: list[list[int]] = []
    for index, (start, end) in enumerate(words):
        if not _NEEDS_LIBRARY.search(text, start, end):
            continue
        first = last = index
        while first > 0 and index - first < _CONTEXT_WORDS and linked[first - 1] and _context(first - 1):
            first -= 1
        while last < len(words) - 1 and last - index < _CONTEXT_WORDS and linked[last] and _context(last + 1):
            last += 1
        if runs and first <= runs[-1][1] + 1 and all(linked[runs[-1][1] : first]):
            runs[-1][1] = max(runs[-1][1], last)
        else:
            runs.append([first, last])
    return [(words[first][0], words[last][1]) for first, last in runs]


def _chunk(normalizer, chunk: str) -> str:
    core = chunk.strip()
    if not _NEEDS_LIBRARY.search(core):
        return chunk
    with _LOCK:
        spoken = normalizer.normalize(core)
    if not spoken.strip():
        raise ValueError("empty output")
    spoken = _YEAR_ZERO.sub(r"\1 oh \2", _ESCAPED.sub(r"\1", spoken))
    return chunk[: len(chunk) - len(chunk.lstrip())] + spoken + chunk[len(chunk.rstrip()) :]


def _library(normalizer, window: str) -> str:
    """wetext on one window, chunk by chunk between _SEPARATORS; raises on its failures."""
    pieces, position = [], 0
    for separator in _SEPARATORS.finditer(window):
        pieces += [_chunk(normalizer, window[position : separator.start()]), separator[0]]
        position = separator.end()
    return "".join(pieces) + _chunk(normalizer, window[position:])


def _read(normalizer, window: str) -> str:
    """One window read by wetext; where that fails, word by word; where a word fails, as written."""
    try:
        return _library(normalizer, window)
    except Exception as error:  # noqa: BLE001
        failure = error
    words = window.split(" ")
    for index, word in enumerate(words):
        if _NEEDS_LIBRARY.search(word):
            try:
                words[index] = _library(normalizer, word)
            except Exception:  # noqa: BLE001
                pass
    LOG.warning(
        "text normalization failed on %r (%s: %s); read word by word", window[:80], type(failure).__name__, failure
    )
    return " ".join(words)


def normalize_text(text: str) -> str:
    """`text` (one sentence or segment, at most NORMALIZE_MAX_CHARS characters) as it is
    to be spoken. Text with nothing to normalize comes back unchanged, character for
    character; so does a longer text (logged), and any text when wetext cannot be loaded."""
    if len(text) > C.NORMALIZE_MAX_CHARS:
        LOG.warning(
            "text normalization skipped a piece of %d characters (the limit is %d)", len(text), C.NORMALIZE_MAX_CHARS
        )
        return text
    try:
        rewritten = prepass(text)
        windows = _windows(rewritten)
        if not windows:
            return rewritten
        normalizer = load()
        if normalizer is None:
            return text
        pieces, position = [], 0
        for start, end in windows:
            pieces += [rewritten[position:start], _read(normalizer, rewritten[start:end])]
            position = end
        return "".join(pieces) + rewritten[position:]
    except Exception as error:  # noqa: BLE001 - never fail a request over its reading
        LOG.warning("text normalization failed (%s: %s); the text is spoken as written", type(error).__name__, error)
        return text


def normalize_texts(
    pieces: Sequence[str],
    *,
    budget_seconds: float = C.NORMALIZE_BUDGET_SECONDS,
    max_chars: int = C.NORMALIZED_TEXT_MAX_CHARS,
    clock=time.perf_counter,
) -> list[str]:
    """One request's sentences (each at most NORMALIZE_MAX_CHARS), each normalized, in
    order. Past `budget_seconds` (checked between sentences), and where a sentence's
    normalized form would take the whole past `max_chars` (a digit soup reads 5x
    longer), the rest stays as written: a slow or swelling text costs at most the budget
    plus one sentence, and never speaks for more than the limit says."""
    deadline = clock() + budget_seconds
    total = sum(len(piece) for piece in pieces)
    spoken = list(pieces)
    for index, piece in enumerate(pieces):
        if clock() > deadline:
            LOG.warning(
                "text normalization ran out of its %g s budget: %d of %d sentences are spoken as written",
                budget_seconds,
                len(pieces) - index,
                len(pieces),
            )
            break
        normalized = normalize_text(piece)
        if total - len(piece) + len(normalized) > max_chars:
            LOG.warning("text normalization stopped: the normalized text would pass %d characters", max_chars)
            break
        total += len(normalized) - len(piece)
        spoken[index] = normalized
    return spoken
