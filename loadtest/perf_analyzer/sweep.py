"""perf_analyzer over concurrency: csm_tts over HTTP and gRPC (stored voices and inline
reference clips), csm_tts_stream over gRPC streaming, and mimi_decoder alone at the two
chunk shapes of a stream (what dynamic batching buys).

    python -m loadtest.perf_analyzer.sweep --serve build/model_repository --out loadtest/results
    python -m loadtest.perf_analyzer.sweep --http localhost:8000 --grpc localhost:8001 --model full \\
        --scenarios mimi_decoder_4f,mimi_decoder_37f --concurrency 1,8 --out DIR

Runs the bundled perf_analyzer 2.51 (csm_triton.serving.install) once per scenario and
concurrency level on input data from make_inputs (real texts, the stored voices, the
reference clips). mimi_decoder: perf_analyzer's stabilised count windows. csm_tts*:
requests of whole seconds make windows useless, so a fixed request count, with
throughput, latency and (streaming) time to first audio computed from perf_analyzer's
per-request response timestamps. Writes one CSV with perf_analyzer's own columns for
every run, plus JSON and markdown with the dynamic-batching ratio (throughput at the
highest concurrency / at 1) and Triton's statistics per run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtest import common, workload
from loadtest.perf_analyzer.make_inputs import DECODER_FRAMES, write_inputs


@dataclass(frozen=True)
class Scenario:
    model: str
    protocol: str  # http | grpc
    inputs: str  # a make_inputs kind
    streaming: bool = False
    decoder: bool = False  # requests per client from --decoder-requests-per-client


SCENARIOS = {
    "csm_tts_http": Scenario("csm_tts", "http", "csm_tts_voice"),
    "csm_tts_grpc": Scenario("csm_tts", "grpc", "csm_tts_voice"),
    "csm_tts_reference_grpc": Scenario("csm_tts", "grpc", "csm_tts_reference"),
    "csm_tts_stream_grpc": Scenario("csm_tts_stream", "grpc", "csm_tts_voice", streaming=True),
    **{
        f"mimi_decoder_{frames}f": Scenario("mimi_decoder", "grpc", f"mimi_decoder_{frames}f", decoder=True)
        for frames in DECODER_FRAMES
    },
}


def perf_analyzer(arguments: list[str], timeout: float) -> subprocess.CompletedProcess:
    from csm_triton.serving.install import perf_analyzer_command, prepare

    prepare()  # idempotent: the binary and the libraries it needs
    binary, env = perf_analyzer_command()
    return subprocess.run([binary, *arguments], env=env, capture_output=True, text=True, timeout=timeout)


def measure(
    name: str,
    scenario: Scenario,
    concurrency: int,
    requests: int,
    target: common.Target,
    inputs: Path,
    work: Path,
    args: argparse.Namespace,
    stable: bool = False,
) -> dict:
    url = target.http if scenario.protocol == "http" else target.grpc
    report, profile = work / f"{name}_c{concurrency}.csv", work / f"{name}_c{concurrency}_profile.json"
    arguments = [
        "-m",
        scenario.model,
        "-u",
        url,
        "-i",
        scenario.protocol,
        "--input-data",
        str(inputs),
        "--concurrency-range",
        str(concurrency),
        "-f",
        str(report),
        "--verbose-csv",
        "--profile-export-file",
        str(profile),
    ]
    if stable:  # fast requests: perf_analyzer's own stabilised windows
        arguments += [
            "--measurement-mode",
            "count_windows",
            "--measurement-request-count",
            str(requests),
            "--stability-percentage",
            str(args.stability),
            "--max-trials",
            "10",
        ]
    else:  # a fixed count, figures from the per-request timestamps
        arguments += ["--request-count", str(requests)]
    if scenario.streaming:
        arguments.append("--streaming")
    before = common.model_statistics(target.client)
    started = time.perf_counter()
    try:
        result = perf_analyzer(arguments, args.timeout)
        failed = result.returncode != 0 or not report.is_file()
        log = result.stdout + result.stderr
    except subprocess.TimeoutExpired as expired:  # subprocess.run has killed perf_analyzer
        failed, log = True, f"perf_analyzer ran past {args.timeout} s\n{expired.stdout or ''}"
    wall = time.perf_counter() - started
    triton = common.statistics_difference(before, common.model_statistics(target.client))
    row = {
        "scenario": name,
        "model": scenario.model,
        "protocol": scenario.protocol + (" streaming" if scenario.streaming else ""),
        "concurrency": concurrency,
        "wall_seconds": round(wall, 2),
        "method": "stable windows" if stable else "timestamps",
        "failures": sum(r["failures"] for r in triton),
        "triton": triton,
    }
    if failed:
        lines = [line for line in log.splitlines() if line.strip()]
        row["error"] = " | ".join(lines[-4:])[-600:] or "perf_analyzer failed without a message"
        row["failures"] = max(row["failures"], 1)
        return row
    pa = row["perf_analyzer"] = next(csv.DictReader(io.StringIO(report.read_text())))
    stamps = timestamp_figures(json.loads(profile.read_text()))
    if stable:
        row |= {
            "requests": stamps.get("requests"),
            "throughput_per_s": round(float(pa["Inferences/Second"]), 2),
            "latency_ms": {k: round(float(pa[f"{k} latency"]) / 1000, 1) for k in ("p50", "p95", "p99")},
        }
    else:
        row |= stamps
    return row


def timestamp_figures(profile: dict) -> dict:
    """From perf_analyzer's per-request timestamps: requests, throughput over the span from
    the first send to the last response, latency to the last response and, for streamed
    requests, time to the first one. (In --request-count mode perf_analyzer divides by
    whole seconds: 1 request of 0.6 s reads as 1/s.)"""
    sent, first, last = [], [], []
    for experiment in profile.get("experiments", []):
        for request in experiment.get("requests", []):
            stamps = request.get("response_timestamps") or []
            if stamps:
                sent.append(request["timestamp"])
                first.append(stamps[0] - request["timestamp"])
                last.append(stamps[-1] - request["timestamp"])
    if not sent:
        return {}
    span = max(s + d for s, d in zip(sent, last)) - min(sent)

    def milliseconds(values):
        return {f"p{p}": round(float(np.percentile(values, p)) / 1e6, 1) for p in (50, 95, 99)}

    figures = {
        "requests": len(sent),
        "throughput_per_s": round(len(sent) / (span / 1e9), 3),
        "latency_ms": milliseconds(last),
    }
    if any(len(r.get("response_timestamps") or []) > 1 for e in profile["experiments"] for r in e["requests"]):
        figures["ttfa_ms"] = milliseconds(first)
    return figures


def batching_gains(rows: list[dict]) -> list[dict]:
    """mimi_decoder's throughput at its highest concurrency against concurrency 1."""
    gains = []
    for name in dict.fromkeys(r["scenario"] for r in rows if r["model"] == "mimi_decoder"):
        measured = {r["concurrency"]: r for r in rows if r["scenario"] == name and "perf_analyzer" in r}
        if 1 not in measured or len(measured) < 2:
            continue
        top = max(measured)
        one, high = (measured[c]["throughput_per_s"] for c in (1, top))
        decoder = next((t for t in measured[top]["triton"] if t["model"] == "mimi_decoder"), {})
        gains.append(
            {
                "scenario": name,
                "concurrency": top,
                "throughput_1": round(one, 1),
                "throughput_high": round(high, 1),
                "ratio": round(high / one, 2),
                "mean_batch_high": decoder.get("mean_batch"),
            }
        )
    return gains


def write_csv(rows: list[dict], path: Path) -> None:
    """Every run's perf_analyzer row with the scenario in front (union of columns)."""
    columns = ["Scenario", "Model", "Protocol"]
    for row in rows:
        columns += [c for c in row.get("perf_analyzer", {}) if c not in columns]
    columns.append("Error")
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    "Scenario": row["scenario"],
                    "Model": row["model"],
                    "Protocol": row["protocol"],
                    **row.get("perf_analyzer", {"Concurrency": row["concurrency"]}),
                    "Error": row.get("error", ""),
                }
            )


def markdown(report: dict, stem: str) -> str:
    lines = common.report_head(
        "perf_analyzer sweep",
        report,
        [
            f"- perf_analyzer {report['perf_analyzer_version']} (tritonclient wheel); csm_tts inputs: "
            f"{report['text_count']} texts, MAX_AUDIO_SECONDS from the text's length, at most "
            f"{report['max_audio_seconds']} s; every run's columns: [{stem}.csv]({stem}.csv)"
        ],
    )
    lines += [
        "Throughput: requests completed per second. Latency: send to last response (for csm_tts_stream "
        "the stream's end); TTFA: send to the first audio chunk. Method `timestamps`: a fixed request count, "
        "figures computed from perf_analyzer's per-request timestamps (`--profile-export-file`; "
        "perf_analyzer's own throughput in that mode divides by whole seconds); `stable windows`: "
        "perf_analyzer's stabilised count windows (`--stable`). "
        "Server queue / compute: Triton's split for the model called, per request (an ensemble's compute "
        "includes its steps; a decoupled model's compute is only its hand-over).",
        "",
        "| scenario | protocol | concurrency | requests | failures | throughput /s | latency p50 / p95 / p99 ms | "
        "server queue ms | server compute ms | TTFA p50 / p95 ms | method |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["runs"]:
        if "error" in row:
            lines.append(
                f"| {row['scenario']} | {row['protocol']} | {row['concurrency']} | - | {row['failures']} | "
                f"failed: {row['error'][:160]} | | | | | | |"
            )
            continue
        pa = row["perf_analyzer"]
        compute = (
            sum(float(pa.get(k, 0)) for k in ("Server Compute Input", "Server Compute Infer", "Server Compute Output"))
            / 1000
        )
        ttfa = f"{row['ttfa_ms']['p50']} / {row['ttfa_ms']['p95']}" if row.get("ttfa_ms") else "-"
        latency = row["latency_ms"]
        lines.append(
            f"| {row['scenario']} | {row['protocol']} | {row['concurrency']} | {row['requests']} | {row['failures']} | "
            f"{row['throughput_per_s']:g} | {latency['p50']} / {latency['p95']} / {latency['p99']} | "
            f"{float(pa['Server Queue']) / 1000:.1f} | {compute:.1f} | {ttfa} | {row['method']} |"
        )
    if report["batching"]:
        lines += [
            "",
            "## mimi_decoder: dynamic batching",
            "",
            "Throughput at the highest concurrency against one client at a time, same codes, same "
            "server. The 4-frame shape is a stream's first chunk, 37 frames a later 12-frame chunk with "
            "its 25 frames of left context.",
            "",
            "| codes | concurrency | throughput at 1 /s | throughput at N /s | ratio | mean batch at N |",
            "|---|---|---|---|---|---|",
        ]
        for gain in report["batching"]:
            lines.append(
                f"| {gain['scenario']} | {gain['concurrency']} | {gain['throughput_1']} | "
                f"{gain['throughput_high']} | **{gain['ratio']}x** | {gain['mean_batch_high']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_target_arguments(parser)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"any of {', '.join(SCENARIOS)}")
    parser.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--tts-requests-per-client", type=int, default=2, help="csm_tts*: requests per client")
    parser.add_argument(
        "--decoder-requests-per-client",
        type=int,
        default=100,
        help="mimi_decoder: requests per client (per measurement window with --stable)",
    )
    parser.add_argument(
        "--stable",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mimi_decoder: perf_analyzer's stabilised count windows (a fixed count with "
        "timestamps when they do not stabilise, as on a busy machine)",
    )
    parser.add_argument("--stability", type=int, default=25, help="with --stable: perf_analyzer's -s, in percent")
    parser.add_argument("--max-audio-seconds", type=float, default=3.0)
    parser.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one unrecorded run per scenario at the highest concurrency first",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per perf_analyzer run")
    parser.add_argument("--out", type=Path, help="folder for CSV, JSON and markdown")
    args = parser.parse_args(argv)
    names = args.scenarios.split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    meter = common.Contention()
    rows = []
    with common.target_from_args(args) as target, tempfile.TemporaryDirectory(prefix="csm-perf-") as scratch:
        work = Path(scratch)
        inputs = write_inputs(work / "inputs", target.voice_ids, args.max_audio_seconds)
        for name in names:
            scenario = SCENARIOS[name]
            per_client = args.decoder_requests_per_client if scenario.decoder else args.tts_requests_per_client
            if args.warmup:  # not recorded: lazy state, caches, allocator arenas
                top = max(args.concurrency)
                (work / "warmup").mkdir(exist_ok=True)
                measure(name, scenario, top, top, target, inputs[scenario.inputs], work / "warmup", args)
            for concurrency in args.concurrency:
                stable = scenario.decoder and args.stable
                row = measure(
                    name,
                    scenario,
                    concurrency,
                    per_client * concurrency,
                    target,
                    inputs[scenario.inputs],
                    work,
                    args,
                    stable,
                )
                if stable and "stable measurement" in row.get("error", ""):
                    row = measure(
                        name,
                        scenario,
                        concurrency,
                        per_client * concurrency,
                        target,
                        inputs[scenario.inputs],
                        work,
                        args,
                    )
                    row["method"] = "timestamps (windows did not stabilise)"
                rows.append(row)
                print(
                    f"{name} c={concurrency}: {row.get('throughput_per_s', 'failed')} /s, "
                    f"{row['failures']} failures {row.get('error', '')}",
                    file=sys.stderr,
                )
        report = {
            "benchmark": "perf_analyzer sweep",
            **common.provenance(target),
            "device_tag": common.device_tag(target.device),
            "contention": meter.finish(target),
            "perf_analyzer_version": perf_analyzer_version(),
            "text_count": len(workload.load_texts()),
            "max_audio_seconds": args.max_audio_seconds,
            "runs": rows,
            "batching": batching_gains(rows),
        }
    stem = f"perf_analyzer_{report['model']}_{report['device_tag']}"
    table = markdown(report, stem)
    print(table)
    if args.out:
        paths = common.write_report(args.out, stem, report, table)
        write_csv(rows, args.out / f"{stem}.csv")
        print("wrote " + ", ".join(str(p) for p in [*paths, args.out / f"{stem}.csv"]), file=sys.stderr)
    return 1 if any(row["failures"] for row in rows) else 0


def perf_analyzer_version() -> str:
    try:
        output = perf_analyzer(["--version"], 60)
        return (output.stdout + output.stderr).split("Version")[-1].split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
