"""Triton's overhead against calling the generation engine in-process, on the same requests.

    python -m loadtest.overhead --serve build/model_repository --out loadtest/results
    python -m loadtest.overhead --repository build/model_repository --http localhost:8000 --grpc localhost:8001

One prompt (csm_prepare's, for one text and a reference clip), one seed, the same
sampling and frame cap (--seconds, 5 s = 63 frames) go
- to csm_lm through Triton, over a gRPC stream, chunked as csm_tts_stream asks (4, then
  12 frames), and
- to a csm_triton.engine.GenerationEngine built in this process from the same
  repository's csm_lm config and checkpoint (lm_model.engine_from_config, exactly as
  csm_lm builds it), driven by its own thread as in csm_lm, with the same chunking.
Runs alternate (Triton, in-process, ...) after a warm-up of each. Reported: the median
wall time from sending to the last frame, time to the first chunk, the ratio, and
whether both paths produced the same codes. For context, csm_tts (the whole pipeline:
prepare, generation, decoder, watermark) on the same text, voice and seed.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

from loadtest import common, workload

DEFAULT_TEXT = "Your order #48213 will arrive on Tuesday, March 4th, between 9 and 11 a.m."
TARGET_OVERHEAD = 0.15  # docs/performance.md: Triton overhead <= 15 % on a 5 s utterance (CPU, tiny)


def prompt_for(http: workload.TritonHTTP, text: str, reference: workload.Reference) -> tuple[np.ndarray, np.ndarray]:
    answer = http.infer(
        "csm_prepare", [workload.tensor("TEXT", "BYTES", [text]), *workload.reference_inputs(reference)]
    )
    outputs = {output["name"]: output for output in answer["outputs"]}
    input_ids = np.asarray(outputs["input_ids"]["data"], np.int64)
    prompt_codes = np.asarray(outputs["prompt_codes"]["data"], np.int64).reshape(outputs["prompt_codes"]["shape"])
    return input_ids, prompt_codes


class InProcess:
    """The engine as csm_lm builds and drives it, minus Triton."""

    def __init__(self, repository: Path):
        from google.protobuf.json_format import MessageToDict

        from csm_triton.triton.models.lm import engine_from_config
        from export.model_config import read_config

        config = MessageToDict(read_config(repository / "csm_lm" / "config.pbtxt"), preserving_proto_field_name=True)
        kind = config.get("instance_group", [{}])[0].get("kind", "KIND_CPU").removeprefix("KIND_")
        self.engine = engine_from_config(repository / "csm_lm" / "1", config, kind, 0)
        self.engine.start()

    def generate(self, sampling: dict, input_ids, prompt_codes) -> tuple[float, float, np.ndarray]:
        from csm_triton.engine import GenerationRequest

        done, chunks, arrivals = threading.Event(), [], []

        def deliver(chunk):
            arrivals.append(time.perf_counter())
            chunks.append(chunk.codes)
            if chunk.finished:
                done.set()

        request = GenerationRequest(input_ids=input_ids, audio_codes=prompt_codes, **sampling)
        started = time.perf_counter()
        self.engine.submit(request, callback=deliver)
        if not done.wait(600):
            raise TimeoutError("the in-process engine did not finish")
        return arrivals[-1] - started, arrivals[0] - started, np.concatenate(chunks)

    def close(self):
        self.engine.stop()


class ThroughTriton:
    """csm_lm over a gRPC stream (tritonclient), one stream per request."""

    def __init__(self, url: str):
        import tritonclient.grpc as grpc

        self.grpc = grpc
        self.client = grpc.InferenceServerClient(url)

    def _inputs(self, arrays: dict[str, np.ndarray]):
        items = []
        for name, array in arrays.items():
            item = self.grpc.InferInput(
                name,
                list(array.shape),
                "BYTES"
                if array.dtype == object
                else {np.float32: "FP32", np.int32: "INT32", np.int64: "INT64"}[array.dtype.type],
            )
            item.set_data_from_numpy(array)
            items.append(item)
        return items

    def generate(self, sampling: dict, input_ids, prompt_codes) -> tuple[float, float, np.ndarray]:
        inputs = self._inputs(
            {
                "input_ids": input_ids,
                "prompt_codes": prompt_codes,
                "TEMPERATURE": np.array([sampling["temperature"]], np.float32),
                "TOP_K": np.array([sampling["top_k"]], np.int32),
                "SEED": np.array([sampling["seed"]], np.int64),
                "MAX_AUDIO_SECONDS": np.array([sampling["max_frames"] / workload.FRAME_RATE_HZ], np.float32),
                "first_chunk_frames": np.array([sampling["first_chunk_frames"]], np.int32),
                "chunk_frames": np.array([sampling["stream_every"]], np.int32),
            }
        )
        arrivals: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: arrivals.put((time.perf_counter(), result, error)))
        chunks, first = [], None
        try:
            started = time.perf_counter()
            self.client.async_stream_infer("csm_lm", inputs, enable_empty_final_response=True)
            while True:
                arrived, result, error = arrivals.get(timeout=600)
                if error is not None:
                    raise RuntimeError(f"csm_lm: {error}")
                response = result.get_response()
                if result.as_numpy("codes") is not None:  # (the final may carry only finish_reason)
                    first = first or arrived
                    chunks.append(result.as_numpy("codes"))
                if result.as_numpy("error") is not None:  # a failure rides on the final response
                    raise RuntimeError(f"csm_lm: {result.as_numpy('error')[0].decode()}")
                final = response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    return arrived - started, first - started, np.concatenate(chunks)
        finally:
            self.client.stop_stream()

    def tts(self, text: str, reference: workload.Reference, sampling: dict) -> float:
        inputs = self._inputs(
            {
                "TEXT": np.array([text.encode()], dtype=object),
                "REFERENCE_AUDIO": np.asarray(reference.samples, np.float32),
                "REFERENCE_SAMPLE_RATE": np.array([reference.sample_rate], np.int32),
                "REFERENCE_TEXT": np.array([reference.transcript.encode()], dtype=object),
                "TEMPERATURE": np.array([sampling["temperature"]], np.float32),
                "TOP_K": np.array([sampling["top_k"]], np.int32),
                "SEED": np.array([sampling["seed"]], np.int64),
                "MAX_AUDIO_SECONDS": np.array([sampling["max_frames"] / workload.FRAME_RATE_HZ], np.float32),
            }
        )
        started = time.perf_counter()
        self.client.infer("csm_tts", inputs)
        return time.perf_counter() - started

    def close(self):
        self.client.close()


def summary(times: list[tuple[float, float]]) -> dict:
    total = [t for t, _ in times]
    return {
        "median_s": round(statistics.median(total), 4),
        "min_s": round(min(total), 4),
        "max_s": round(max(total), 4),
        "first_chunk_median_ms": round(statistics.median(f for _, f in times) * 1000, 1),
        "runs_s": [round(t, 4) for t in total],
    }


def run(args, target: common.Target, repository: Path) -> dict:
    from csm_triton import constants as C

    reference = workload.load_references()[0]
    input_ids, prompt_codes = prompt_for(target.client, args.text, reference)
    frames = int(np.ceil(args.seconds * C.FRAME_RATE_HZ))
    sampling = {
        "max_frames": frames,
        "temperature": C.DEFAULT_TEMPERATURE,
        "top_k": C.DEFAULT_TOP_K,
        "seed": args.seed,
        "stream_every": C.STREAM_CHUNK_FRAMES,
        "first_chunk_frames": C.STREAM_FIRST_CHUNK_FRAMES,
    }
    local, triton = InProcess(repository), ThroughTriton(target.grpc)
    try:
        paths = {"in_process": local, "triton": triton}
        codes, times = {}, {name: [] for name in paths}
        for name, path in paths.items():  # warm-up: prefix caches, allocator, first-call costs
            codes[name] = path.generate(sampling, input_ids, prompt_codes)[2]
        for _ in range(args.repeats):
            for name, path in paths.items():
                total, first, produced = path.generate(sampling, input_ids, prompt_codes)
                times[name].append((total, first))
                if not np.array_equal(produced, codes[name]):
                    raise RuntimeError(f"{name}: the same request produced other codes")
        tts = [triton.tts(args.text, reference, sampling) for _ in range(max(1, args.repeats // 2))]
    finally:
        local.close()
        triton.close()
    import torch

    result = {name: summary(values) for name, values in times.items()}
    ratio = result["triton"]["median_s"] / result["in_process"]["median_s"]
    return {
        "text": args.text,
        "prompt_tokens": int(len(input_ids)),
        "reference_frames": int(len(prompt_codes)),
        "frames": frames,
        "audio_seconds": frames / C.FRAME_RATE_HZ,
        "seed": args.seed,
        "repeats": args.repeats,
        "codes_identical": bool(np.array_equal(codes["triton"], codes["in_process"])),
        "frames_generated": {name: int(len(value)) for name, value in codes.items()},
        "in_process": result["in_process"],
        "triton": result["triton"],
        "ratio": round(ratio, 3),
        "overhead_percent": round((ratio - 1) * 100, 1),
        "target_overhead_percent": TARGET_OVERHEAD * 100,
        "meets_target": ratio - 1 <= TARGET_OVERHEAD,
        "csm_tts_whole_pipeline_median_s": round(statistics.median(tts), 4),
        "torch_threads_in_process": torch.get_num_threads(),
    }


def markdown(report: dict) -> str:
    r = report
    lines = common.report_head(
        "Triton overhead: csm_lm through Triton vs the engine in-process",
        r,
        [
            f"- one request, repeated {r['repeats']} times per path, alternating, after a warm-up: prompt of "
            f"{r['prompt_tokens']} tokens ({r['reference_frames']} reference frames), {r['frames']} frames = "
            f"{r['audio_seconds']:.2f} s of audio, seed {r['seed']}, streamed in chunks of 4 then 12 frames",
            f"- same codes from both paths: **{r['codes_identical']}**; torch threads in-process: "
            f"{r['torch_threads_in_process']}",
        ],
    )
    lines += [
        "| path | median s | min s | max s | first chunk median ms | ms per frame (median) |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in (
        ("in_process", "GenerationEngine in-process (same config, same checkpoint)"),
        ("triton", "csm_lm via Triton, gRPC stream"),
    ):
        row = r[key]
        lines.append(
            f"| {label} | {row['median_s']} | {row['min_s']} | {row['max_s']} | "
            f"{row['first_chunk_median_ms']} | {row['median_s'] / r['frames'] * 1000:.1f} |"
        )
    verdict = "meets" if r["meets_target"] else "misses"
    lines += [
        "",
        f"**Triton / in-process = {r['ratio']}: overhead {r['overhead_percent']} %** "
        f"({verdict} the target of at most {r['target_overhead_percent']:.0f} %).",
        "",
        f"For context, csm_tts over gRPC on the same text, reference and seed (prepare with the reference "
        f"clip's encoding, generation, decoder, watermark, one response): median "
        f"{r['csm_tts_whole_pipeline_median_s']} s.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_target_arguments(parser)
    parser.add_argument("--repository", type=Path, help="the running server's model repository (with --http/--grpc)")
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--seconds", type=float, default=5.0, help="audio per request (the frame cap)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    repository = args.serve or args.repository
    if repository is None:
        parser.error("give --serve REPOSITORY, or --repository with the running server's --http/--grpc")
    args.model = args.model or common.model_label(repository)
    meter = common.Contention()
    with common.target_from_args(args, register=False) as target:
        figures = run(args, target, repository)
        report = {
            "benchmark": "Triton overhead vs in-process engine",
            **common.provenance(target),
            "device_tag": common.device_tag(target.device),
            "contention": meter.finish(target),
            **figures,
        }
    table = markdown(report)
    print(table)
    if args.out:
        paths = common.write_report(args.out, f"overhead_{report['model']}_{report['device_tag']}", report, table)
        print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
