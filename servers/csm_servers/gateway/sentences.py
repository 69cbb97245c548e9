"""The sentences of a text that arrives in pieces, found as the server finds them.

The gateway's WebSocket route (gateway/text_stream_route.py) speaks each sentence of an
LLM's output as soon as it is complete, so it must know where sentences end while the
text is still arriving. It cuts them as the server cuts a long text
(csm_triton.core.segments, which the clients never import; tests/unit/test_text_stream.py
keeps the two in agreement on prose, whatever the pieces): sentencex (pinned in
pyproject.toml) on a window of at most WINDOW_CHARS, a piece after a title ("Dr.") or a
blank one (a paragraph break) joined to the one before, a window without any boundary
cut after its last space.

A sentence is complete once the text after it has begun another sentence with a whole
word (whitespace after it): until then its "." may still become "3.5", "Dr. Smith" or
"e.g. this", and the splitter's decision with it. `flush()` hands over whatever is
pending, complete or not (the client's flush and close).
"""

from __future__ import annotations

import re

import sentencex

__all__ = ["SentenceSplitter", "TITLES", "WINDOW_CHARS", "speakable"]

# Mirrors of csm_triton.constants.SENTENCE_WINDOW_CHARS and csm_triton.core.segments._TITLES.
WINDOW_CHARS = 2_000
TITLES = frozenset({"mr.", "mrs.", "ms.", "dr.", "prof.", "rev.", "hon.", "capt.", "sgt.", "lt.", "gen."})
# Where a boundary may be (a terminator, closing marks, then whitespace): without one in
# the pending text there is no sentence to find, and the splitter is not run.
_MAYBE_BOUNDARY = re.compile(r"[.!?…][\"')\]}»”’]*\s")
_WHOLE_FIRST_WORD = re.compile(r"\s*\S+\s")


def speakable(text: str) -> bool:
    """Whether the server has something to speak in `text` (a letter or a digit): a
    sentence of only punctuation ("…") is refused alone, so it goes with the next."""
    return any(ch.isalnum() for ch in text)


def _pieces(window: str) -> list[str]:
    """`window` cut into sentences that join back into it (text_split._window_starts + _glue)."""
    starts = [0] + [b["start_index"] for b in sentencex.get_sentence_boundaries("en", window)[1:]]
    if any(not a < b for a, b in zip(starts, starts[1:])) or starts[-1] >= len(window):
        starts = [0]
    groups: list[list[str]] = []
    for a, b in zip(starts, starts[1:] + [len(window)]):
        sentence = window[a:b]
        last_words = groups[-1][-1][-16:].split() if groups else []
        if groups and (not sentence.strip() or (last_words and last_words[-1].lower() in TITLES)):
            groups[-1].append(sentence)
        else:
            groups.append([sentence])
    return ["".join(group) for group in groups]


class SentenceSplitter:
    """feed(text) -> the sentences it completed; flush() -> the rest. Each returned
    sentence is as written (its trailing whitespace included), so that the sentences
    join back into exactly the text fed."""

    def __init__(self, window_chars: int = WINDOW_CHARS):
        self.window_chars = window_chars
        self.pending = ""

    def feed(self, text: str) -> list[str]:
        self.pending += text
        done = self._complete()
        self.pending = self.pending[sum(len(sentence) for sentence in done) :]
        return done

    def flush(self) -> list[str]:
        """The pending text as sentences, the last one whether complete or not."""
        pending, self.pending = self.pending, ""
        done: list[str] = []
        while pending:
            pieces = _pieces(pending[: self.window_chars])
            if len(pending) <= self.window_chars:
                return done + pieces
            taken = self._cut_window(pending, pieces)
            done += taken
            pending = pending[sum(len(piece) for piece in taken) :]
        return done

    def _complete(self) -> list[str]:
        pending = self.pending
        over_window = len(pending) >= self.window_chars
        if not over_window and not _MAYBE_BOUNDARY.search(pending):
            return []
        pieces = _pieces(pending[: self.window_chars])
        if over_window:
            return self._cut_window(pending, pieces)
        if len(pieces) < 2:
            return []
        # the last piece is the sentence still arriving; the one before it is complete
        # only once the last has a whole first word
        return pieces[:-1] if _WHOLE_FIRST_WORD.match(pieces[-1]) else pieces[:-2]

    def _cut_window(self, pending: str, pieces: list[str]) -> list[str]:
        """A full window: its sentences but the last (which the next window holds again),
        or, without a boundary in it, its text up to its last space (segments._sentences)."""
        if len(pieces) > 1:
            return pieces[:-1]
        window = pending[: self.window_chars]
        space = max(window.rfind(" "), window.rfind("\n"))
        return [window[: space + 1] if space > 0 else window]
