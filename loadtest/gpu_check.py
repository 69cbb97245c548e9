"""The GPU proof in one command: the engine's GPU tests, the engine against transformers
`generate`, and Triton end to end with KIND_GPU, into one folder with a summary that
puts each figure beside its target (docs/performance.md).

    python3 -m loadtest.gpu_check --bundle build/gpu-bundle --out "$OUT/gpu-check"   # the GPU machine
    python -m loadtest.gpu_check --smoke --out build/gpu-check                      # any machine, tiny model on CPU
    python -m loadtest.gpu_check --commit-from DIR                                  # copy a run's GPU results

The plan puts the most valuable figures first (the engine's GPU tests; the engine's
ms/frame at batch 1 and 64 against `generate`; Triton's TTFA and aggregate at c=1, 32,
64) and its budgets add up to at most half of one 600 s device call, so that a rerun
fits in the session's 15 minutes of device time (`planned_seconds`; printed at the start
and in the summary). Each step is its own process with its own time budget (and log),
so a step that fails or runs out of time still leaves the others' results, and
results.json and summary.md are rewritten as each step finishes: a run killed from
outside keeps what finished. The summary says which step failed and why, and the exit
code is non-zero. The repository build (CPU work: a random full-size checkpoint, Mimi's
ONNX export) runs in the background while the GPU tests and the engine benchmark run.
`--smoke` runs every step on the tiny model on the CPU (few frames, concurrency 1 and
2): it proves the script, not the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtest import gpu_bundle
from loadtest.gpu_summary import budget_line, summary_markdown

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "loadtest" / "results"
# The device machine: 15 minutes of device time per session (start-up, idle waits and
# every call included), at most 600 s a command. The plan must fit twice with start-up.
DEVICE_CALL_S = 600
DEVICE_SESSION_S = 900
DEVICE_START_S = 180  # a bare machine's start, counted against the session (minutes)
DEFAULT_TIME_LIMIT_S = 300  # <= half a call: a rerun fits (2 x 300 + 180 <= 900)
SMOKE_TIME_LIMIT_S = 600  # the CPU smoke run (tiny model, a loaded 2-core machine): no device time
SETUP_BUDGET_S = 15  # installing the bundle into its virtualenv (reused on a rerun)
KILL_GRACE_S = 10  # after SIGTERM: the triton step stops its server in its finally block
# Seconds per step: (on the GPU, smoke run on the CPU).
BUDGETS = {
    "environment": (20, 60),
    "repository": (135, 300),
    # 65: the engine tests plus the instance tests (cuda:1, a real device-side assert in a
    # subprocess, seeds); still no later than the repository's 135 s in the background,
    # so the plan's length does not change.
    "gpu-tests": (65, 60),
    "engine-bench": (50, 180),
    "triton": (140, 240),
}


@dataclass
class Step:
    name: str
    proves: str
    argv: list[str]
    budget_s: float
    background: bool = False  # CPU work that overlaps the GPU steps
    after: str | None = None  # waits for this step (background) to finish first
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""  # said in the summary when it passes (where its large output went)


@dataclass
class Result:
    name: str
    proves: str
    status: str  # passed | failed | timed out | skipped | not run
    reason: str = ""
    seconds: float = 0.0
    budget_s: float = 0.0
    files: list[str] = field(default_factory=list)


# --- the plan ----------------------------------------------------------------------------
def plan(args, python: str) -> list[Step]:
    out, work = args.out, args.work
    module = [python, "-m"]
    smoke = args.smoke
    model, profile = ("tiny", "cpu") if smoke else ("full", args.profile)
    budget = {name: budgets[1 if smoke else 0] for name, budgets in BUDGETS.items()}
    repository = work / f"repository-{model}-{profile}"
    repository_argv = module + [
        "loadtest.gpu_steps",
        "repository",
        "--model",
        model,
        "--profile",
        profile,
        "--work",
        str(work),
        "--out",
        str(repository),
    ]
    if args.checkpoint:
        repository_argv += ["--checkpoint", str(args.checkpoint)]
    engine = module + ["loadtest.engine_bench", "--out", str(out / "engine-bench")]
    # bf16 vs fp32 token agreement is the GPU tests' (agreement frames 0 here).
    engine += (
        ["--tiny", "--batch-sizes", "1,2", "--frames", "6", "--prompt-tokens", "20"]
        if smoke
        else ["--batch-sizes", "1,64", "--frames", "16", "--dtype", "bf16"]
    ) + ["--agreement-frames", "0"]
    triton = module + [
        "loadtest.gpu_steps",
        "triton",
        "--repository",
        str(repository),
        "--work",
        str(work),
        "--out",
        str(out / "triton"),
    ]
    # One level at a time, c=1 first; each level a warm-up then the measured pass.
    triton += (
        [
            "--model-label",
            "tiny",
            "--concurrency",
            "1,2",
            "--min-requests",
            "2",
            "--max-audio-seconds",
            "1",
            "--startup-timeout",
            "180",
        ]
        if smoke
        else [
            "--concurrency",
            "1,32,64",
            "--min-requests",
            "8",
            "--max-audio-seconds",
            "4",
            "--startup-timeout",
            str(budget["triton"] - 40),
        ]
    )
    # 64 slots are all that c=64 needs: fewer CUDA graphs to capture at load than the profile's 256.
    max_slots = args.triton_max_slots or (None if smoke else 64)
    if max_slots:
        triton += ["--max-slots", str(max_slots)]
    tests_out = out / "gpu-tests"
    cores = os.cpu_count() or 1
    # On a big machine the export leaves half the cores to the GPU steps' host threads
    # (generate's kernel launches are CPU-bound); on 2 cores it takes what there is.
    background_threads = {"OMP_NUM_THREADS": str(cores // 2), "MKL_NUM_THREADS": str(cores // 2)} if cores >= 8 else {}
    return [
        Step(
            "environment",
            "device, driver, torch (vs the pin) and CUDA; the provider ONNX Runtime runs Mimi on",
            module + ["loadtest.gpu_steps", "environment", "--out", str(out / "environment")],
            budget["environment"],
        ),
        Step(
            "repository",
            f"a random {model}-size checkpoint and its model repository (profile {profile})",
            repository_argv,
            budget["repository"],
            background=True,
            env=background_threads,
            note=f"built in {repository}",
        ),
        Step(
            "gpu-tests",
            "pytest -m gpu: CUDA-graph replay = eager step, bf16 rotary tables and first codes vs fp32, KV slot "
            "sizing, an instance on cuda:1, a real device-side assert judged fatal, seeds alone vs in a batch",
            module
            + [
                "pytest",
                "-m",
                "gpu",
                "tests/model/test_engine_gpu.py",
                "tests/model/test_engine_gpu_instance.py",
                "-q",
                "-p",
                "no:cacheprovider",
                f"--junitxml={tests_out / f'gpu_tests_{args.device_tag}_junit.xml'}",
            ],
            budget["gpu-tests"],
            env={
                "CSM_GPU_TEST_MODEL": "tiny" if smoke else "full",
                "CSM_GPU_TEST_REPORT": str(tests_out / f"gpu_tests_{args.device_tag}_report.json"),
            },
        ),
        Step(
            "engine-bench",
            "engine ms/frame at batch 1 and 64 vs transformers generate, same weights, one process",
            engine,
            budget["engine-bench"],
        ),
        Step(
            "triton",
            "csm_tts_stream through tritonserver: TTFA and aggregate x real time at c="
            + option_value(triton, "--concurrency").replace(",", ", "),
            triton,
            budget["triton"],
            after="repository",
        ),
    ]


def option_value(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def planned_seconds(steps: list[Step], setup_s: float = SETUP_BUDGET_S) -> float:
    """The plan's length if every step used its whole budget: setup, then the steps in
    order, background steps overlapping them from the start, a step with `after` waiting
    for its prerequisite's end."""
    ends = {step.name: setup_s + step.budget_s for step in steps if step.background}
    clock = setup_s
    for step in steps:
        if step.background:
            continue
        clock = max(clock, ends.get(step.after, 0.0)) + step.budget_s
        ends[step.name] = clock
    return max(ends.values(), default=setup_s)


def device_budget(python: str = sys.executable) -> dict:
    """The device plan (`make gpu-check`, not --smoke) against the device's limits."""
    args = argparse.Namespace(
        out=ROOT / "build" / "gpu-check",
        work=ROOT / "build" / "gpu-check-work",
        smoke=False,
        profile="h100",
        checkpoint=None,
        triton_max_slots=None,
        device_tag="cuda",
    )
    planned = planned_seconds(plan(args, python))
    two_runs = 2 * DEFAULT_TIME_LIMIT_S + DEVICE_START_S
    return {
        "planned_s": planned,
        "time_limit_s": DEFAULT_TIME_LIMIT_S,
        "device_call_s": DEVICE_CALL_S,
        "share_of_call": round(planned / DEVICE_CALL_S, 3),
        "two_runs_s": two_runs,
        "device_session_s": DEVICE_SESSION_S,
        "start_s": DEVICE_START_S,
        "fits_with_rerun": planned <= DEFAULT_TIME_LIMIT_S <= DEVICE_CALL_S / 2 and two_runs <= DEVICE_SESSION_S,
    }


def requested_device_tag() -> str:
    """cuda or cpu, from nvidia-smi alone: the plan names files before torch is loaded."""
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        return "cuda"
    return "cpu"


# --- running -----------------------------------------------------------------------------
class Runner:
    def __init__(self, out: Path, deadline: float, progress=None):
        self.out, self.deadline = out, deadline
        self.running: dict[str, tuple[Step, subprocess.Popen, float, object]] = {}
        self.results: dict[str, Result] = {}
        self.progress = progress  # called after every result: the results so far go to disk

    def record(self, result: Result) -> None:
        self.results[result.name] = result
        if self.progress is not None:
            self.progress()

    def start(self, step: Step) -> None:
        folder = self.out / step.name
        folder.mkdir(parents=True, exist_ok=True)
        log = open(folder / f"{step.name}.log", "w")
        log.write("$ " + " ".join(step.argv) + "\n")
        log.flush()
        env = {**os.environ, **step.env, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            step.argv,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.running[step.name] = (step, process, time.monotonic(), log)

    def wait(self, name: str) -> Result:
        step, process, started, log = self.running[name]  # still listed while waited for (SIGTERM: main stops it)
        timeout = max(1.0, min(step.budget_s - (time.monotonic() - started), self.deadline - time.monotonic()))
        timed_out = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop_group(process)
        self.running.pop(name)
        log.close()
        seconds = time.monotonic() - started
        result = judge(step, process.returncode, timed_out, seconds, self.out / step.name)
        self.record(result)
        return result

    def run(self, step: Step) -> Result:
        self.start(step)
        return self.wait(step.name)

    def skip(self, step: Step, status: str, reason: str) -> None:
        self.record(Result(step.name, step.proves, status, reason, budget_s=step.budget_s))


def _stop_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def judge(step: Step, returncode: int | None, timed_out: bool, seconds: float, folder: Path) -> Result:
    files = sorted(p.relative_to(folder.parent).as_posix() for p in folder.rglob("*") if p.is_file())
    result = Result(step.name, step.proves, "passed", step.note, round(seconds, 1), step.budget_s, files)
    if timed_out:
        result.status, result.reason = "timed out", f"still running after {seconds:.0f} s: {last_line(folder)}"
    elif returncode != 0:
        result.status, result.reason = "failed", f"exit code {returncode}: {last_line(folder)}"
    elif step.name == "gpu-tests":
        result.status, result.reason = junit_status(folder)
    return result


def last_line(folder: Path) -> str:
    """The log line that most likely says why: the last error-looking line, else the last one."""
    logs = sorted(folder.glob("*.log"))
    lines = [line.strip() for line in logs[0].read_text(errors="replace").splitlines() if line.strip()] if logs else []
    for line in reversed(lines):
        if any(word in line for word in ("Error", "error:", "FAILED", "Exception", "failed")):
            return line[:400]
    return lines[-1][:400] if lines else "(no output)"


def junit_status(folder: Path) -> tuple[str, str]:
    """passed, or skipped with pytest's reasons when no test ran (no CUDA)."""
    import xml.etree.ElementTree as ElementTree

    reports = sorted(folder.glob("*junit.xml"))
    if not reports:
        return "failed", "pytest wrote no junit report"
    suite = ElementTree.parse(reports[0]).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    if tests and skipped == tests:
        reasons = sorted({(s.get("message") or "").removeprefix("Skipped: ") for s in suite.iter("skipped")})
        return "skipped", "; ".join(reasons) or "skipped"
    return "passed", f"{tests - skipped} passed" + (f", {skipped} skipped" if skipped else "")


def execute(steps: list[Step], runner: Runner, only: set[str] | None) -> None:
    for step in steps:
        if only and step.name not in only:
            continue
        if step.background:
            runner.start(step)
    for step in steps:
        if step.background or (only and step.name not in only):
            continue
        if step.after and step.after in runner.running:
            runner.wait(step.after)
        prerequisite = runner.results.get(step.after) if step.after else None
        if prerequisite is not None and prerequisite.status != "passed":
            runner.skip(step, "not run", f"needs {step.after}, which {prerequisite.status}")
        elif runner.deadline - time.monotonic() < 10:
            runner.skip(step, "not run", "out of time (--time-limit)")
        else:
            runner.run(step)
        print(f"{step.name}: {runner.results[step.name].status} {runner.results[step.name].reason}", file=sys.stderr)
    for name in list(runner.running):
        runner.wait(name)


# --- the GPU machine's environment -------------------------------------------------------
def set_up(args) -> tuple[str, Result]:
    """The python every step runs with: the bundle's virtualenv, else this one."""
    proves = "the bundle installed into a virtualenv over the machine's torch"
    if not args.bundle:
        return sys.executable, Result("setup", proves, "skipped", f"no --bundle: steps use {sys.executable}")
    started = time.monotonic()
    folder = args.out / "setup"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        installed = gpu_bundle.install(args.bundle, args.env)
    except (SystemExit, OSError, subprocess.CalledProcessError) as error:
        (folder / "setup.log").write_text(f"{error}\n")
        return sys.executable, Result("setup", proves, "failed", str(error)[:400], round(time.monotonic() - started, 1))
    (folder / "setup.json").write_text(json.dumps(installed, indent=2) + "\n")
    reused = " (reused)" if installed["reused"] else ""
    return (
        str(gpu_bundle.env_python(args.env)),
        Result(
            "setup",
            proves,
            "passed",
            f"{args.env}{reused}",
            round(time.monotonic() - started, 1),
            files=["setup/setup.json"],
        ),
    )


# --- results -----------------------------------------------------------------------------
def is_device_result(name: str) -> bool:
    """A result measured on a GPU: engine_bench names them *_cuda_*, bench *_gpu.*."""
    return "_cuda_" in name or "_gpu." in name or "_gpu_" in name


def commit_results(source: Path, target: Path = RESULTS) -> list[Path]:
    copied = []
    for path in sorted(source.rglob("*")):
        if path.is_file() and is_device_result(path.name) and not path.name.endswith(".log"):
            shutil.copy2(path, target / path.name)
            copied.append(target / path.name)
    return copied


def write_results(args, results: list[Result], started: float, final: bool = True) -> int:
    """results.json and summary.md (and its gpu_check_<tag>_summary.md copy), each file
    replaced whole (written beside, then renamed): called after every step while the run
    goes on (final=False: steps still to come say "pending") and once at the end."""
    failed = [r for r in results if r.status in ("failed", "timed out", "not run")]
    record = {
        "smoke": args.smoke,
        "device_tag": args.device_tag,
        "seconds": round(time.monotonic() - started, 1),
        "commit": args.commit,
        "finished": final,
        "time_limit_s": args.time_limit,
        "command": "python -m loadtest.gpu_check " + " ".join(sys.argv[1:]),
        "budget": getattr(args, "budget", None),
        "steps": [asdict(r) for r in results],
        "failed": [r.name for r in failed],
    }
    _replace(args.out / "results.json", json.dumps(record, indent=2) + "\n")
    text = summary_markdown(args.out, record)
    _replace(args.out / "summary.md", text)
    _replace(args.out / f"gpu_check_{args.device_tag}_summary.md", text)
    if final:
        print(text)
    return 1 if failed else 0


def _replace(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-check", help="every result goes here")
    parser.add_argument(
        "--work",
        type=Path,
        default=ROOT / "build" / "gpu-check-work",
        help="checkpoints and repositories (large: never inside --out)",
    )
    parser.add_argument("--smoke", action="store_true", help="every step on the tiny model on the CPU")
    parser.add_argument("--bundle", type=Path, help="a folder made by `make gpu-bundle` (the GPU machine)")
    parser.add_argument("--env", type=Path, default=ROOT / "build" / "gpu-env", help="the bundle's virtualenv")
    parser.add_argument("--profile", default="h100", help="repository profile (not with --smoke)")
    parser.add_argument("--checkpoint", type=Path, help="build the repository from this checkpoint")
    parser.add_argument(
        "--triton-max-slots", type=int, help="serve csm_lm with this max_slots (default: the profile's)"
    )
    parser.add_argument("--commit", help="the commit measured, when the checkout has no .git (the device's copy)")
    parser.add_argument("--only", help="comma-separated steps to (re)run; the others keep their last results")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help=f"seconds for all steps (default {DEFAULT_TIME_LIMIT_S}; {SMOKE_TIME_LIMIT_S} with --smoke)",
    )
    parser.add_argument("--commit-results", action="store_true", help="copy this run's GPU results to loadtest/results")
    parser.add_argument("--commit-from", type=Path, metavar="DIR", help="only copy the GPU results of a finished run")
    args = parser.parse_args(argv)
    if args.commit_from:
        copied = commit_results(args.commit_from)
        print("\n".join(f"copied {p.relative_to(ROOT)}" for p in copied) or "no *_cuda_* / *_gpu results there")
        return 0 if copied else 1
    started = time.monotonic()
    args.out, args.work = args.out.resolve(), args.work.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.device_tag = "cpu" if args.smoke else requested_device_tag()
    if args.device_tag == "cpu" and not args.smoke:
        print(
            "no GPU here (nvidia-smi finds none): --smoke runs every step on the tiny model on the CPU", file=sys.stderr
        )
        return 2
    if args.time_limit is None:
        args.time_limit = SMOKE_TIME_LIMIT_S if args.smoke else DEFAULT_TIME_LIMIT_S
    args.budget = device_budget()
    print(budget_line(args.budget), file=sys.stderr)
    previous = previous_results(args.out)  # read before the first write replaces them
    only = set(args.only.split(",")) if args.only else None
    python, setup = set_up(args)
    steps = plan(args, python)
    print(
        f"this run: {planned_seconds(steps):.0f} s planned, limit {args.time_limit:.0f} s: "
        + ", ".join(f"{s.name} {s.budget_s:.0f} s" + (" (background)" if s.background else "") for s in steps),
        file=sys.stderr,
    )

    def results_so_far(final: bool) -> list[Result]:
        pending = "pending" if not final else "not run"
        return [setup] + [runner.results.get(s.name) or previous_result(previous, s, only, pending) for s in steps]

    runner = Runner(
        args.out,
        deadline=started + args.time_limit,
        progress=lambda: write_results(args, results_so_far(False), started, final=False),
    )
    runner.progress()
    # Stopped from outside (`timeout`, the device's limit): end the running steps, keep
    # what finished, and say so.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if setup.status == "failed":
            for step in steps:
                runner.skip(step, "not run", "setup failed")
        else:
            execute(steps, runner, only)
    except SystemExit:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for name, (step, process, step_started, log) in list(runner.running.items()):
            runner.running.pop(name)
            _stop_group(process)
            log.close()
            runner.record(
                Result(
                    name,
                    step.proves,
                    "timed out",
                    "gpu_check was stopped (SIGTERM) during it",
                    round(time.monotonic() - step_started, 1),
                    step.budget_s,
                )
            )
        write_results(args, results_so_far(True), started)
        raise
    code = write_results(args, results_so_far(True), started)
    if args.commit_results:
        for path in commit_results(args.out):
            print(f"copied {path.relative_to(ROOT)}", file=sys.stderr)
    return code


def previous_results(out: Path) -> dict[str, dict]:
    """The steps of the run before (results.json), by name."""
    try:
        return {entry["name"]: entry for entry in json.loads((out / "results.json").read_text())["steps"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def previous_result(
    previous: dict[str, dict], step: Step, only: set[str] | None = None, pending: str = "not run"
) -> Result:
    """A step without a result in this run: left out by --only (its result from the run
    before, if any), or still to come."""
    if only and step.name not in only:
        entry = previous.get(step.name)
        if entry and entry.get("status") != "pending":
            try:
                result = Result(**entry)
                result.reason = ("(previous run) " + result.reason.removeprefix("(previous run) ")).strip()
                return result
            except TypeError:
                pass
        return Result(step.name, step.proves, "not run", "left out by --only", budget_s=step.budget_s)
    reason = "not finished yet" if pending == "pending" else "never started"
    return Result(step.name, step.proves, pending, reason, budget_s=step.budget_s)


if __name__ == "__main__":
    sys.exit(main())
