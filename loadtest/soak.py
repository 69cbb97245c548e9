"""Soak: mixed load for a long time, then requests, failures and memory growth per process.

    python -m loadtest.soak --serve build/model_repository --duration 10m --out loadtest/results
    python -m loadtest.soak --http localhost:8000 --grpc localhost:8001 --duration 30m   # a running server

Clients loop over a fixed mix (offline csm_tts with a stored voice and with an inline
reference clip, csm_tts_stream over gRPC, voice_list, and a register + delete of a
throw-away voice) until the duration is up. Every few seconds the resident memory of
each process of a local server is sampled — tritonserver and each python stub, named
by its model instance — so that a leak shows as RSS growth per 1,000 requests, measured
from the end of the warm-up (allocator pools and caches fill during it) to the end.
Not part of CI: `make soak DURATION=10m`.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from loadtest import common, workload
from loadtest.bench import is_final

MIX = (
    ("tts_stored_voice", 4),
    ("tts_inline_reference", 2),
    ("stream_stored_voice", 2),
    ("voice_list", 1),
    ("register_delete", 1),
)
PAGE = 4096


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '1h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip().lower()
    scale = units.get(text[-1:], None)
    number = float(text[:-1] if scale else text)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive, got {text!r}")
    return number * (scale or 1)


def server_processes(group: int) -> dict[int, str]:
    """pid -> name of every process in the server's process group: 'tritonserver', or
    the model instance a python stub serves (its command line names it)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != group:
                continue
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        program = Path(args[0]).name if args else "?"
        # triton_python_backend_stub <model.py> <shm region> ... <instance name> <execution env>
        found[int(stat.parent.name)] = args[-2] if "stub" in program and len(args) >= 3 else program
    return found


def rss_bytes(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return None


class Soak:
    def __init__(self, target: common.Target, args: argparse.Namespace):
        self.target, self.args = target, args
        self.http = workload.TritonHTTP(target.http, timeout=args.timeout)
        self.texts = workload.load_texts()
        self.references = workload.load_references()
        self.counts: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.deadline = 0.0

    # --- the mix ----------------------------------------------------------------------------
    def tts_stored_voice(self, rng: random.Random) -> None:
        text = rng.choice(self.texts)
        inputs = workload.tts_inputs(
            text, self.args.max_audio_seconds, rng.randrange(2**31), rng.choice(self.target.voice_ids)
        )
        self.http.infer("csm_tts", inputs)

    def tts_inline_reference(self, rng: random.Random) -> None:
        inputs = workload.tts_inputs(rng.choice(self.texts), self.args.max_audio_seconds, rng.randrange(2**31))
        self.http.infer("csm_tts", inputs + workload.reference_inputs(rng.choice(self.references)))

    def stream_stored_voice(self, rng: random.Random) -> None:
        import tritonclient.grpc as grpc

        done, failure = threading.Event(), []

        def callback(result, error):
            if error is not None:
                failure.append(str(error))
                done.set()
            elif is_final(result.get_response()):
                done.set()

        def tensor(name, value, datatype):
            item = grpc.InferInput(name, list(np.shape(value)), datatype)
            item.set_data_from_numpy(np.asarray(value))
            return item

        inputs = [
            tensor("TEXT", np.array([rng.choice(self.texts).encode()], dtype=object), "BYTES"),
            tensor("VOICE_ID", np.array([rng.choice(self.target.voice_ids).encode()], dtype=object), "BYTES"),
            tensor("MAX_AUDIO_SECONDS", np.array([self.args.max_audio_seconds], np.float32), "FP32"),
            tensor("SEED", np.array([rng.randrange(2**31)], np.int64), "INT64"),
        ]
        client = grpc.InferenceServerClient(self.target.grpc)
        try:
            client.start_stream(callback=callback)
            client.async_stream_infer("csm_tts_stream", inputs, enable_empty_final_response=True)
            if not done.wait(self.args.timeout):
                raise TimeoutError(f"no final response within {self.args.timeout:.0f} s")
        finally:
            client.stop_stream()
            client.close()
        if failure:
            raise RuntimeError(failure[0])

    def voice_list(self, rng: random.Random) -> None:
        workload.list_voices(self.http)

    def register_delete(self, rng: random.Random) -> None:
        if not self.target.admin_token:
            return self.voice_list(rng)
        reference = rng.choice(self.references)
        voice_id = f"soak-{rng.randrange(16**8):08x}"
        headers = {workload.ADMIN_TOKEN_HEADER: self.target.admin_token}
        inputs = [workload.tensor("VOICE_ID", "BYTES", [voice_id]), *workload.reference_inputs(reference)]
        self.http.infer("voice_register", inputs, headers=headers)
        self.http.infer("voice_delete", [workload.tensor("VOICE_ID", "BYTES", [voice_id])], headers=headers)

    # --- running ------------------------------------------------------------------------------
    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        names = [name for name, weight in MIX for _ in range(weight)]
        while time.monotonic() < self.deadline:
            name = rng.choice(names)
            try:
                getattr(self, name)(rng)
                outcome = None
            except Exception as error:  # noqa: BLE001 - counted and reported, the soak goes on
                outcome = f"{type(error).__name__}: {str(error)[:160]}"
            with self.lock:
                self.counts[name] += 1
                if outcome:
                    self.failures[name] += 1
                    self.errors[outcome] += 1

    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())

    def run(self) -> dict:
        group = self.target.server.pid if self.target.server is not None else None
        self.deadline = time.monotonic() + self.args.warmup
        warm = [threading.Thread(target=self.client, args=(1000 + i,), daemon=True) for i in range(self.args.clients)]
        for thread in warm:
            thread.start()
        for thread in warm:
            thread.join()
        warmup_requests = self.total()
        with self.lock:
            self.counts.clear(), self.failures.clear(), self.errors.clear()
        processes = server_processes(group) if group else {}
        start_rss = {pid: rss_bytes(pid) for pid in processes}
        samples = []
        began = time.monotonic()
        self.deadline = began + self.args.duration
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(self.args.clients)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            time.sleep(self.args.sample_every)
            samples.append(
                {
                    "seconds": round(time.monotonic() - began, 1),
                    "requests": self.total(),
                    "rss_mib": {processes[pid]: round((rss_bytes(pid) or 0) / 2**20, 1) for pid in processes},
                }
            )
        wall = time.monotonic() - began
        requests = self.total()
        rows = []
        for pid, name in sorted(processes.items(), key=lambda item: item[1]):
            before, after = start_rss[pid], rss_bytes(pid)
            alive = after is not None
            growth = (after - before) / 2**20 if alive and before is not None else None
            rows.append(
                {
                    "process": name,
                    "pid": pid,
                    "alive": alive,
                    "rss_start_mib": round(before / 2**20, 1) if before else None,
                    "rss_end_mib": round(after / 2**20, 1) if alive else None,
                    "growth_mib_per_1000_requests": round(growth * 1000 / max(1, requests), 2)
                    if growth is not None
                    else None,
                }
            )
        return {
            "seconds": round(wall, 1),
            "clients": self.args.clients,
            "warmup_seconds": self.args.warmup,
            "warmup_requests": warmup_requests,
            "requests": requests,
            "failures": sum(self.failures.values()),
            "per_kind": {name: {"requests": self.counts[name], "failures": self.failures[name]} for name, _ in MIX},
            "errors": dict(self.errors.most_common(10)),
            "processes": rows,
            "samples": samples,
            "max_audio_seconds": self.args.max_audio_seconds,
        }


def markdown(report: dict) -> str:
    lines = common.report_head(
        "Soak: mixed load",
        report,
        [
            f"- {report['clients']} clients for {report['seconds']:.0f} s after a {report['warmup_seconds']:.0f} s "
            f"warm-up ({report['warmup_requests']} requests, not counted); MAX_AUDIO_SECONDS "
            f"{report['max_audio_seconds']}"
        ],
    )
    lines += [
        f"**{report['requests']} requests, {report['failures']} failures.**",
        "",
        "| kind | requests | failures |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {row['requests']} | {row['failures']} |" for name, row in report["per_kind"].items()]
    lines += [
        "",
        "| process | RSS after warm-up (MiB) | RSS at the end (MiB) | growth per 1,000 requests (MiB) |",
        "|---|---|---|---|",
    ]
    for row in report["processes"]:
        end = row["rss_end_mib"] if row["alive"] else "exited"
        lines.append(f"| {row['process']} | {row['rss_start_mib']} | {end} | {row['growth_mib_per_1000_requests']} |")
    if not report["processes"]:
        lines.append("| (a remote server: memory not sampled) | | | |")
    if report["errors"]:
        lines += ["", "Most frequent errors:", ""] + [f"- {count} × {text}" for text, count in report["errors"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_target_arguments(parser)
    parser.add_argument("--duration", type=parse_duration, default=parse_duration("10m"), help="e.g. 90s, 10m, 1h")
    parser.add_argument("--warmup", type=parse_duration, default=parse_duration("60s"))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-audio-seconds", type=float, default=2.0)
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--out", type=Path, help="folder for the JSON and markdown result")
    args = parser.parse_args(argv)
    meter = common.Contention()
    with common.target_from_args(args) as target:
        report = {
            "benchmark": "soak",
            **common.provenance(target),
            "device_tag": common.device_tag(target.device),
            **Soak(target, args).run(),
        }
        report["contention"] = meter.finish(target)
    table = markdown(report)
    print(table)
    if args.out:
        stem = f"soak_{report['model']}_{report['device_tag']}"
        paths = common.write_report(args.out, stem, report, table)
        print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
