"""Engine benchmark: ms/frame and x real time against batch size, for this engine and
for transformers' `generate` on the same weights, in the same process.

    python -m loadtest.engine_bench [--tiny] [--frames 8] [--batch-sizes 1,8] [--out loadtest/results]

Full-size CSM-1B shape with random weights by default (speed does not depend on the
weights' values), `--tiny` for a quick run. Both run the model in `--dtype` (bf16 on
CUDA, fp32 on a CPU by default) as transformers' own bf16 load leaves it: rotary
frequencies in fp32. Greedy decoding, so the tokens of both implementations are
compared one for one. Every row has the floor of the machine it
ran on: the weight bytes a frame step reads / the memory bandwidth measured in the
same run. On a CPU in fp32, bf16 rows follow (speed, and greedy token agreement with
fp32 over 64 frames). Writes JSON and a markdown table named after the device (and
the CPU model: kernels and floors differ per CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from csm_triton import constants as C
from csm_triton.engine import CsmLM, EngineConfig, GenerationEngine, GenerationRequest
from csm_triton.engine.lm import default_device, default_dtype, to_compute_dtype
from loadtest.engine_bench_markdown import markdown
from loadtest.workload import cpu_model, git_commit

SUPPRESSED = list(range(C.CODEBOOK_SIZE, C.LM_AUDIO_VOCAB_SIZE))
# No fp16: CSM was trained in bf16 and the engine refuses fp16 unless opted in (lm.check_dtype),
# so a figure for it would describe a configuration nobody should serve.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
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


def bench_model(args, device: torch.device, dtype: torch.dtype):
    """The model both implementations run, in `dtype` as transformers' own bf16 load
    leaves it (engine.lm.to_compute_dtype: the rotary frequencies stay fp32). `generate`
    runs on this model, so its tokens are the reference for the engine's: `.to(bfloat16)`
    would round the rotary frequencies, shift every later position's angle in `generate`
    alone (the engine rebuilds its tables in fp32) and make tokens_identical compare with
    a model transformers never loads."""
    model = tiny_model(args.seed) if args.tiny else random_full_size_model(args.seed)
    return to_compute_dtype(model, device, dtype)


def tiny_model(seed: int):
    from transformers import CsmForConditionalGeneration

    from export.tiny_checkpoint import build_tiny_checkpoint

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
        input_ids=torch.as_tensor(prompt, device=device)[None],
        max_new_tokens=frames,
        do_sample=False,
        depth_decoder_do_sample=False,
        suppress_tokens=SUPPRESSED,
        depth_decoder_suppress_tokens=SUPPRESSED,
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
    engine.config.prefill_tokens_per_step = len(prompts) * max(len(p) for p in prompts)
    started = time.perf_counter()
    step_times = []
    while engine.has_work():
        # No synchronisation between steps: each step reads a frame's codes (on a GPU
        # with overlap_steps, the frame before the one it launches), so the gaps are the
        # device's time per frame, as in service.
        engine.step()
        step_times.append(time.perf_counter())
    _sync(engine.lm.device)
    total = time.perf_counter() - started
    codes = [h.result().codes for h in handles]
    steady = float(statistics.median(np.diff(step_times))) * 1000 if len(step_times) > 2 else float("nan")
    return {"codes": codes, "ms_per_step": steady, "wall_s": total}


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def machine_slug(device: torch.device) -> str:
    """The machine's model for a results file name, e.g. "intel_xeon_processor"."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    name = re.sub(r"\((r|tm)\)|cpu @.*|processor$", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_") or device.type


def memory_bandwidth_gb_s(device: torch.device, gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth: the sum of a tensor far larger than any cache, best of `repeats`,
    at this process's thread count. A frame step reads its weights the same way (once,
    start to end), so bytes of weights / this = the fastest a step can be."""
    data = torch.ones(int(gib * 2**30) // 4, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first touches the pages
        started = time.perf_counter()
        data.sum()
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best / 1e9


def floor_fields(lm: CsmLM, bandwidth: float, ms_per_step: float) -> dict:
    floor_ms = lm.weight_bytes_per_frame() / (bandwidth * 1e9) * 1000
    return {"floor_ms_per_step": round(floor_ms, 2), "percent_of_floor": round(100 * floor_ms / ms_per_step, 1)}


def request_prompts(model, args, count: int) -> list[np.ndarray]:
    text_vocab = model.config.text_vocab_size
    rng = np.random.default_rng(args.seed)
    return [
        np.concatenate(
            [[model.config.bos_token_id], rng.integers(3, min(text_vocab, 128_000) - 10, args.prompt_tokens + 7 * i)]
        )
        for i in range(count)
    ]


def engine_rows(
    lm: CsmLM,
    args,
    prompts,
    max_context: int,
    bandwidth: float,
    generate_ms_per_frame: float,
    generated: list[np.ndarray] | None,
) -> list[dict]:
    """One row per batch size; `generated`: generate's codes to compare (None: not comparable)."""
    rows = []
    for batch in args.batch_sizes:
        engine = GenerationEngine(lm, EngineConfig(max_slots=batch, max_context=max_context))
        engine_run(engine, prompts[:1], 2)  # warm-up
        result = engine_run(engine, prompts[:batch], args.frames)
        frames_per_s = batch * 1000 / result["ms_per_step"]
        row = {
            "batch": batch,
            "overlap_steps": engine.overlap_steps,  # on with CUDA graphs
            "engine_ms_per_step": round(result["ms_per_step"], 2),
            "engine_ms_per_frame_per_stream": round(result["ms_per_step"], 2),
            **floor_fields(lm, bandwidth, result["ms_per_step"]),
            "engine_x_real_time_aggregate": round(frames_per_s * FRAME_SECONDS, 3),
            "generate_ms_per_frame_batch1": round(generate_ms_per_frame, 2),
            "generate_x_real_time_one_at_a_time": round(1000 / generate_ms_per_frame * FRAME_SECONDS, 3),
            "speedup_vs_generate": round(frames_per_s / (1000 / generate_ms_per_frame), 2),
        }
        if generated is not None:
            compared = min(batch, len(generated))
            row["tokens_identical_to_generate"] = all(
                np.array_equal(result["codes"][i], generated[i]) for i in range(compared)
            )
            row["requests_compared"] = compared
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        del engine
    return rows


def long_run_codes(lm: CsmLM, prompts, frames: int, max_context: int) -> list[np.ndarray]:
    engine = GenerationEngine(lm, EngineConfig(max_slots=len(prompts), max_context=max_context))
    return engine_run(engine, prompts, frames)["codes"]


def agreement(codes: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    """Greedy tokens (frames x 32 codebooks) equal to the reference's, and the first frame
    that differs per request (after it the two sequences are different continuations)."""
    equal = [np.asarray(c) == np.asarray(r) for c, r in zip(codes, reference)]
    first = [int(np.argmin(e.all(axis=1))) if not e.all() else len(e) for e in equal]
    # Codebooks equal in that frame before the first difference (the depth decoder
    # feeds each code to the next, so after one difference the rest of the frame drifts).
    leading = [int(np.argmin(e[f])) if f < len(e) else e.shape[1] for e, f in zip(equal, first)]
    return {
        "identical_fraction": round(float(np.mean([e.mean() for e in equal])), 4),
        "first_divergent_frame": first,
        "codebooks_equal_before_it": leading,
        "requests": len(equal),
        "frames": len(equal[0]),
    }


def run(args) -> dict:
    device = torch.device(args.device) if args.device else default_device()
    dtype = DTYPES.get(args.dtype) or default_dtype(device)
    load_at_start = round(os.getloadavg()[0], 2)
    started = time.perf_counter()
    model = bench_model(args, device, dtype)
    print(
        f"device: {machine_description(device)} ({device}, {dtype}); model built in "
        f"{time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    bandwidth = memory_bandwidth_gb_s(device)
    print(f"memory bandwidth (read, {torch.get_num_threads()} threads): {bandwidth:.1f} GB/s", file=sys.stderr)
    max_batch = max(args.batch_sizes)
    started = time.perf_counter()
    lm = CsmLM(model, device=device, dtype=dtype, max_batch=max_batch, cpu_kernels=args.cpu_kernels)
    load_s = time.perf_counter() - started
    print("\n".join(lm.kernel_report.lines()), file=sys.stderr)
    prompts = request_prompts(model, args, max_batch)
    max_context = args.prompt_tokens + 7 * max_batch + max(args.frames, args.agreement_frames) + 8
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
    rows = engine_rows(lm, args, prompts, max_context, bandwidth, generate_ms_per_frame, generated)
    report = {
        "load_average_1min_at_start": load_at_start,
        "device": machine_description(device),
        "torch_device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "model": "tiny random CSM" if args.tiny else "CSM-1B shape (CsmConfig defaults), random weights",
        "frames_per_request": args.frames,
        "prompt_tokens": args.prompt_tokens,
        "commit": git_commit(),
        "command": "python -m loadtest.engine_bench " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "memory_bandwidth_gb_s": round(bandwidth, 2),
        "weight_bytes_per_frame": lm.weight_bytes_per_frame(),
        "engine_load_s": round(load_s, 1),
        "kernels": lm.kernel_report.lines(),
        "fused_kernels": lm.fused_report,
        "rows": rows,
    }
    if (args.bf16 if args.bf16 is not None else not args.tiny) and device.type == "cpu" and dtype == torch.float32:
        # The fp32 engine's long run is the reference (it equals generate: checked above).
        reference = long_run_codes(lm, prompts, args.agreement_frames, max_context) if args.agreement_frames else None
        del lm  # its weight copies go before the bf16 ones are made
        gc.collect()
        report["bf16"] = bf16_rows(model, args, prompts, max_context, bandwidth, generate_ms_per_frame, rows, reference)
    # Other work on the machine skews CPU figures: the 1-minute load average at the end.
    report["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    return report


def bf16_rows(
    model, args, prompts, max_context, bandwidth, generate_ms_per_frame, fp32_rows, reference: list[np.ndarray] | None
) -> dict:
    """The same batches in bf16 on this CPU, and how many greedy tokens equal the fp32
    engine's (`reference`) over `agreement_frames` frames."""
    model = to_compute_dtype(model, torch.device("cpu"), torch.bfloat16)  # in place: the fp32 weights go
    started = time.perf_counter()
    lm = CsmLM(
        model,
        device=torch.device("cpu"),
        dtype=torch.bfloat16,
        max_batch=max(args.batch_sizes),
        cpu_kernels=args.cpu_kernels,
    )
    load_s = time.perf_counter() - started
    print("\n".join(lm.kernel_report.lines()), file=sys.stderr)
    rows = engine_rows(lm, args, prompts, max_context, bandwidth, generate_ms_per_frame, None)
    for row, fp32 in zip(rows, fp32_rows):
        row["speedup_vs_fp32_engine"] = round(fp32["engine_ms_per_step"] / row["engine_ms_per_step"], 2)
    result = {
        "rows": rows,
        "weight_bytes_per_frame": lm.weight_bytes_per_frame(),
        "engine_load_s": round(load_s, 1),
        "kernels": lm.kernel_report.lines(),
        "fused_kernels": lm.fused_report,
    }
    if reference is not None:
        result["agreement"] = agreement(long_run_codes(lm, prompts, args.agreement_frames, max_context), reference)
        print(json.dumps(result["agreement"]), file=sys.stderr)
    return result


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random CSM instead of the full-size shape")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on a CPU (as the engine)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-kernels", default="measure", choices=["measure", "mkl", "onednn"])
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 rows after the fp32 ones, on a CPU (default: with the full-size model)",
    )
    parser.add_argument(
        "--agreement-frames", type=int, default=64, help="frames of the bf16 vs fp32 token agreement (0: skip)"
    )
    parser.add_argument(
        "--full-reference",
        action="store_true",
        help="run generate for every request of the largest batch (compares all tokens)",
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for JSON + markdown results")
    return parser


def main(argv=None) -> int:
    args = arguments().parse_args(argv)
    report = run(args)
    table = markdown(report)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        device = torch.device(report["torch_device"])
        name = f"engine_{'tiny' if args.tiny else 'full'}_{device.type}_{report['dtype']}"
        if device.type == "cpu" and not args.tiny:  # one table per CPU model: kernels and floors differ
            name += f"_{machine_slug(device)}"
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
