"""LoRA adapters chosen per request and mixed in one frame step (S-LoRA/Punica style).

The base weights are shared; each request's rows add their own adapter's low-rank
product on every targeted projection: y = W x + B_i (A_i x) for the adapter i of that
row, 0 for rows of the base model. Nothing is merged, so one copy of the base serves
any mix of adapters in the same step.

Layout, per layer and fused linear of the engine (q|k|v is one `qkv` GEMM, gate|up one
`gate_up`): the A matrices of every slot stacked along the rank, [slots x R, in], and
the B matrices (times alpha/r) side by side, [out, slots x R], where R is the fused
linear's components x lora_max_rank and each projection's B sits in its own output rows
and rank columns (zero elsewhere). A step computes h = x A^T for all slots at once (one
GEMM), zeroes in each row the columns of the other slots (one multiply by a per-row
mask made once per forward), and adds h B^T (one GEMM): three kernels per linear
whatever the batch and the mix, no per-row copy of any adapter, and every resident
adapter read once per step (S x 2.6 MB x rank for CSM-1B in bf16), like a weight. The
rows' slots are an index buffer, so all of it lives inside a captured CUDA graph.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["FUSED", "PROJECTIONS", "AdapterBank", "LoraRows", "LoraWeights", "StackLora"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The engine's fused linears and the projections each holds, in output order.
FUSED = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


@dataclass
class LoraWeights:
    """One adapter: {(stack, layer, projection): (A [r, in], B [out, r])} with stack
    "backbone" or "depth", and its scale (alpha / r). `source`: the folder it was read
    from (the voice store makes a new one per registration and removes it with the voice),
    None: not checked."""

    matrices: dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor]]
    scale: float
    rank: int
    source: Path | None = None

    def current(self) -> bool:
        """False once its folder is gone: the voice was deleted, or deleted and registered
        again with other weights (a new folder)."""
        return _present(self.source)


def _present(source: Path | None) -> bool:
    return source is None or Path(source).is_dir()


class StackLora:
    """The bank of one TransformerStack: per layer and fused linear, A [capacity x R, in]
    and B [out, capacity x R] (R = components x max rank). Slot s (1..capacity) owns rank
    rows/columns (s - 1) x R ... s x R - 1; slot 0 (the base model) owns none."""

    def __init__(self, stack, name: str, capacity: int, max_rank: int, device, dtype):
        self.name, self.capacity, self.max_rank = name, capacity, max_rank
        layer = stack.layers[0]
        self.out_sizes = {
            "qkv": [stack.num_heads * stack.head_dim] + [stack.num_kv_heads * stack.head_dim] * 2,
            "o_proj": [layer.o_proj.out_features],
            "gate_up": [stack.intermediate_size] * 2,
            "down": [layer.down.out_features],
        }
        inputs = {fused: getattr(layer, fused).in_features for fused in FUSED}
        self.a = [
            {
                fused: torch.zeros(capacity * len(parts) * max_rank, inputs[fused], device=device, dtype=dtype)
                for fused, parts in FUSED.items()
            }
            for _ in stack.layers
        ]
        self.b = [
            {
                fused: torch.zeros(
                    sum(self.out_sizes[fused]), capacity * len(parts) * max_rank, device=device, dtype=dtype
                )
                for fused, parts in FUSED.items()
            }
            for _ in stack.layers
        ]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.a + self.b for t in layer.values())

    def write(self, slot: int, weights: LoraWeights | None) -> None:
        """Slot `slot` := this adapter's matrices for this stack (None: zeros)."""
        for layer, (a_layer, b_layer) in enumerate(zip(self.a, self.b)):
            for fused, parts in FUSED.items():
                width = len(parts) * self.max_rank
                ranks = slice((slot - 1) * width, slot * width)
                a, b = a_layer[fused][ranks], b_layer[fused][:, ranks]
                a.zero_()
                b.zero_()
                if weights is None:
                    continue
                row = 0
                for component, projection in enumerate(parts):
                    out = self.out_sizes[fused][component]
                    pair = weights.matrices.get((self.name, layer, projection))
                    if pair is not None:
                        lora_a, lora_b = pair
                        columns = slice(component * self.max_rank, component * self.max_rank + lora_a.shape[0])
                        a[columns] = lora_a.to(a.dtype)
                        b[row : row + out, columns] = (lora_b * weights.scale).to(b.dtype)
                    row += out


@dataclass
class LoraRows:
    """The adapters of one forward call's rows: `slots` [B] int64 into `bank` (0: none).
    prepared() makes the per-row masks (once per frame step: the depth decoder's 31 calls
    share them; a forward given unprepared rows prepares them itself); delta() uses them."""

    bank: StackLora
    slots: torch.Tensor
    masks: dict[int, torch.Tensor] | None = None

    def prepared(self) -> LoraRows:
        """[B, 1, capacity x c x rank] masks for c = 1, 2, 3 components: 1 in the columns of
        the row's own slot."""
        masks = {}
        for components in (1, 2, 3):
            width = components * self.bank.max_rank
            owner = torch.arange(self.bank.capacity * width, device=self.slots.device) // width + 1
            masks[components] = (owner[None, :] == self.slots[:, None]).to(self.bank.a[0]["down"].dtype)[:, None]
        return LoraRows(self.bank, self.slots, masks)

    def delta(self, layer: int, fused: str, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, in] -> each row's B (A x) [B, T, out] (zeros for base rows)."""
        low = (x @ self.bank.a[layer][fused].T) * self.masks[len(FUSED[fused])]
        return low @ self.bank.b[layer][fused].T


class AdapterBank:
    """Which adapters are resident (by id), in which slot, and how many running requests
    use each: the most recently used `capacity` stay; one in use is never evicted. A
    resident adapter whose source folder is gone is read again for the next request (into
    another slot while requests admitted before still run with the old weights)."""

    def __init__(self, lm, capacity: int, max_rank: int, load):
        """load(adapter_id) -> LoraWeights (from the voice store); raises for a bad one."""
        self.capacity, self.max_rank, self._load = capacity, max_rank, load
        self.stacks = {
            name: StackLora(stack, name, capacity, max_rank, lm.device, lm.dtype)
            for name, stack in (("backbone", lm.backbone), ("depth", lm.depth))
        }
        self._slot_of: dict[str, int] = {}  # resident adapter id -> slot 1..capacity
        self._source = [None] * (capacity + 1)  # per slot: the resident weights' source folder
        self._read: dict[str, LoraWeights] = {}  # read from disk by prefetch, not yet on the device
        self._read_lock = threading.Lock()
        self._users = [0] * (capacity + 1)
        self._used_at = [0] * (capacity + 1)
        self._clock = 0

    def acquire(self, adapter_id: str | None) -> int:
        """The slot of this adapter (0: none), loaded into a free or least recently used
        idle slot if it is not resident; the caller releases it when the request ends."""
        if not adapter_id:
            return 0
        self._clock += 1
        slot = self._slot_of.get(adapter_id)
        if slot is not None and not self._is_current(slot):
            del self._slot_of[adapter_id]  # stale: free once the requests that use it end
            slot = None
        if slot is None:
            with self._read_lock:
                weights = self._read.pop(adapter_id, None)
            if weights is None or not weights.current():
                weights = self._load(adapter_id)
            if weights.rank > self.max_rank:
                raise ValueError(
                    f"adapter {adapter_id!r} has rank {weights.rank}; this server serves up to "
                    f"{self.max_rank} (lora_max_rank)"
                )
            slot = self._free_slot(adapter_id)
            for bank in self.stacks.values():
                bank.write(slot, weights)
            self._slot_of[adapter_id] = slot
            self._source[slot] = weights.source
        self._users[slot] += 1
        self._used_at[slot] = self._clock
        return slot

    def prefetch(self, adapter_id: str) -> None:
        """Reads a non-resident adapter from disk on the caller's thread (a request's
        submit), so admitting it on the engine thread only copies it to the device: a
        frame's stall at most, not a file read. Errors surface at acquire."""
        slot = self._slot_of.get(adapter_id)
        if slot is not None and self._is_current(slot):
            return
        with self._read_lock:
            read = self._read.get(adapter_id)
        if read is not None and read.current():
            return
        try:
            weights = self._load(adapter_id)
        except Exception:  # noqa: BLE001 - acquire loads again and answers the request with the error
            return
        with self._read_lock:
            if len(self._read) >= self.capacity:  # bounded: requests for many adapters at once
                self._read.pop(next(iter(self._read)))
            self._read[adapter_id] = weights

    def release(self, slot: int) -> None:
        if slot:
            self._users[slot] -= 1

    def rows(self, stack: str, slots: torch.Tensor) -> LoraRows:
        return LoraRows(self.stacks[stack], slots)

    def resident(self) -> dict[str, int]:
        return dict(self._slot_of)

    def version(self, slot: int) -> str:
        """What tells slot `slot`'s weights from other weights once under the same id (its
        source folder): part of the prefix cache's keys."""
        return str(self._source[slot] or "")

    def _is_current(self, slot: int) -> bool:
        return _present(self._source[slot])

    def _free_slot(self, adapter_id: str) -> int:
        taken = set(self._slot_of.values())
        # Not taken and unused: a stale adapter's slot stays with its running requests.
        free = [slot for slot in range(1, self.capacity + 1) if slot not in taken and not self._users[slot]]
        if free:
            return free[0]
        idle = [slot for slot in taken if self._users[slot] == 0]
        if not idle:
            raise RuntimeError(
                f"adapter {adapter_id!r} cannot be loaded now: all {self.capacity} adapter slots "
                "serve running requests (lora_slots); retry shortly"
            )
        evicted = min(idle, key=self._used_at.__getitem__)
        del self._slot_of[next(name for name, slot in self._slot_of.items() if slot == evicted)]
        return evicted
