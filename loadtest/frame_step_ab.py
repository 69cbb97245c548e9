"""Engine ms per frame step, two checkouts side by side on this machine (A/B, alternated).

Each measurement is a fresh process that imports the engine of one checkout (its
`src/` first on sys.path), builds the model (the tiny CSM, or CSM-1B's shape with random
weights in fp32), runs `--frames` greedy frames for `batch` requests and prints the
median step time after the prefill. Runs alternate A, B, A, B... so a machine that
slows down (thermal, neighbours) slows both; the table takes the median per side.
Weights use plain F.linear (cpu_kernels="mkl") in both, so the comparison is the
frame step's own code, not the kernel choice at load.

    python -m loadtest.frame_step_ab --before /tmp/before-checkout --after . --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from loadtest.workload import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"

# Runs inside the measured checkout: only the engine API both sides have.
MEASURE = r"""
import json, statistics, sys, time
import numpy as np, torch
sys.path.insert(0, sys.argv[1] + "/src"); sys.path.insert(1, sys.argv[1])
from csm_triton.engine import CsmLM, EngineConfig, GenerationEngine, GenerationRequest
model_kind, batch, frames = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
if model_kind == "tiny":
    from loadtest.engine_bench import tiny_model
    model = tiny_model(0)
else:
    from loadtest.engine_bench import random_full_size_model
    model = random_full_size_model(0)
lm = CsmLM(model, device=torch.device("cpu"), dtype=torch.float32, max_batch=batch, cpu_kernels="mkl")
engine = GenerationEngine(lm, EngineConfig(max_slots=batch, max_context=512, warm_up=False))
engine.config.max_prefills_per_step = batch
rng = np.random.default_rng(0)
vocab = min(model.config.text_vocab_size, 128_000) - 10
handles = [engine.submit(GenerationRequest(np.concatenate([[model.config.bos_token_id], rng.integers(3, vocab, 100)]),
                                           np.zeros((0, 32), np.int64), max_frames=frames, greedy=True))
           for _ in range(batch)]
times = []
with torch.inference_mode():
    while engine.has_work():
        engine.step()
        times.append(time.perf_counter())
gaps = np.diff(times)[1:]  # after the step that prefilled
print(json.dumps({"ms_per_step": float(statistics.median(gaps)) * 1000,
                  "codes": [h.result().codes.tolist() for h in handles]}))
"""


def measure(checkout: Path, model: str, batch: int, frames: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(checkout.resolve()), model, str(batch), str(frames)],
        capture_output=True,
        text=True,
        check=True,
        cwd=checkout,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--cases", default="tiny:1:40,tiny:8:40,full:1:6,full:8:6", help="model:batch:frames, comma-separated"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "frame_step_ab_cpu.md")
    args = parser.parse_args(argv)
    sides = {"before": args.before, "after": args.after}
    rows = []
    for case in args.cases.split(","):
        model, batch, frames = case.split(":")
        figures = {side: [] for side in sides}
        codes = {}
        for _ in range(args.rounds):
            for side, checkout in sides.items():
                result = measure(checkout, model, int(batch), int(frames))
                figures[side].append(result["ms_per_step"])
                codes[side] = result["codes"]
        before, after = (statistics.median(figures[s]) for s in sides)
        rows.append((model, int(batch), before, after, codes["before"] == codes["after"]))
        print(
            f"{model} batch {batch}: before {before:.2f} ms/step, after {after:.2f} ms/step "
            f"({after / before:.2f}x), same greedy codes: {codes['before'] == codes['after']}",
            flush=True,
        )
    commits = {
        side: subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True
        ).stdout.strip()
        for side, path in sides.items()
    }
    lines = [
        "# Engine frame step before/after on the CPU (fp32)",
        "",
        f"- machine: {cpu_model()}; before = `{commits['before']}`, after = `{commits['after']}`",
        f"- command: `python -m loadtest.frame_step_ab --before <checkout of {commits['before']}> --after . "
        f"--rounds {args.rounds} --cases {args.cases}`",
        "- each figure: median over rounds (alternating before/after processes) of the median step time after "
        "the prefill; greedy, 100-token prompts; weights as plain F.linear on both sides",
        "",
        "| model | batch | before ms/step | after ms/step | after / before | same greedy codes |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {model} | {batch} | {before:.2f} | {after:.2f} | {after / before:.2f} | {same} |"
        for model, batch, before, after, same in rows
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
