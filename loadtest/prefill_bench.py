"""Prefill of N waiting prompts: computed together (one forward per round, engine/prefill.py)
against one prompt at a time (what the engine did before), on this machine's CPU.

For each case (model, N): N text prompts of different lengths (`--tokens` up to twice
that, random ids) go through `prefill_together` once with all N and once per prompt;
the figure is the median over `--repeats` of each side's total time, alternated so a
machine that slows down slows both. Weights as plain F.linear (cpu_kernels="mkl") so the
comparison is the batching, not the kernel choice at load. The hidden state each prompt
leaves is compared between the two sides (max abs difference).

    python -m loadtest.prefill_bench --cases tiny:1,tiny:8,full:1,full:4 --out loadtest/results
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from csm_triton.engine import CsmLM, GenerationRequest
from csm_triton.engine.prefill import PrefillJob, prefill_together
from csm_triton.engine.prefix_cache import PrefixCache
from csm_triton.engine.requests import RequestHandle
from loadtest.engine_bench import random_full_size_model, tiny_model
from loadtest.workload import cpu_model, git_commit

RESULTS = Path(__file__).resolve().parent / "results"


def prompts(model, count: int, tokens: int, seed: int = 0) -> list[GenerationRequest]:
    """`count` text prompts of tokens..2*tokens ids (no audio), lengths spread evenly."""
    rng = np.random.default_rng(seed)
    vocab = min(model.config.text_vocab_size, 128_000) - 10
    lengths = np.linspace(tokens, 2 * tokens, count).astype(int)
    return [
        GenerationRequest(
            np.concatenate([[model.config.bos_token_id], rng.integers(3, vocab, n)]), np.zeros((0, 32), np.int64), 1
        )
        for n in lengths
    ]


@torch.inference_mode()
def prefill_seconds(lm: CsmLM, generations, together: bool) -> tuple[float, torch.Tensor]:
    """Seconds to prefill every prompt (together, or one call each) and the hidden states
    they leave, in submission order."""
    rows = len(generations)
    cache = lm.new_backbone_cache(rows, max(len(g.input_ids) for g in generations) + 1)
    hidden = torch.zeros(rows, lm.backbone_hidden_size, dtype=lm.dtype)
    jobs = [PrefillJob.of(lm, PrefixCache(0), RequestHandle(g, None), 0, "") for g in generations]
    started = time.perf_counter()
    if together:
        prefill_together(lm, cache, hidden, PrefixCache(0), jobs, 0)
    else:
        for row, job in enumerate(jobs):
            prefill_together(lm, cache, hidden, PrefixCache(0), [job], row)
    seconds = time.perf_counter() - started
    return seconds, hidden[[job.row for job in jobs]].clone()


def measure(kind: str, count: int, tokens: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = tiny_model(0) if kind == "tiny" else random_full_size_model(0)
    lm = CsmLM(model, device=torch.device("cpu"), dtype=torch.float32, max_batch=count, cpu_kernels="mkl")
    generations = prompts(model, count, tokens)
    prefill_seconds(lm, generations, True)  # warm-up: first-call allocations
    times = {True: [], False: []}
    states = {}
    for _ in range(repeats):
        for together in (False, True):
            seconds, states[together] = prefill_seconds(lm, generations, together)
            times[together].append(seconds)
    alone, shared = statistics.median(times[False]), statistics.median(times[True])
    return {
        "model": kind,
        "prompts": count,
        "tokens": sum(len(g.input_ids) for g in generations),
        "alone_ms": alone * 1000,
        "together_ms": shared * 1000,
        "ratio": shared / alone,
        "max_abs_diff": float((states[True] - states[False]).abs().max()),
    }


def markdown(rows: list[dict], command: str) -> str:
    commit = git_commit()
    lines = [
        "# Prefill of waiting prompts: together vs one at a time (CPU, fp32)",
        "",
        f"- machine: {cpu_model()}, {torch.get_num_threads()} torch threads; commit `{commit}`",
        f"- command: `{command}`",
        "- each figure: median over repeats (alternating the two sides) of the time to prefill every prompt;"
        " text prompts of different lengths, random ids; weights as plain F.linear",
        "",
        "| model | prompts | tokens | one at a time ms | together ms | together / alone | max abs diff of hidden |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['prompts']} | {row['tokens']} | {row['alone_ms']:.1f} | "
            f"{row['together_ms']:.1f} | {row['ratio']:.2f} | {row['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="tiny:1,tiny:8,full:1,full:4", help="model:prompts, comma-separated")
    parser.add_argument("--tokens", type=int, default=48, help="the shortest prompt's tokens (the longest: twice)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write prefill_batch_cpu.md there")
    args = parser.parse_args(argv)
    rows = []
    for case in args.cases.split(","):
        kind, count = case.split(":")
        row = measure(kind, int(count), args.tokens, args.repeats)
        print(row, flush=True)
        rows.append(row)
    text = markdown(rows, "python -m loadtest.prefill_bench " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "prefill_batch_cpu.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
