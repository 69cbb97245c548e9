"""What the benchmark tools share (bench.py, overhead.py, perf_analyzer/sweep.py): the
server they measure — one started here from a model repository, or one given by
address —, its device and model labels, Triton's statistics and their difference, and
the result files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loadtest import workload

# CsmConfig() defaults: CSM-1B's backbone. Anything smaller is the tiny stand-in.
FULL_SIZE_HIDDEN = 2048


@dataclass
class Target:
    http: str  # host:port
    grpc: str
    model: str  # "tiny", "full" or what --model said
    device: str
    admin_token: str | None
    repository: Path | None = None
    server: object | None = None  # csm_triton.serving.process.TritonServer when started here
    voice_ids: list[str] = field(default_factory=list)

    @property
    def client(self) -> workload.TritonHTTP:
        return workload.TritonHTTP(self.http)


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server (default: start one from --serve)")
    group.add_argument(
        "--serve",
        type=Path,
        metavar="REPOSITORY",
        help="start tritonserver on this model repository (free ports) and stop it at the end",
    )
    group.add_argument("--http", default="localhost:8000", help="a running server's HTTP address")
    group.add_argument("--grpc", default="localhost:8001", help="a running server's gRPC address")
    group.add_argument(
        "--model", default=None, help="label of the served model (tiny/full); default: read from --serve's repository"
    )


def model_label(repository: Path) -> str:
    config = repository / "csm_lm" / "1" / "checkpoint" / "config.json"
    try:
        hidden = json.loads(config.read_text())["hidden_size"]
    except (OSError, ValueError, KeyError):
        return "unknown"
    return "full" if hidden >= FULL_SIZE_HIDDEN else "tiny"


def server_device(http: workload.TritonHTTP, local: bool) -> str:
    """Where csm_lm runs: its instance kind, with the GPU's or CPU's name when the server
    runs on this machine."""
    try:
        kind = http.get("/v2/models/csm_lm/config")["instance_group"][0]["kind"]
    except (workload.TritonError, OSError, KeyError, IndexError):
        kind = "unknown"
    if not local:
        return f"csm_lm {kind} (remote server)"
    if kind == "KIND_GPU" and shutil.which("nvidia-smi"):
        names = (
            subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
            .stdout.strip()
            .splitlines()
        )
        return f"GPU: {names[0] if names else 'unknown'}"
    return f"CPU: {workload.machine()}" if kind == "KIND_CPU" else f"csm_lm {kind}"


def device_tag(device: str) -> str:
    return "gpu" if device.startswith("GPU") or "KIND_GPU" in device else "cpu"


@contextlib.contextmanager
def target_from_args(args: argparse.Namespace, *, register: bool = True) -> Iterator[Target]:
    """The server to measure, with the load tests' stored voices registered (and deleted
    again if registered here)."""
    server = None
    token = os.environ.get(workload.ADMIN_TOKEN_ENV)
    if args.serve is not None:
        from csm_triton.serving.process import TritonServer

        token = token or secrets.token_hex(16)
        models = sorted(p.name for p in args.serve.iterdir() if (p / "config.pbtxt").is_file())
        server = TritonServer(
            args.serve,
            load_models=models,
            ready_models=models,
            startup_timeout=300,
            environment={workload.ADMIN_TOKEN_ENV: token},
        )
        server.start()
    try:
        http = server.http_url if server else args.http
        grpc = server.grpc_url if server else args.grpc
        client = workload.TritonHTTP(http)
        local = server is not None or http.split(":")[0] in ("localhost", "127.0.0.1")
        target = Target(
            http=http,
            grpc=grpc,
            admin_token=token,
            repository=args.serve,
            server=server,
            model=args.model or (model_label(args.serve) if args.serve else "unknown"),
            device=server_device(client, local),
        )
        created: list[str] = []
        if register:
            target.voice_ids, created = workload.register_voices(client, workload.load_references(), token)
            if not target.voice_ids:
                raise SystemExit(f"no stored voice to use: set {workload.ADMIN_TOKEN_ENV} to the server's admin token")
        try:
            yield target
        finally:
            workload.delete_voices(client, created, token)
    finally:
        if server is not None:
            server.stop()


# --- Triton's own statistics -------------------------------------------------------------
STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


def model_statistics(http: workload.TritonHTTP) -> dict[str, dict]:
    return {f"{s['name']}": s for s in http.get("/v2/models/stats")["model_stats"]}


def statistics_difference(before: dict[str, dict], after: dict[str, dict]) -> list[dict]:
    """Per model that did anything between the two snapshots: requests, executions, the
    batch size they imply, and the mean queue / compute time per request."""
    rows = []
    for name, now in sorted(after.items()):
        then = before.get(name, {})

        def delta(*keys, now=now, then=then):
            return int(_lookup(now, keys)) - int(_lookup(then, keys))

        successes = delta("inference_stats", "success", "count")
        failures = delta("inference_stats", "fail", "count")
        executions = delta("execution_count")
        if not (successes or failures):
            continue
        per_request = {stage: delta("inference_stats", stage, "ns") / 1e6 / max(1, successes) for stage in STAGES}
        rows.append(
            {
                "model": name,
                "requests": successes,
                "failures": failures,
                "executions": executions,
                "mean_batch": round(delta("inference_count") / executions, 2) if executions else None,
                "queue_ms": round(per_request["queue"], 2),
                "compute_ms": round(sum(per_request[s] for s in STAGES[1:]), 2),
                "compute_infer_ms": round(per_request["compute_infer"], 2),
            }
        )
    return rows


def _lookup(document: dict, keys: tuple[str, ...]):
    for key in keys:
        document = document.get(key, {}) if isinstance(document, dict) else {}
    return document or 0


def statistics_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "| model | requests | failures | executions | mean batch | queue ms / request | compute ms / request |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['requests']} | {r['failures']} | {r['executions']} | {r['mean_batch']} | "
        f"{r['queue_ms']} | {r['compute_ms']} |"
        for r in rows
    ]
    return lines


TINY_NOTE = (
    "**The tiny model's audio is noise.** It is a random-weight CSM of the real shape's "
    "layout but a few layers of width 64, generated on the spot: every code path is the real "
    "one, but it never predicts the end of speech, so each request generates exactly its "
    "MAX_AUDIO_SECONDS. These numbers measure the serving path (Triton, the engine's loop, "
    "the codec, the watermark) on this machine, not CSM-1B's speed."
)


def provenance(target: Target) -> dict:
    return {
        "machine": workload.machine(),
        "device": target.device,
        "model": target.model,
        "commit": workload.commit(),
        "command": workload.command_line(),
    }


def provenance_markdown(report: dict) -> list[str]:
    lines = [
        f"- machine: {report['machine']}",
        f"- device: {report['device']}",
        f"- model: {report['model']}",
        f"- commit: `{report['commit']}`",
        f"- command: `{report['command']}`",
    ]
    if report.get("contention"):
        lines.append(f"- **measured under contention**: {report['contention']}")
    return lines


def report_head(title: str, report: dict, details: list[str]) -> list[str]:
    """A result's title, where it was measured, what was run, and what a tiny model means."""
    lines = [f"# {title} ({report['model']} model, {report['device_tag'].upper()})", ""]
    lines += provenance_markdown(report) + details + [""]
    if report["model"] == "tiny":
        lines += [TINY_NOTE, ""]
    return lines


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


class Contention:
    """How busy the machine was with other work: the load average before the run, and
    the CPU time that processes outside this tool and its server used during it (from
    /proc/stat and /proc/<pid>/stat; Linux only)."""

    TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self):
        self.load_before = load_average()
        self.began = time.monotonic()
        self.busy_before = self._machine_busy()
        self.own_before = self._own(None)

    @staticmethod
    def _machine_busy() -> float | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        return (sum(fields[:8]) - fields[3] - fields[4]) / Contention.TICK  # all but idle and iowait

    @staticmethod
    def _own(server_group: int | None) -> float:
        times = os.times()
        own = times.user + times.system + times.children_user + times.children_system
        if server_group is None:
            return own
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == server_group:  # pgrp
                own += (int(fields[11]) + int(fields[12])) / Contention.TICK  # utime, stime
        return own

    def finish(self, target: Target) -> str | None:
        """None on a quiet machine, else a sentence for the result's `contention`."""
        group = target.server.pid if target.server is not None and target.server.pid else None
        busy = self._machine_busy()
        notes = []
        if self.load_before >= 0.5:
            notes.append(f"1-minute load average {self.load_before:.2f} before the run")
        if busy is not None and self.busy_before is not None and group is not None:
            wall = max(1e-9, time.monotonic() - self.began)
            others = (busy - self.busy_before) - (self._own(group) - self.own_before)
            if others / wall > 0.1:  # more than a tenth of a core on average
                notes.append(
                    f"other processes used {others:.0f} CPU-s in {wall:.0f} s ({others / wall:.2f} cores on average)"
                )
        return "; ".join(notes) or None


def write_report(out: Path, stem: str, report: dict, markdown: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    paths[1].write_text(markdown)
    return paths
