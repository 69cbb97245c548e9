"""Which CPU kernel each weight shape uses, chosen by timing the candidates at load.

A frame step reads every weight once or more (the depth decoder 31 times), so on CPU
it runs at the speed the GEMM kernel streams weights from memory. Which kernel does
that best depends on the CPU and the row count: on an AMD EPYC (Zen 4) oneDNN's packed
layout was the fastest at one row and at eight; on an Intel Xeon with AMX aten's plain
GEMM (MKL) is the fastest at one row and oneDNN packed for eight rows at eight
(docs/performance.md). So nothing is assumed: per weight shape and per row bucket the
candidates are timed once on that shape's actual weights, cycled from memory (more
bytes than the last-level cache, as in a frame step), and the fastest is kept.

Kernels:
- "mkl": `F.linear` on the plain weight (aten's GEMM: MKL in fp32; in bf16 aten calls
  oneDNN without a packed layout). Keeps no extra copy.
- "onednn": oneDNN's `_linear_pointwise` on the weight packed for the bucket's rows
  (fp32, and bf16 where the CPU has bf16 instructions). One copy per bucket.

Only the copies some bucket uses are kept: a one-slot engine has one bucket, so one
copy of each weight, whatever wins.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from csm_triton import constants as C

LOG = logging.getLogger(__name__)

KERNELS = ("mkl", "onednn")
MODES = ("measure", *KERNELS)  # the `cpu_kernels` setting


def row_buckets(max_batch: int | None) -> tuple[int, ...]:
    """The row counts a weight is prepared for, given the most rows a frame step carries.

    A call with r rows uses the smallest bucket >= r (the largest beyond that: prefills).
    Engines with fewer slots than the largest packed size get a bucket of their own
    size, not the next one down: four rows read faster from a layout packed for four.
    """
    sizes = C.CPU_PACKED_BATCH_SIZES
    if not max_batch:
        return tuple(sorted(sizes))
    return tuple(sorted({size for size in sizes if size < max_batch} | {min(max_batch, max(sizes))}))


def available_kernels(dtype: torch.dtype) -> tuple[str, ...]:
    if dtype == torch.float32:
        return KERNELS
    if dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return KERNELS
    return ("mkl",)


def prepare(kernel: str, weight: torch.Tensor, rows: int) -> torch.Tensor:
    """The weight copy `kernel` reads for calls of up to `rows` rows."""
    if kernel == "mkl":
        return weight
    if kernel == "onednn":
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    raise ValueError(f"unknown CPU kernel {kernel!r}; expected one of {', '.join(KERNELS)}")


def apply(kernel: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [rows, in] with a copy from `prepare(kernel, ...)` -> [rows, out]."""
    if kernel == "mkl":
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@dataclass
class ShapeChoice:
    """The decision for one weight shape: bucket rows -> kernel, with the timings."""

    shape: tuple[int, int]  # [out, in]
    dtype: torch.dtype
    names: list[str]
    choice: dict[int, str]
    ms: dict[int, dict[str, float]] = field(default_factory=dict)  # rows -> kernel -> ms per call
    how: str = "measured"

    def summary(self) -> str:
        names = ", ".join(sorted(set(self.names)))
        parts = []
        for rows, kernel in self.choice.items():
            times = self.ms.get(rows, {})
            label = f"{rows} row{'s' if rows > 1 else ''}"
            if times:
                others = ", ".join(f"{name} {ms:.3f}" for name, ms in times.items() if name != kernel)
                parts.append(f"{label} {kernel} {times[kernel]:.3f} ms" + (f" (vs {others})" if others else ""))
            else:
                parts.append(f"{label} {kernel}")
        copies = sorted({_copy_label(kernel, rows) for rows, kernel in self.choice.items()})
        return (
            f"{self.shape[0]}x{self.shape[1]} {str(self.dtype).replace('torch.', '')} "
            f"[{names} x{len(self.names)}] {self.how}: {'; '.join(parts)}; keeps {' + '.join(copies)}"
        )


@dataclass
class KernelReport:
    shapes: list[ShapeChoice]
    seconds: float
    note: str = ""

    def lines(self) -> list[str]:
        if self.note:
            return [self.note]
        return [choice.summary() for choice in self.shapes] + [f"kernel choice took {self.seconds:.1f} s"]


def choose_kernels(
    named_linears: list[tuple[str, object]], *, buckets: tuple[int, ...], mode: str, device: torch.device
) -> KernelReport:
    """Decide and apply (`Linear.use`) a kernel per bucket for every Linear, per shape and
    per the weight's own dtype."""
    if mode not in MODES:
        raise ValueError(f"cpu_kernels must be one of {', '.join(MODES)}, got {mode!r}")
    if device.type != "cpu":
        return KernelReport([], 0.0, note=f"{device.type}: F.linear for every weight (CPU kernel choice not used)")
    started = time.perf_counter()
    # By shape and by the weight's own dtype: the heads stay fp32 in a bf16 model (lm.py).
    groups: dict[tuple[tuple[int, int], torch.dtype], list[tuple[str, object]]] = {}
    for name, linear in named_linears:
        groups.setdefault((tuple(linear.weight.shape), linear.dtype), []).append((name, linear))
    shapes = []
    for (shape, dtype), members in groups.items():
        available = available_kernels(dtype)
        names = [name for name, _ in members]
        small = shape[0] * shape[1] * dtype.itemsize < C.CPU_KERNEL_MIN_TIMED_BYTES
        if mode == "measure" and len(available) > 1 and not small:
            ms = {rows: _time_candidates([linear.weight for _, linear in members], rows, available) for rows in buckets}
            choice = {rows: min(times, key=times.get) for rows, times in ms.items()}
            decided = ShapeChoice(shape, dtype, names, choice, ms)
        else:
            # Forced, or nothing to choose from (fp16), or too small to matter: a weight
            # under CPU_KERNEL_MIN_TIMED_BYTES is call overhead and cache, not memory
            # traffic, and timing a whole model of them (the tiny test model) costs
            # seconds of load on a busy machine.
            kernel = mode if mode in available else "mkl"
            decided = ShapeChoice(
                shape,
                dtype,
                names,
                {rows: kernel for rows in buckets},
                how="forced" if mode != "measure" else "small, not timed" if small else "only one",
            )
        for _, linear in members:
            linear.use(decided.choice)
        LOG.info("CPU kernels: %s", decided.summary())
        shapes.append(decided)
    return KernelReport(shapes, time.perf_counter() - started)


def _time_candidates(weights: list[torch.Tensor], rows: int, kernels: tuple[str, ...]) -> dict[str, float]:
    """ms per call of each kernel at `rows` rows, weights cycled from memory.

    The cycle is this shape's weights, plus clones until it holds more bytes than the
    last-level cache (CPU_KERNEL_TIMING_BYTES): timing one weight over and over would
    time the cache. Kernels alternate within each repeat so that other work on the
    machine hits them alike; the best repeat counts (noise only ever adds time).
    """
    weight_bytes = weights[0].numel() * weights[0].element_size()
    count = max(2, min(C.CPU_KERNEL_TIMING_MAX_WEIGHTS, -(-C.CPU_KERNEL_TIMING_BYTES // weight_bytes)))
    cycle = [weights[i] if i < len(weights) else weights[i % len(weights)].clone() for i in range(count)]
    x = torch.randn(rows, weights[0].shape[1], dtype=weights[0].dtype)
    prepared = {kernel: [prepare(kernel, weight, rows) for weight in cycle] for kernel in kernels}
    best = {kernel: float("inf") for kernel in kernels}
    # Small shapes' passes take microseconds, and one preemption spoils a pass: they
    # repeat until CPU_KERNEL_TIMING_SECONDS[0] have gone by. On a busy machine a pass
    # can take far longer than it should: after CPU_KERNEL_TIMING_SECONDS[1] one
    # measured repeat is enough, so that load time stays bounded.
    least, most = C.CPU_KERNEL_TIMING_SECONDS
    with torch.no_grad():
        for kernel in kernels:  # warm-up: oneDNN builds its primitive on the first call
            for weight in prepared[kernel][:2]:
                apply(kernel, x, weight, None)
        began, repeat = time.perf_counter(), 0
        while True:
            for kernel in kernels:
                started = time.perf_counter()
                for weight in prepared[kernel]:
                    apply(kernel, x, weight, None)
                best[kernel] = min(best[kernel], (time.perf_counter() - started) * 1000 / len(cycle))
            repeat += 1
            elapsed = time.perf_counter() - began
            if elapsed >= most or (repeat >= C.CPU_KERNEL_TIMING_REPEATS and (elapsed >= least or repeat >= 100)):
                break
    return best


def _copy_label(kernel: str, rows: int) -> str:
    return "plain weight" if kernel == "mkl" else f"{kernel} packed for {rows}"
