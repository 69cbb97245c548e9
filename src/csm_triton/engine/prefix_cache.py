"""Voice-prompt prefix cache: the backbone's keys and values for a voice's reference
segment, computed once and copied into the slot of every later request with the
same voice (prefill of the reference skipped: the main lever for time to first audio).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefixEntry:
    k: torch.Tensor  # [layers, kv_heads, tokens, head_dim]
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def prefix_key(input_ids: torch.Tensor, audio_codes: torch.Tensor) -> str:
    digest = hashlib.sha256(input_ids.cpu().numpy().tobytes())
    digest.update(audio_codes.cpu().numpy().tobytes())
    return digest.hexdigest()


class PrefixCache:
    """LRU, bounded in bytes; entries larger than the whole budget are not kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, PrefixEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> PrefixEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, entry: PrefixEntry) -> None:
        if entry.nbytes > self.max_bytes:
            return
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while self.nbytes > self.max_bytes:
                self._entries.popitem(last=False)
