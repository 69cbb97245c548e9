"""What per-request LoRA adapters cost a frame step, at CSM-1B's full shape (random weights).

Three engines over one model, batch 8, greedy, the median step after the prefill:
  base     8 rows of the base model (lora_slots 0: no adapter code at all)
  mixed    8 rows over 4 adapters (2 rows each), rank 16 on every projection of the
           backbone and the depth decoder, applied per row (engine/lora.py)
  merged   8 rows of the base with one of those adapters merged into the weights (what
           serving a fine-tuned voice meant before: same shapes as the base)
and the bytes one resident adapter slot takes. Weights as plain F.linear (mkl) in every
run, so only the adapter code differs.

    python -m loadtest.lora_bench --out loadtest/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from csm_triton.engine import CsmLM, EngineConfig, GenerationEngine, GenerationRequest
from csm_triton.engine.lora import FUSED, LoraWeights
from loadtest.engine_bench import random_full_size_model
from loadtest.workload import cpu_model, git_commit

ADAPTERS, RANK, BATCH = 4, 16, 8


def random_adapter(lm: CsmLM, seed: int) -> LoraWeights:
    generator = torch.Generator().manual_seed(seed)
    matrices = {}
    for name, stack in (("backbone", lm.backbone), ("depth", lm.depth)):
        for index, layer in enumerate(stack.layers):
            sizes = {
                "q_proj": (stack.num_heads * stack.head_dim, layer.qkv.in_features),
                "k_proj": (stack.num_kv_heads * stack.head_dim, layer.qkv.in_features),
                "v_proj": (stack.num_kv_heads * stack.head_dim, layer.qkv.in_features),
                "o_proj": (layer.o_proj.out_features, layer.o_proj.in_features),
                "gate_proj": (stack.intermediate_size, layer.gate_up.in_features),
                "up_proj": (stack.intermediate_size, layer.gate_up.in_features),
                "down_proj": (layer.down.out_features, layer.down.in_features),
            }
            for projection, (out, inputs) in sizes.items():
                matrices[(name, index, projection)] = (
                    torch.randn(RANK, inputs, generator=generator) * 0.01,
                    torch.randn(out, RANK, generator=generator) * 0.01,
                )
    return LoraWeights(matrices, 2.0, RANK)


def steady_ms(engine: GenerationEngine, adapters: list[str | None], frames: int) -> float:
    rng = np.random.default_rng(0)
    for adapter in adapters:
        ids = np.concatenate([[128000], rng.integers(3, 120_000, 100)])
        engine.submit(
            GenerationRequest(ids, np.zeros((0, 32), np.int64), max_frames=frames, greedy=True, adapter=adapter)
        )
    engine.config.max_prefills_per_step = len(adapters)
    times = []
    with torch.inference_mode():
        while engine.has_work():
            engine.step()
            times.append(time.perf_counter())
    return float(statistics.median(np.diff(times)[1:])) * 1000


def merge(lm: CsmLM, weights: LoraWeights) -> None:
    """The adapter added into the base weights, in place (W + scale B A per projection)."""
    with torch.no_grad():
        for name, stack in (("backbone", lm.backbone), ("depth", lm.depth)):
            for index, layer in enumerate(stack.layers):
                for fused, parts in FUSED.items():
                    linear, row = getattr(layer, fused), 0
                    for projection in parts:
                        a, b = weights.matrices[(name, index, projection)]
                        delta = (b @ a) * weights.scale
                        linear.weight[row : row + delta.shape[0]] += delta
                        row += delta.shape[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    lm = CsmLM(
        random_full_size_model(0), device=torch.device("cpu"), dtype=torch.float32, max_batch=BATCH, cpu_kernels="mkl"
    )
    adapters = {f"adapter-{i}": random_adapter(lm, i) for i in range(ADAPTERS)}
    config = dict(max_slots=BATCH, max_context=512, warm_up=False)
    rows = {"base": steady_ms(GenerationEngine(lm, EngineConfig(**config)), [None] * BATCH, args.frames)}
    mixed = GenerationEngine(
        lm, EngineConfig(**config, lora_slots=ADAPTERS, lora_max_rank=RANK), adapter_loader=adapters.__getitem__
    )
    slot_bytes = sum(bank.nbytes for bank in mixed.adapters.stacks.values()) // ADAPTERS
    rows["mixed"] = steady_ms(mixed, [f"adapter-{i % ADAPTERS}" for i in range(BATCH)], args.frames)
    del mixed
    merge(lm, adapters["adapter-0"])
    rows["merged"] = steady_ms(GenerationEngine(lm, EngineConfig(**config)), [None] * BATCH, args.frames)
    report = {
        "machine": cpu_model(),
        "threads": torch.get_num_threads(),
        "commit": git_commit(),
        "batch": BATCH,
        "rank": RANK,
        "adapters": ADAPTERS,
        "ms_per_step": rows,
        "mixed_over_base": rows["mixed"] / rows["base"],
        "bytes_per_adapter_slot": slot_bytes,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "lora_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
        lines = [
            "# Per-request LoRA adapters: frame step cost (CSM-1B's shape, random weights, fp32 CPU)",
            "",
            f"- machine: {report['machine']}, {report['threads']} threads; commit `{report['commit']}`",
            f"- command: `python -m loadtest.lora_bench --frames {args.frames} --out loadtest/results`",
            f"- batch {BATCH}, greedy, 100-token prompts, median step after the prefill; rank {RANK} on every "
            "projection of the backbone and depth decoder; weights as plain F.linear in every run",
            "",
            "| run | ms per frame step | vs base |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {ms:.1f} | {ms / rows['base']:.2f}x |" for name, ms in rows.items()]
        lines += [
            "",
            f"One resident adapter slot (rank {RANK}, fp32): {slot_bytes / 2**20:.1f} MiB "
            f"({slot_bytes / 2**20 / 2:.1f} MiB in bf16). Target: mixed within 25 % of base.",
        ]
        (args.out / "lora_cpu.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
