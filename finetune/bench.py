"""Training speed and memory on this machine: steps/s and peak RSS of finetune.train.

    python -m finetune.bench --model tiny|full --steps N --out loadtest/results/finetune_cpu.md

Speech is made with espeak-ng (12 clips, 2 voices); `full` is a random checkpoint of
CSM-1B's shape (loadtest.gpu_steps.build_full_size_checkpoint, no download). Each model
runs in its own process, so peak RSS is that run's alone. Rows are appended to the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SENTENCES = (
    "Hello there, how are you?",
    "The fox jumps over the dog.",
    "Bring an umbrella today.",
    "We walked along the river.",
    "The library opens at nine.",
    "Where is the station?",
)


def make_speech(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for speaker, voice in enumerate(("en+m3", "en+f3")):
        for index, text in enumerate(SENTENCES):
            subprocess.run(["espeak-ng", "-v", voice, "-w", str(folder / f"s{speaker}_{index}.wav"), text], check=True)
            (folder / f"s{speaker}_{index}.txt").write_text(text)
    return folder


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def run(model: str, steps: int, work: Path, extra: list[str]) -> dict:
    import torch

    from finetune.train import parse_args, train

    checkpoint = work / f"{model}-csm"
    if not (checkpoint / "config.json").is_file():
        # In a process of its own, so the builder's copy of the weights is not in this RSS.
        builder = (
            "from loadtest.gpu_steps import build_full_size_checkpoint as build"
            if model == "full"
            else "from export.tiny_checkpoint import build_tiny_checkpoint as build"
        )
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; {builder}; build(__import__('pathlib').Path(sys.argv[1]))",
                str(checkpoint),
            ],
            check=True,
        )
    data = make_speech(work / "speech")
    args = parse_args(
        [
            "--data",
            str(data),
            "--out",
            str(work / "out"),
            "--checkpoint",
            str(checkpoint),
            "--cache-dir",
            str(work / "cache"),
            "--steps",
            str(steps),
            "--grad-accum",
            "1",
            "--eval-every",
            str(10**9),
            "--save-every",
            str(10**9),
            "--eval-fraction",
            "0.09",
            "--no-progress",
            *extra,
        ]
    )
    started = time.perf_counter()
    train(args)
    rows = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    times = [r["elapsed_s"] for r in rows if r["kind"] == "train"]
    # The first step pays one-time costs (allocator, oneDNN): steady state from the second on.
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 1 / times[0]
    return {
        "model": model,
        "steps": steps,
        "steps_per_s": rate,
        "s_per_step": 1 / rate,
        "first_step_s": times[0],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "wall_s": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
        "options": " ".join(extra),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "full"], required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True, help="markdown table to append a row to")
    parser.add_argument(
        "--work", type=Path, default=None, help="keep the checkpoint, speech and codes here (reused by the next run)"
    )
    parser.add_argument("extra", nargs="*", help="more finetune.train options (after --)")
    args = parser.parse_args(argv)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        row = run(args.model, args.steps, args.work, args.extra)
    else:
        with tempfile.TemporaryDirectory() as work:
            row = run(args.model, args.steps, Path(work), args.extra)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not args.out.exists():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            "# Fine-tuning speed on CPU (finetune.train, LoRA r 32 on q/k/v/o/gate/up/down)\n\n"
            f"Machine: {cpu_model()}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} "
            "cores (shared with other jobs while measured), fp32.\n"
            "Data: 12 espeak-ng clips of 1.5-2.5 s, 2 speakers; batch 1, no accumulation; steps/s from the "
            "second step on; first step includes the base model's held-out loss; peak RSS of the training "
            "process (checkpoint built in another).\n\n"
            "| model | commit | options | steps | steps/s | s/step | first step (s) | peak RSS (GiB) | threads |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|\n"
        )
    with open(args.out, "a") as table:
        table.write(
            f"| {row['model']} | {commit} | {row['options'] or 'defaults'} | {row['steps']} | "
            f"{row['steps_per_s']:.3f} | {row['s_per_step']:.2f} | {row['first_step_s']:.2f} | "
            f"{row['peak_rss_gib']:.2f} | {row['threads']} |\n"
        )
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
