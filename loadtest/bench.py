"""Streaming benchmark: asyncio gRPC clients of csm_tts_stream over the text set, at
several concurrency levels.

    python -m loadtest.bench --serve build/model_repository --concurrency 1,2,4,8 --out loadtest/results
    python -m loadtest.bench --http localhost:8000 --grpc localhost:8001 --model full --out DIR

At each level, `concurrency` clients stream utterances one after another (a gRPC stream
per utterance, texts from loadtest/data/texts.txt, stored voices by default) until each
has done --requests-per-client. Reported per level: time to first audio (TTFA)
p50/p95/p99, end-to-end latency, per-request real-time factor, aggregate x real time,
failures, and the difference of Triton's per-model statistics over the level (queue vs
compute time). Writes JSON, a markdown table and PNG plots of latency and throughput
against concurrency (with --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from loadtest import common, workload

MODEL = "csm_tts_stream"
DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64"}
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


# --- one request ---------------------------------------------------------------------------
def infer_request(model: str, inputs: dict[str, np.ndarray], request_id: str) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest with raw tensors, asking for the empty final response that tells
    the client a decoupled stream is over (tritonclient's asyncio API cannot ask for it)."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, array in inputs.items():
        tensor = request.inputs.add(name=name, shape=list(array.shape))
        if array.dtype == object:
            tensor.datatype = "BYTES"
            raw = b"".join(
                struct.pack("<I", len(item)) + item
                for item in (v.encode() if isinstance(v, str) else v for v in array.reshape(-1))
            )
        else:
            tensor.datatype = DATATYPES[array.dtype]
            raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        request.raw_input_contents.append(raw)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


@dataclass
class Outcome:
    sent: float
    first_audio: float | None = None
    finished: float | None = None
    samples: int = 0
    chunks: int = 0
    error: str | None = None

    @property
    def ttfa(self) -> float:
        return self.first_audio - self.sent

    @property
    def latency(self) -> float:
        return self.finished - self.sent

    @property
    def audio_seconds(self) -> float:
        return self.samples / workload.SAMPLE_RATE


def is_final(response) -> bool:
    parameters = response.parameters
    return "triton_final_response" in parameters and parameters["triton_final_response"].bool_param


async def stream_one(stub, request, timeout: float) -> Outcome:
    async def requests():
        yield request  # then half-close: Triton keeps answering until the final response

    outcome = Outcome(sent=time.perf_counter())
    call = stub.ModelStreamInfer(requests(), timeout=timeout)
    try:
        async for message in call:
            if message.error_message:
                outcome.error = message.error_message
                break
            response = message.infer_response
            for index, output in enumerate(response.outputs):
                if output.name == "AUDIO" and response.raw_output_contents[index]:
                    outcome.first_audio = outcome.first_audio or time.perf_counter()
                    outcome.samples += len(response.raw_output_contents[index]) // 4
                    outcome.chunks += 1
            if is_final(response):
                outcome.finished = time.perf_counter()
                break
        else:
            outcome.error = outcome.error or "the stream ended before the final response"
    except grpc.aio.AioRpcError as error:
        outcome.error = f"{error.code().name}: {error.details()}"
    finally:
        call.cancel()
    if outcome.error is None and not outcome.samples:
        outcome.error = "no audio in the stream"
    return outcome


# --- the workload --------------------------------------------------------------------------
class Requests:
    """A level's requests: texts in a fixed shuffled order, voices taken in turn. Every
    level starts from the first text, so levels share their texts as far as they go."""

    def __init__(self, args, voice_ids: list[str]):
        self.texts = workload.load_texts(args.texts)
        random.Random(args.seed).shuffle(self.texts)
        self.references = workload.load_references()
        self.voice_ids = voice_ids
        self.inline = args.voice == "inline"
        self.cap = args.max_audio_seconds
        self.count = 0

    def next(self) -> tuple[service_pb2.ModelInferRequest, float]:
        index, self.count = self.count, self.count + 1
        text = self.texts[index % len(self.texts)]
        seconds = workload.audio_seconds_for(text, self.cap)
        inputs = {
            "TEXT": np.array([text], dtype=object),
            "MAX_AUDIO_SECONDS": np.array([seconds], np.float32),
            "SEED": np.array([index], np.int64),
        }
        if self.inline:
            reference = self.references[index % len(self.references)]
            inputs |= {
                "REFERENCE_AUDIO": np.asarray(reference.samples, np.float32),
                "REFERENCE_SAMPLE_RATE": np.array([reference.sample_rate], np.int32),
                "REFERENCE_TEXT": np.array([reference.transcript], dtype=object),
            }
        else:
            inputs["VOICE_ID"] = np.array([self.voice_ids[index % len(self.voice_ids)]], dtype=object)
        return infer_request(MODEL, inputs, f"bench-{index}"), seconds


async def run_level(stub, requests: Requests, concurrency: int, per_client: int, timeout: float):
    outcomes: list[Outcome] = []

    requests.count = 0

    async def client():
        for _ in range(per_client):
            request, _seconds = requests.next()
            outcomes.append(await stream_one(stub, request, timeout))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcomes, time.perf_counter() - started


def percentiles(values: list[float], points=(50, 95, 99), scale: float = 1000.0) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in points}
    return {f"p{p}": round(float(np.percentile(values, p)) * scale, 1 if scale > 1 else 3) for p in points}


def summarise(concurrency: int, outcomes: list[Outcome], wall: float, triton: list[dict]) -> dict:
    good = [o for o in outcomes if o.error is None]
    audio = sum(o.audio_seconds for o in good)
    errors = sorted({o.error for o in outcomes if o.error})
    return {
        "concurrency": concurrency,
        "requests": len(outcomes),
        "failures": len(outcomes) - len(good),
        "errors": errors[:5],
        "ttfa_ms": percentiles([o.ttfa for o in good]),
        "latency_ms": percentiles([o.latency for o in good]),
        "real_time_factor": percentiles([o.latency / o.audio_seconds for o in good], (50, 95), scale=1.0),
        "audio_seconds": round(audio, 2),
        "wall_seconds": round(wall, 2),
        "aggregate_x_real_time": round(audio / wall, 3),
        "chunks_per_request": round(float(np.mean([o.chunks for o in good])), 1) if good else None,
        "triton": triton,
    }


async def run(args, target: common.Target) -> list[dict]:
    requests = Requests(args, target.voice_ids)
    levels = []
    async with grpc.aio.insecure_channel(target.grpc, options=UNLIMITED) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(args.warmup):  # first calls load lazy state (prefix cache, ORT arenas)
            warm = await stream_one(stub, requests.next()[0], args.timeout)
            if warm.error:
                raise SystemExit(f"warm-up request failed: {warm.error}")
        for concurrency in args.concurrency:
            before = common.model_statistics(target.client)
            outcomes, wall = await run_level(stub, requests, concurrency, args.requests_per_client, args.timeout)
            after = common.model_statistics(target.client)
            level = summarise(concurrency, outcomes, wall, common.statistics_difference(before, after))
            levels.append(level)
            print(
                f"c={concurrency}: {level['requests']} requests, {level['failures']} failures, TTFA p50 "
                f"{level['ttfa_ms']['p50']} ms, {level['aggregate_x_real_time']}x real time",
                file=sys.stderr,
            )
    return levels


# --- reporting -------------------------------------------------------------------------------
def markdown(report: dict, stem: str) -> str:
    def triple(values: dict, keys) -> str:
        return " / ".join("-" if values[k] is None else f"{values[k]:g}" for k in keys)

    lines = common.report_head(
        f"Streaming benchmark: {MODEL} over gRPC",
        report,
        [
            f"- voices: {report['voice']}; texts: {report['texts']} ({report['text_count']} texts, MAX_AUDIO_SECONDS "
            f"from the text's length, at most {report['max_audio_seconds']} s); {report['requests_per_client']} "
            "utterances per client per level, one gRPC stream each"
        ],
    )
    lines += [
        "TTFA: request sent to first AUDIO chunk received. Latency: to the final response. Real-time factor: "
        "a request's latency / its audio duration (below 1 is faster than real time). Aggregate x real time: "
        "audio seconds of all requests of the level / the level's wall time. Percentiles over the level's "
        "requests (few requests: p99 is close to the maximum).",
        "",
        "| concurrency | requests | failures | TTFA p50 / p95 / p99 ms | latency p50 / p95 / p99 ms | "
        "real-time factor p50 / p95 | aggregate x real time | audio s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level in report["levels"]:
        lines.append(
            f"| {level['concurrency']} | {level['requests']} | {level['failures']} | "
            f"{triple(level['ttfa_ms'], ('p50', 'p95', 'p99'))} | {triple(level['latency_ms'], ('p50', 'p95', 'p99'))} | "
            f"{triple(level['real_time_factor'], ('p50', 'p95'))} | {level['aggregate_x_real_time']} | "
            f"{level['audio_seconds']} |"
        )
    if any(level["errors"] for level in report["levels"]):
        lines += ["", "Errors: " + "; ".join(sorted({e for level in report["levels"] for e in level["errors"]}))]
    lines += [
        "",
        f"![latency against concurrency]({stem}_latency.png) ![throughput against concurrency]({stem}_throughput.png)",
        "",
        "## Triton's statistics over each level",
        "",
        "Differences of `/v2/models/stats` before and after the level, per request. csm_lm and "
        f"{MODEL} are decoupled: their compute time is the time `execute` takes to hand a request "
        "to the engine or a worker thread, not the generation; their queue time is the wait for that. "
        "mimi_decoder's mean batch is what dynamic batching achieved.",
        "",
    ]
    for level in report["levels"]:
        lines += [f"### concurrency {level['concurrency']}", ""] + common.statistics_markdown(level["triton"]) + [""]
    return "\n".join(lines)


def plot(report: dict, out: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    x = [level["concurrency"] for level in levels]
    title = f"{MODEL}, {report['model']} model, {report['device']}\ncommit {report['commit'].split(' ')[0]}"
    if report.get("contention"):
        title += " (measured under contention)"
    paths = []

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for key, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        axis.plot(x, [level["ttfa_ms"][key] for level in levels], style, label=f"TTFA {key}")
    axis.plot(
        x, [level["latency_ms"]["p50"] for level in levels], "d-", color="grey", label="latency p50 (whole utterance)"
    )
    axis.set(xscale="log", xlabel="concurrent streams", ylabel="ms", title=title)
    axis.set_xticks(x, [str(v) for v in x], minor=False)
    axis.minorticks_off()
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    paths.append(out / f"{stem}_latency.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.plot(x, [level["aggregate_x_real_time"] for level in levels], "o-", label="aggregate x real time")
    axis.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    axis.set(xscale="log", xlabel="concurrent streams", ylabel="audio seconds per wall second", title=title)
    axis.set_xticks(x, [str(v) for v in x], minor=False)
    axis.minorticks_off()
    other = axis.twinx()
    other.plot(
        x,
        [level["real_time_factor"]["p50"] for level in levels],
        "s--",
        color="tab:red",
        label="real-time factor p50 (per request)",
    )
    other.set_ylabel("real-time factor (latency / audio)")
    handles = axis.get_legend_handles_labels()[0] + other.get_legend_handles_labels()[0]
    axis.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left")
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    paths.append(out / f"{stem}_throughput.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_target_arguments(parser)
    parser.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--max-audio-seconds", type=float, default=8.0, help="cap of each request's MAX_AUDIO_SECONDS")
    parser.add_argument("--voice", choices=["stored", "inline"], default="stored")
    parser.add_argument("--texts", type=Path, default=workload.DATA / "texts.txt")
    parser.add_argument("--warmup", type=int, default=1, help="requests before the first level (not counted)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="folder for JSON, markdown and PNG results")
    parser.add_argument("--replot", type=Path, metavar="JSON", help="only draw the plots of a result, beside it")
    args = parser.parse_args(argv)
    if args.replot:
        report = json.loads(args.replot.read_text())
        print("wrote " + ", ".join(map(str, plot(report, args.replot.parent, args.replot.stem))), file=sys.stderr)
        return 0
    meter = common.Contention()
    with common.target_from_args(args) as target:
        levels = asyncio.run(run(args, target))
        report = {
            "benchmark": f"{MODEL} gRPC streaming",
            **common.provenance(target),
            "device_tag": common.device_tag(target.device),
            "contention": meter.finish(target),
            "voice": "stored voices " + ", ".join(target.voice_ids)
            if args.voice == "stored"
            else "inline reference clips",
            "texts": str(
                args.texts.relative_to(workload.PROJECT_ROOT)
                if args.texts.is_relative_to(workload.PROJECT_ROOT)
                else args.texts
            ),
            "text_count": len(workload.load_texts(args.texts)),
            "max_audio_seconds": args.max_audio_seconds,
            "requests_per_client": args.requests_per_client,
            "levels": levels,
        }
    stem = f"bench_stream_{report['model']}_{report['device_tag']}"
    table = markdown(report, stem)
    print(table)
    if args.out:
        paths = common.write_report(args.out, stem, report, table) + plot(report, args.out, stem)
        print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 1 if any(level["failures"] for level in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
