"""Prefix cache per turn boundary: the backbone's keys and values of a prompt's context
turns, one entry per turn, so that a later request starting with the same turns (a
stored voice, a conversation grown by one turn) copies them into its slot instead of
prefilling them again (the main lever for time to first audio).

A prompt is split after every <|audio_eos|> (each context turn ends with one): chunk i
is the tokens (b_{i-1}, b_i], and the text to speak is the last chunk. The engine
prefills chunk by chunk whether a chunk came from the cache or not, so a hit yields
exactly the numbers a miss computes (same shapes, same order) for a prompt prefilled
alone; prompts prefilled together (engine/prefill.py) share each round's forward, padded
to the longest chunk, which changes the numbers by float rounding only. Chunk i's key hashes
everything before b_i (ids and the codes of its placeholders), so an entry is only ever
reused behind the very same turns; an entry holds only its own chunk's keys and values.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from csm_triton import constants as C


@dataclass(frozen=True)
class PrefixEntry:
    k: torch.Tensor  # [layers, kv_heads, tokens, head_dim]: one chunk's positions only
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def tokens(self) -> int:
        return self.k.shape[2]

    @classmethod
    def copy_of(cls, cache, row: int, start: int, end: int) -> PrefixEntry:
        """A copy of positions start..end-1 of a KV cache's row (layers.KVCache)."""
        return cls(cache.k[:, row, :, start:end].clone(), cache.v[:, row, :, start:end].clone())


@dataclass(frozen=True)
class PrefillPlan:
    """A prompt's chunks: `ends[i]` is where chunk i ends (exclusive; the last is the
    prompt's length), `keys[i]` the cache key of chunk i for every chunk but the last,
    and `storable` how many leading chunks a prefill may add to the cache."""

    ends: tuple[int, ...]
    keys: tuple[str, ...]
    storable: int

    @classmethod
    def of(cls, request, audio_id: int, audio_eos_id: int, adapter_version: str = "") -> PrefillPlan:
        """The plan of a GenerationRequest's prompt (`prefix_cache_turns` bounds `storable`)."""
        ids = np.ascontiguousarray(request.input_ids, dtype=np.int64).reshape(-1)
        codes = np.ascontiguousarray(request.audio_codes, dtype=np.int64).reshape(-1, C.NUM_CODEBOOKS)
        store_turns = request.prefix_cache_turns
        # A boundary at the very end would leave no chunk to give the hidden state.
        bounds = [int(b) + 1 for b in np.flatnonzero(ids == audio_eos_id) if b + 1 < len(ids)]
        placeholders = np.cumsum(ids == audio_id)  # placeholders in ids[:i + 1]
        digest = hashlib.sha256()
        # The same turns under another adapter, or under other weights registered since under
        # the same id, are other keys and values.
        digest.update(f"adapter:{request.adapter or ''}\0{adapter_version}\0".encode())
        keys, start, rows = [], 0, 0
        for end in bounds:
            # The stream decodes one way: a chunk's ids run to its one <|audio_eos|>, and
            # its placeholders say how many code rows follow, so no two prompts collide.
            digest.update(ids[start:end].tobytes())
            digest.update(codes[rows : placeholders[end - 1]].tobytes())
            keys.append(digest.hexdigest())  # hexdigest() leaves the running hash as it was
            start, rows = end, placeholders[end - 1]
        storable = len(keys) if store_turns is None else max(0, min(store_turns, len(keys)))
        return cls((*bounds, len(ids)), tuple(keys), storable)


class PrefixCache:
    """LRU over chunk entries, bounded in bytes; an entry larger than the whole budget is
    not kept. A request's chain is refreshed head last, so eviction trims chains from
    their tails and shared leading turns (a voice) stay longest; an evicted chunk ends
    its chain there, and the orphaned chunks after it age out."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, PrefixEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        # Prefills with at least one context turn: a hit when their first turn (or more)
        # came from the cache, else a miss. Prompts without a context turn count in neither.
        self.hits = 0
        self.misses = 0
        self.tokens_reused = 0  # prompt positions copied from the cache instead of computed

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def lookup(self, keys: tuple[str, ...]) -> list[PrefixEntry]:
        """The entries of the longest run of leading chunks all present (maybe none)."""
        found = []
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None:
                    break
                found.append(entry)
        return found

    def commit(self, keys: tuple[str, ...], reused: list[PrefixEntry], new: list[tuple[str, PrefixEntry]]) -> None:
        """After a successful prefill: count it, store its new chunks (only then, so a
        failed or cancelled prefill leaves nothing behind) and refresh its chain."""
        with self._lock:
            if keys:
                if reused:
                    self.hits += 1
                    self.tokens_reused += sum(entry.tokens for entry in reused)
                else:
                    self.misses += 1
            for key, entry in new:
                if entry.nbytes <= self.max_bytes and key not in self._entries:
                    self._entries[key] = entry
                    self._bytes += entry.nbytes
            for key in reversed(keys):
                if key in self._entries:
                    self._entries.move_to_end(key)
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
