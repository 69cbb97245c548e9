"""Engine benchmark: ms/frame and x real time against batch size, for this engine and
for transformers' `generate` on the same weights, in the same process.

    python -m loadtest.engine_bench [--tiny] [--frames 8] [--batch-sizes 1,8] [--out loadtest/results]

Full-size CSM-1B shape with random weights by default (speed does not depend on the
weights' values), `--tiny` for a quick run. Greedy decoding, so the tokens of both
implementations are compared one for one. Writes JSON and a markdown table named
after the device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from csm_triton import constants as C
from loadtest.workload import cpu_model
from csm_triton.engine import CsmLM, EngineConfig, GenerationEngine, GenerationRequest
from csm_triton.engine.lm import default_device, default_dtype

SUPPRESSED = list(range(C.CODEBOOK_SIZE, C.LM_AUDIO_VOCAB_SIZE))
FRAME_SECONDS = 1 / C.FRAME_RATE_HZ


def random_full_size_model(seed: int):
    """CsmConfig() defaults (CSM-1B's shape) with random weights, built fast: no
    per-module init, one normal fill per tensor."""
    from transformers import CsmConfig, CsmForConditionalGeneration
    from transformers.initialization import no_init_weights

    torch.manual_seed(seed)
    with no_init_weights():
        model = CsmForConditionalGeneration(CsmConfig())
    model.codec_model = None  # not part of generation; saves its init
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02)
    return model.eval()


def tiny_model(seed: int):
    from export.tiny_checkpoint import build_tiny_checkpoint
    from transformers import CsmForConditionalGeneration

    folder = Path(tempfile.mkdtemp(prefix="csm-bench-"))
    build_tiny_checkpoint(folder, seed=seed)
    return CsmForConditionalGeneration.from_pretrained(str(folder)).eval()


class FrameClock:
    """A `generate` streamer that timestamps every frame."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def generate_frames(model, prompt: np.ndarray, frames: int, device) -> tuple[np.ndarray, list[float]]:
    clock = FrameClock()
    clock.put(None)  # start
    output = model.generate(
        input_ids=torch.as_tensor(prompt, device=device)[None], max_new_tokens=frames, do_sample=False,
        depth_decoder_do_sample=False, suppress_tokens=SUPPRESSED, depth_decoder_suppress_tokens=SUPPRESSED,
        streamer=clock,
    )
    _sync(device)
    return output[0].cpu().numpy(), clock.times


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def steady_ms_per_frame(times: list[float]) -> float:
    """Median gap between frames after the first (which includes the prefill)."""
    gaps = np.diff(times)[1:]
    return float(statistics.median(gaps) * 1000) if len(gaps) else float("nan")


def engine_run(engine: GenerationEngine, prompts: list[np.ndarray], frames: int) -> dict:
    handles = [
        engine.submit(GenerationRequest(p, np.zeros((0, C.NUM_CODEBOOKS), np.int64), max_frames=frames, greedy=True))
        for p in prompts
    ]
    # Admit everyone before timing the steady state: all prefills happen in step 1.
    engine.config.max_prefills_per_step = len(prompts)
    started = time.perf_counter()
    step_times = []
    while engine.has_work():
        engine.step()
        _sync(engine.lm.device)
        step_times.append(time.perf_counter())
    total = time.perf_counter() - started
    codes = [h.result().codes for h in handles]
    steady = float(statistics.median(np.diff(step_times))) * 1000 if len(step_times) > 2 else float("nan")
    return {"codes": codes, "ms_per_step": steady, "wall_s": total}


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(args) -> dict:
    device = torch.device(args.device) if args.device else default_device()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype) or default_dtype(device)
    started = time.perf_counter()
    model = tiny_model(args.seed) if args.tiny else random_full_size_model(args.seed)
    model = model.to(device=device, dtype=dtype)
    print(f"device: {machine_description(device)} ({device}, {dtype}); model built in "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    max_batch = max(args.batch_sizes)
    lm = CsmLM(model, device=device, dtype=dtype, max_batch=max_batch)
    text_vocab = model.config.text_vocab_size
    rng = np.random.default_rng(args.seed)
    prompts = [
        np.concatenate([[model.config.bos_token_id], rng.integers(3, min(text_vocab, 128_000) - 10, args.prompt_tokens + 7 * i)])
        for i in range(max_batch)
    ]
    max_context = args.prompt_tokens + 7 * max_batch + args.frames + 8
    rows = []
    # transformers generate, one request at a time: its per-frame speed at batch 1 is
    # also its aggregate throughput when it serves requests one after another.
    generated, generate_ms = [], []
    generate_frames(model, prompts[0], 2, device)  # warm-up
    for prompt in prompts[: (max_batch if args.full_reference else 1)]:
        codes, times = generate_frames(model, prompt, args.frames, device)
        generated.append(codes)
        generate_ms.append(steady_ms_per_frame(times))
        print(f"generate: {generate_ms[-1]:.1f} ms/frame", file=sys.stderr)
    generate_ms_per_frame = float(statistics.median(generate_ms))
    for batch in args.batch_sizes:
        engine = GenerationEngine(lm, EngineConfig(max_slots=batch, max_context=max_context))
        engine_run(engine, prompts[:1], 2)  # warm-up
        result = engine_run(engine, prompts[:batch], args.frames)
        compared = min(batch, len(generated))
        identical = all(np.array_equal(result["codes"][i], generated[i]) for i in range(compared))
        frames_per_s = batch * 1000 / result["ms_per_step"]
        row = {
            "batch": batch,
            "engine_ms_per_step": round(result["ms_per_step"], 2),
            "engine_ms_per_frame_per_stream": round(result["ms_per_step"], 2),
            "engine_x_real_time_aggregate": round(frames_per_s * FRAME_SECONDS, 3),
            "generate_ms_per_frame_batch1": round(generate_ms_per_frame, 2),
            "generate_x_real_time_one_at_a_time": round(1000 / generate_ms_per_frame * FRAME_SECONDS, 3),
            "speedup_vs_generate": round(frames_per_s / (1000 / generate_ms_per_frame), 2),
            "tokens_identical_to_generate": identical,
            "requests_compared": compared,
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        del engine
    return {
        # Other work on the machine skews CPU figures: the 1-minute load average at the end.
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "device": machine_description(device),
        "torch_device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "model": "tiny random CSM" if args.tiny else "CSM-1B shape (CsmConfig defaults), random weights",
        "frames_per_request": args.frames,
        "prompt_tokens": args.prompt_tokens,
        "commit": git_commit(),
        "command": "python -m loadtest.engine_bench " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "rows": rows,
    }


def markdown(report: dict) -> str:
    lines = [
        f"# Engine vs transformers `generate` ({report['model']})",
        "",
        f"- device: {report['device']} (`{report['torch_device']}`, {report['dtype']})",
        f"- commit: `{report['commit']}`, torch {report['torch']}; 1-minute load average at the end "
        f"{report['load_average_1min_at_end']} (this run's own load is about 2)",
        f"- command: `{report['command']}`",
        f"- greedy, {report['frames_per_request']} frames per request, prompts of "
        f"{report['prompt_tokens']}+ tokens; steady-state medians (prefill excluded)",
        "",
        "| batch | engine ms/step | engine x real time (aggregate) | generate ms/frame (b=1) | "
        "speed-up vs generate one at a time | tokens identical |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['batch']} | {row['engine_ms_per_step']} | {row['engine_x_real_time_aggregate']} | "
            f"{row['generate_ms_per_frame_batch1']} | {row['speedup_vs_generate']}x | "
            f"{row['tokens_identical_to_generate']} ({row['requests_compared']} compared) |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random CSM instead of the full-size shape")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-reference", action="store_true",
                        help="run generate for every request of the largest batch (compares all tokens)")
    parser.add_argument("--out", type=Path, default=None, help="folder for JSON + markdown results")
    args = parser.parse_args(argv)
    report = run(args)
    table = markdown(report)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"engine_{'tiny' if args.tiny else 'full'}_{report['torch_device'].split(':')[0]}_{report['dtype']}"
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
