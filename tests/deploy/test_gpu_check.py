"""`make gpu-check` and `make gpu-bundle`: the smoke run end to end on the CPU (every
step, tiny model), the plan (most valuable figures first, half a device call in all),
the runner's handling of failing and slow steps and its results written as each step
finishes, the summary's targets against docs/performance.md (Triton rows invalid when
Mimi ran on the CPU; torch against its pin), ONNX Runtime's CUDA options, the GPU
results that get committed, and the bundle that travels to the GPU machine (its
listing always; the built bundle when `make gpu-bundle` has made one here: CI never
downloads its 50 MB)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from loadtest import gpu_bundle, gpu_check, gpu_summary

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["setup", "environment", "repository", "gpu-tests", "engine-bench", "triton"]


# --- the smoke run ---------------------------------------------------------------------------
def smoke_command(out: Path, work: Path, checkpoint: Path) -> list[str]:
    """The smoke run as the test below starts it: `make gpu-check SMOKE=1`'s module and
    flags (test_make_gpu_check_smoke_is_the_smoke_run), plus a test's own folders."""
    folders = ["--out", str(out), "--work", str(work), "--checkpoint", str(checkpoint)]
    return [sys.executable, "-m", "loadtest.gpu_check", "--smoke", *folders, "--time-limit", "300"]


def make_gpu_check(*variables: str) -> list[str]:
    """What `make gpu-check` runs, printed by `make -n` (not run), as argv. Without the
    caller's make variables: a parent make's MAKEFLAGS or an exported SMOKE would leak in."""
    environment = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "SMOKE")}
    printed = subprocess.run(
        ["make", "-n", "--no-print-directory", "gpu-check", "GPU_CHECK_ARGS=", "GPU_CHECK_BUNDLE=", *variables],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return shlex.split(printed.replace("\\\n", " "))


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_gpu_check_smoke_is_the_smoke_run(tmp_path):
    smoke, device = make_gpu_check("SMOKE=1"), make_gpu_check("SMOKE=")
    assert smoke[smoke.index("-m") + 1] == "loadtest.gpu_check"
    assert "--smoke" in smoke and "--smoke" not in device
    # Every flag make passes, the smoke test passes too: it runs what the target runs.
    flags = {arg for arg in smoke if arg.startswith("--")}
    assert flags == {"--out", "--smoke"} and flags <= set(smoke_command(tmp_path, tmp_path, tmp_path))


@pytest.mark.slow
@pytest.mark.integration
def test_smoke_run_goes_through_every_step_on_the_cpu(tiny_checkpoint, tmp_path):
    out = tmp_path / "gpu-check"
    run = subprocess.run(
        smoke_command(out, tmp_path / "work", tiny_checkpoint),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    statuses = {step["name"]: (step["status"], step["reason"]) for step in record["steps"]}
    assert list(statuses) == STEPS
    assert statuses["setup"][0] == "skipped"  # no --bundle: this venv
    assert statuses["gpu-tests"] == ("skipped", "no CUDA")  # skipped, not failed
    assert all(statuses[name][0] == "passed" for name in ("environment", "repository", "engine-bench", "triton"))

    summary = (out / "summary.md").read_text()
    assert summary == (out / "gpu_check_cpu_summary.md").read_text()
    for name in STEPS:
        assert f"| {name} | " in summary
    assert "smoke run on the CPU" in summary and "not judged (CPU smoke run)" in summary
    bench = json.loads((out / "triton" / "bench_stream_tiny_cpu.json").read_text())
    assert [level["concurrency"] for level in bench["levels"]] == [1, 2]
    assert all(level["failures"] == 0 for level in bench["levels"])
    ttfa = next(line for line in summary.splitlines() if line.startswith("| TTFA p50 at c=1"))
    assert " ms |" in ttfa  # a measured figure, not "-"
    assert (out / "engine-bench" / "engine_tiny_cpu_float32.json").is_file()
    assert (out / "environment" / "gpu_check_cpu_environment.json").is_file()
    assert (out / "triton" / "tritonserver.log").is_file()
    # The device plan's budget against the device's limits, in the output and the summary.
    assert "device plan:" in run.stderr and "a rerun fits" in run.stderr
    assert record["finished"] is True and record["budget"]["fits_with_rerun"] is True
    assert "- device plan:" in summary and "a rerun fits" in summary
    # Mimi's provider (the cpu profile: KIND_CPU) and torch against its pin.
    triton_run = json.loads((out / "triton" / "triton_cpu_run.json").read_text())
    assert triton_run["mimi_provider"] == "CPUExecutionProvider"
    assert [level["concurrency"] for level in triton_run["levels"]] == [1, 2]
    assert "- Mimi (ONNX Runtime, onnxruntime " in summary
    assert "not judged (CPU smoke run)" in ttfa  # CPU Mimi in a smoke run is expected, not invalid
    assert any(line.startswith("- torch ") or line.startswith("- **torch skew**") for line in summary.splitlines())


# --- the plan --------------------------------------------------------------------------------
def device_args(tmp_path) -> SimpleNamespace:
    return SimpleNamespace(
        out=tmp_path / "out",
        work=tmp_path / "work",
        smoke=False,
        profile="h100",
        checkpoint=None,
        triton_max_slots=None,
        device_tag="cuda",
    )


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_plan_puts_the_valuable_figures_first_and_fits_twice_in_the_device_session(tmp_path):
    steps = gpu_check.plan(device_args(tmp_path), sys.executable)
    foreground = [step.name for step in steps if not step.background]
    assert foreground == ["environment", "gpu-tests", "engine-bench", "triton"]
    assert next(step for step in steps if step.name == "environment").budget_s <= 30  # versions and a probe only
    engine = next(step for step in steps if step.name == "engine-bench").argv
    assert option(engine, "--batch-sizes") == "1,64" and option(engine, "--dtype") == "bf16"
    triton = next(step for step in steps if step.name == "triton")
    assert option(triton.argv, "--concurrency") == "1,32,64" and triton.after == "repository"
    assert int(option(triton.argv, "--max-slots")) >= 64  # c=64 fits

    planned = gpu_check.planned_seconds(steps)
    assert planned <= 0.5 * gpu_check.DEVICE_CALL_S  # half of one 600 s call
    assert planned <= gpu_check.DEFAULT_TIME_LIMIT_S <= 0.5 * gpu_check.DEVICE_CALL_S
    assert 2 * gpu_check.DEFAULT_TIME_LIMIT_S + gpu_check.DEVICE_START_S <= gpu_check.DEVICE_SESSION_S
    # The repository builds in the background from the start: triton starts when both it and
    # the steps before are done, and the plan counts that wait.
    repository = next(step for step in steps if step.name == "repository")
    before_triton = sum(step.budget_s for step in steps if not step.background and step.name != "triton")
    assert planned == gpu_check.SETUP_BUDGET_S + max(before_triton, repository.budget_s) + triton.budget_s
    budget = gpu_check.device_budget()
    assert budget["planned_s"] == planned and budget["fits_with_rerun"]
    assert "a rerun fits" in gpu_summary.budget_line(budget)


def test_the_gpu_tests_step_runs_every_file_of_gpu_tests(tmp_path):
    step = next(step for step in gpu_check.plan(device_args(tmp_path), sys.executable) if step.name == "gpu-tests")
    marked = re.compile(r"^(pytestmark = .*|@)pytest\.mark\.gpu\b", re.MULTILINE)
    files = [path.relative_to(ROOT).as_posix() for path in sorted((ROOT / "tests").rglob("test_*.py"))]
    gpu_files = [name for name in files if marked.search((ROOT / name).read_text())]
    assert "tests/model/test_engine_gpu_instance.py" in gpu_files
    assert [arg for arg in step.argv if arg.startswith("tests/")] == gpu_files


def test_the_planned_length_follows_the_critical_path():
    steps = [
        python_step("background", "", 100, background=True),
        python_step("a", "", 30),
        python_step("needs-background", "", 50, after="background"),
        python_step("b", "", 10),
    ]
    assert gpu_check.planned_seconds(steps, setup_s=5) == 5 + 100 + 50 + 10
    steps[0].budget_s = 10  # ready before its turn: no wait
    assert gpu_check.planned_seconds(steps, setup_s=5) == 5 + 30 + 50 + 10


# --- the runner ------------------------------------------------------------------------------
def python_step(name: str, code: str, budget: float = 30, **options) -> gpu_check.Step:
    return gpu_check.Step(name, f"proves {name}", [sys.executable, "-c", code], budget, **options)


def test_a_failing_and_a_slow_step_are_reported_while_the_others_still_run(tmp_path):
    steps = [
        python_step("fails-in-background", "import sys; print('error: no KV slot fits'); sys.exit(3)", background=True),
        python_step("passes", "print('fine')"),
        python_step("too-slow", "import time; time.sleep(60)", budget=2),
        python_step("needs-the-failed-one", "print('never')", after="fails-in-background"),
        python_step("passes-after", "print('still run')"),
    ]
    runner = gpu_check.Runner(tmp_path, deadline=gpu_check.time.monotonic() + 60)
    gpu_check.execute(steps, runner, only=None)
    results = runner.results
    assert results["fails-in-background"].status == "failed"
    assert "exit code 3" in results["fails-in-background"].reason
    assert "no KV slot fits" in results["fails-in-background"].reason
    assert results["too-slow"].status == "timed out" and results["too-slow"].seconds < 30
    assert results["needs-the-failed-one"].status == "not run"
    assert results["passes"].status == results["passes-after"].status == "passed"
    assert (tmp_path / "passes" / "passes.log").read_text().endswith("fine\n")

    args = SimpleNamespace(out=tmp_path, smoke=False, device_tag="cuda", commit="abc1234", time_limit=60)
    ordered = [results[step.name] for step in steps]
    assert gpu_check.write_results(args, ordered, gpu_check.time.monotonic()) == 1
    summary = (tmp_path / "gpu_check_cuda_summary.md").read_text()
    assert "**failed: fails-in-background, too-slow, needs-the-failed-one**" in summary
    assert "| too-slow | proves too-slow | timed out |" in summary
    assert "`abc1234`" in summary


SEEN_ON_DISK = (
    "import json, pathlib, sys; "
    "steps = json.loads(pathlib.Path(sys.argv[1], 'results.json').read_text())['steps']; "
    "print('on disk:', ' '.join(f\"{s['name']}={s['status']}\" for s in steps), flush=True); "
)


def stub_plan(out: Path) -> str:
    """A module body replacing gpu_check.plan with steps that look at results.json."""

    def step(name, code, budget):
        return f"gpu_check.Step({name!r}, 'proves {name}', [sys.executable, '-c', {code!r}, {str(out)!r}], {budget})"

    return (
        "import sys\nfrom loadtest import gpu_check\n"
        "gpu_check.plan = lambda args, python: [\n"
        f"    {step('first', 'print(1)', 30)},\n"
        f"    {step('fails', SEEN_ON_DISK + 'sys.exit(4)', 30)},\n"
        f"    {step('too-slow', SEEN_ON_DISK + 'import time; time.sleep(60)', 3)},\n"
        f"    {step('hangs', SEEN_ON_DISK + 'import time; time.sleep(600)', 600)},\n"
        "]\n"
        f"sys.exit(gpu_check.main(['--smoke', '--out', {str(out)!r}, '--time-limit', '900']))\n"
    )


def steps_running_for(out: Path) -> list[int]:
    """The ids of the stub steps still running with `out` on their command line."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(out).encode() in (proc / "cmdline").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "terminated"])
def test_each_result_is_on_disk_as_its_step_finishes_and_survives_a_stopped_run(tmp_path, stop):
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-c", stub_plan(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = gpu_check.time.monotonic() + 90
        hangs = out / "hangs" / "hangs.log"
        while gpu_check.time.monotonic() < deadline and not (hangs.is_file() and "on disk:" in hangs.read_text()):
            gpu_check.time.sleep(0.5)
        statuses = {step["name"]: step["status"] for step in json.loads((out / "results.json").read_text())["steps"]}
        assert statuses.get("too-slow") == "timed out", statuses
    finally:
        os.killpg(process.pid, stop)  # the whole run stopped from outside, mid-step
        process.wait(timeout=60)
        orphans = steps_running_for(out)  # each step has its own session
        for step in orphans:
            os.kill(step, signal.SIGKILL)
    # Each step saw the earlier ones' results on disk while it ran.
    assert "on disk: setup=skipped first=passed fails=pending" in (out / "fails" / "fails.log").read_text()
    assert "first=passed fails=failed too-slow=pending" in (out / "too-slow" / "too-slow.log").read_text()
    assert "fails=failed too-slow=timed out hangs=pending" in (out / "hangs" / "hangs.log").read_text()
    # What finished before the stop stayed: the failed and timed-out steps did not take it with them.
    record = json.loads((out / "results.json").read_text())
    statuses = [(step["name"], step["status"]) for step in record["steps"]]
    assert statuses[:4] == [("setup", "skipped"), ("first", "passed"), ("fails", "failed"), ("too-slow", "timed out")]
    summary = (out / "summary.md").read_text()
    assert "| too-slow | proves too-slow | timed out |" in summary
    assert not list(out.glob("*.partial"))
    if stop == signal.SIGKILL:  # nothing could run after the kill: the last write says "still running"
        assert record["finished"] is False and statuses[4] == ("hangs", "pending")
        assert "**still running**" in summary
    else:  # SIGTERM (`timeout`): the running step ended, the stop recorded
        assert process.returncode == 143 and not orphans
        assert record["finished"] is True and statuses[4] == ("hangs", "timed out")
        assert "stopped (SIGTERM)" in record["steps"][4]["reason"]


def test_the_summary_quotes_the_targets_of_the_performance_doc():
    doc = (ROOT / "docs" / "performance.md").read_text()
    for target in gpu_summary.DOC_TARGETS:
        assert target in doc, f"docs/performance.md no longer says {target!r}: update loadtest/gpu_summary.py"


def test_figures_are_judged_against_the_targets_on_a_gpu(tmp_path):
    (tmp_path / "engine-bench").mkdir()
    (tmp_path / "triton").mkdir()
    (tmp_path / "engine-bench" / "engine_full_cuda_bfloat16.json").write_text(
        json.dumps(
            {
                "rows": [
                    {
                        "batch": 1,
                        "engine_ms_per_step": 8.0,
                        "speedup_vs_generate": 31.0,
                        "engine_x_real_time_aggregate": 10.0,
                    },
                    {
                        "batch": 64,
                        "engine_ms_per_step": 12.0,
                        "speedup_vs_generate": 1500.0,
                        "engine_x_real_time_aggregate": 420.0,
                    },
                ]
            }
        )
    )
    levels = [
        {
            "concurrency": 1,
            "ttfa_ms": {"p50": 61.0, "p95": 70.0},
            "real_time_factor": {"p50": 0.1},
            "aggregate_x_real_time": 9.0,
        },
        {
            "concurrency": 64,
            "ttfa_ms": {"p50": 90.0, "p95": 200.0},
            "real_time_factor": {"p50": 0.2},
            "aggregate_x_real_time": 310.0,
        },
    ]
    (tmp_path / "triton" / "bench_stream_full-random_gpu.json").write_text(json.dumps({"levels": levels}))
    rows = {figure: (measured, verdict) for figure, measured, _, verdict in gpu_summary.figures(tmp_path, smoke=False)}
    assert rows["single stream through Triton (c=1: real-time factor p50 x 80 ms)"] == ("8.0 ms/frame", "**met**")
    assert rows["engine vs transformers generate, batch 1, same weights"][1] == "**met**"
    assert rows["aggregate at 64 concurrent streams through Triton"][1] == "**met**"
    assert rows["TTFA p50 at c=1 (stored voice, prefix cached)"] == ("61.0 ms", "**missed**")
    assert rows["TTFA p95 at c=32"] == ("-", "no figure")


def test_the_gpu_tests_report_is_judged_in_the_summary(tmp_path):
    (tmp_path / "gpu-tests").mkdir()
    precision = {"model": "m", "frames": 64, "requests": 16, "identical_fraction": 0.01, "first_divergent_frame": 0}
    report = {
        "bf16_vs_fp32": {**precision, "first_codes_equal": 3, "first_codes_equal_at_least": 4},
        "seeded_sampling": {
            "batch": 32,
            "frames": 16,
            "alone_repeats": True,
            "in_batch_equals_alone": False,
            "first_different_frame_in_batch": 3,
        },
        "device_error": {"out_of_range": {"type": "torch.AcceleratorError", "fatal": True}, "later": {"fatal": True}},
    }
    (tmp_path / "gpu-tests" / "gpu_tests_cuda_report.json").write_text(json.dumps(report))
    rows = {figure: (measured, verdict) for figure, measured, _, verdict in gpu_summary.figures(tmp_path, smoke=False)}
    measured, verdict = rows["bf16 vs fp32 engine, greedy, 64 frames x 16 requests (m)"]
    assert measured.startswith("first codes equal for 3 of 16;") and verdict == "**missed**"
    assert rows["seeded request alone twice, and in a batch of 32 (16 frames)"] == (
        "repeats alone; in the batch other codes from frame 3",
        "**met**",
    )
    device_error = "a real device-side assert (and the next kernel) judged fatal by engine.faults"
    assert rows[device_error] == ("torch.AcceleratorError: fatal", "**met**")


def write_figures(folder: Path) -> None:
    (folder / "engine-bench").mkdir(parents=True)
    (folder / "triton").mkdir()
    (folder / "engine-bench" / "engine_full_cuda_bfloat16.json").write_text(
        json.dumps(
            {
                "rows": [
                    {
                        "batch": 1,
                        "engine_ms_per_step": 8.0,
                        "speedup_vs_generate": 31.0,
                        "engine_x_real_time_aggregate": 10.0,
                    }
                ]
            }
        )
    )
    levels = [
        {
            "concurrency": c,
            "ttfa_ms": {"p50": 40.0, "p95": 90.0},
            "real_time_factor": {"p50": 0.1},
            "aggregate_x_real_time": 400.0,
        }
        for c in (1, 32, 64)
    ]
    (folder / "triton" / "bench_stream_full-random_gpu.json").write_text(json.dumps({"levels": levels}))


TRITON_FIGURES = [
    "single stream through Triton (c=1: real-time factor p50 x 80 ms)",
    "aggregate at 64 concurrent streams through Triton",
    "TTFA p50 at c=1 (stored voice, prefix cached)",
    "TTFA p95 at c=32",
]


@pytest.mark.parametrize("where", ["triton", "environment"])
def test_triton_rows_are_invalid_when_mimi_ran_on_the_cpu(tmp_path, where):
    write_figures(tmp_path)
    verdicts = {figure: verdict for figure, _, _, verdict in gpu_summary.figures(tmp_path, smoke=False)}
    assert all(verdicts[figure] == "**met**" for figure in TRITON_FIGURES)  # no provider known: judged
    if where == "triton":  # the triton step's probe of the served mimi_decoder
        (tmp_path / "triton" / "triton_cuda_run.json").write_text(json.dumps({"mimi_provider": "CPUExecutionProvider"}))
    else:  # only the environment step's probe
        (tmp_path / "environment").mkdir()
        (tmp_path / "environment" / "gpu_check_cuda_environment.json").write_text(
            json.dumps(
                {
                    "torch": "2.11.0+cu130",
                    "torch_pinned": "2.13.0",
                    "packages": {"onnxruntime": "1.22.0"},
                    "onnxruntime_probe": {
                        "provider": "CPUExecutionProvider",
                        "device": "cuda:0",
                        "available": ["CPUExecutionProvider"],
                    },
                }
            )
        )
    verdicts = {figure: verdict for figure, _, _, verdict in gpu_summary.figures(tmp_path, smoke=False)}
    for figure in TRITON_FIGURES:
        assert verdicts[figure].startswith("**invalid**: Mimi ran on the CPU"), figure
    assert verdicts["engine vs transformers generate, batch 1, same weights"] == "**met**"  # no Mimi in it
    assert verdicts["single stream, engine in-process (batch 1, steady state)"] == "**met**"
    # A smoke run's Mimi is on the CPU by design: not judged, not invalid.
    smoke = {figure: verdict for figure, _, _, verdict in gpu_summary.figures(tmp_path, smoke=True)}
    assert smoke[TRITON_FIGURES[0]] == "not judged (CPU smoke run)"

    record = {"smoke": False, "seconds": 1, "time_limit_s": 300, "command": "x", "failed": [], "steps": []}
    summary = gpu_summary.summary_markdown(tmp_path, record)
    assert "CPUExecutionProvider (**on the CPU: the Triton figures are invalid**)" in summary


def test_the_served_mimi_counts_as_on_the_cpu_when_its_log_says_so():
    from loadtest.gpu_steps import mimi_provider

    on_cuda = {"provider": "CUDAExecutionProvider"}
    assert mimi_provider(on_cuda, ["csm_lm: 64 KV slots"]) == "CUDAExecutionProvider"
    assert (
        mimi_provider(
            on_cuda,
            [
                "mimi_decoder_0: KIND_GPU instance but onnxruntime runs it on the CPU "
                "(providers in use: CPUExecutionProvider)"
            ],
        )
        == "CPUExecutionProvider"
    )
    assert (
        mimi_provider(
            on_cuda, ["mimi_encoder: KIND_GPU instance but onnxruntime has no CUDA provider; running on the CPU"]
        )
        == "CPUExecutionProvider"
    )
    assert mimi_provider({}, []) == "unknown"


def test_onnxruntime_cuda_options_do_not_search_cudnn_algorithms_per_shape():
    from csm_triton.serving.onnxruntime.session import _cuda_options
    from csm_triton.triton.parameters import ParameterError, Parameters

    def options(**parameters):
        config = {"parameters": {key: {"string_value": value} for key, value in parameters.items()}}
        return _cuda_options(Parameters(config, "mimi_decoder"), "cuda:1")

    assert options() == {
        "device_id": "1",
        "arena_extend_strategy": "kNextPowerOfTwo",
        "cudnn_conv_algo_search": "HEURISTIC",
    }  # not ORT's EXHAUSTIVE default
    assert options(cudnn_conv_algo_search="2")["cudnn_conv_algo_search"] == "DEFAULT"
    assert options(cudnn_conv_algo_search="0")["cudnn_conv_algo_search"] == "EXHAUSTIVE"  # the native key, if asked
    with pytest.raises(ParameterError, match="cudnn_conv_algo_search"):
        options(cudnn_conv_algo_search="EXHAUSTIVE")


def test_the_onnxruntime_probe_reports_the_provider_really_in_use():
    import onnxruntime

    from loadtest.gpu_steps import onnxruntime_probe

    probe = onnxruntime_probe("cuda:0")  # a KIND_GPU session made as the Triton backend makes it
    assert probe["available"] == onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" in probe["available"]:
        assert probe["provider"] in ("CUDAExecutionProvider", "CPUExecutionProvider")  # CPU: its libraries failed
        if probe["provider"] == "CUDAExecutionProvider":
            assert probe["provider_options"]["CUDAExecutionProvider"]["cudnn_conv_algo_search"] == "HEURISTIC"
    else:
        assert probe["provider"] == "CPUExecutionProvider" and probe["in_use"] == ["CPUExecutionProvider"]
    assert onnxruntime_probe("cpu")["in_use"] == ["CPUExecutionProvider"]


def test_torch_against_its_pin_is_one_line_of_the_summary(tmp_path):
    from loadtest.gpu_steps import pinned_version

    pin = gpu_bundle.project_pins()["torch"]
    assert pinned_version("torch") == pin
    skew = gpu_summary.torch_skew("2.11.0+cu130", "2.13.0")
    assert skew.startswith("**torch skew**") and "2.11.0+cu130" in skew and "older than the 2.13.0" in skew
    assert "newer" in gpu_summary.torch_skew("2.14.0", "2.13.0")
    assert gpu_summary.torch_skew("2.13.0+cu130", "2.13.0").endswith("no skew")
    (tmp_path / "environment").mkdir()
    (tmp_path / "environment" / "gpu_check_cuda_environment.json").write_text(
        json.dumps({"torch": "2.11.0+cu130", "torch_pinned": pin})
    )
    record = {"smoke": False, "seconds": 1, "time_limit_s": 300, "command": "x", "failed": [], "steps": []}
    summary = gpu_summary.summary_markdown(tmp_path, record)
    assert f"- {gpu_summary.torch_skew('2.11.0+cu130', pin)}" in summary.splitlines()


def test_only_results_measured_on_a_gpu_are_committed(tmp_path):
    run, results = tmp_path / "run", tmp_path / "results"
    names = [
        "engine_full_cuda_bfloat16.json",
        "bench_stream_full-random_gpu.md",
        "gpu_tests_cuda_report.json",
        "gpu_check_cuda_summary.md",
        "bench_stream_tiny_cpu.json",
        "engine_tiny_cpu_float32.md",
        "tritonserver.log",
        "summary.md",
    ]
    for index, name in enumerate(names):
        (run / f"step{index}").mkdir(parents=True)
        (run / f"step{index}" / name).write_text(name)
    results.mkdir()
    copied = gpu_check.commit_results(run, results)
    assert sorted(p.name for p in copied) == sorted(names[:4])


def test_without_perth_the_served_copy_passes_audio_through_and_leaves_the_built_one_alone(tmp_path):
    from export.model_config import read_config
    from loadtest.gpu_steps import served_copy

    built = tmp_path / "built"
    for model in ("watermark", "watermark_detect", "csm_lm"):
        (built / model / "1").mkdir(parents=True)
        (built / model / "config.pbtxt").write_text((ROOT / "model_repository" / model / "config.pbtxt").read_text())
    (built / "csm_lm" / "1" / "weights.bin").write_bytes(b"\0" * 1024)
    adjustments = served_copy(built, tmp_path / "served", watermark=False)
    assert len(adjustments) == 2
    assert read_config(tmp_path / "served" / "watermark" / "config.pbtxt").parameters["enabled"].string_value == "false"
    assert not (tmp_path / "served" / "watermark_detect").exists()
    assert read_config(built / "watermark" / "config.pbtxt").parameters["enabled"].string_value == "true"
    assert (tmp_path / "served" / "csm_lm" / "1" / "weights.bin").stat().st_ino == (
        built / "csm_lm" / "1" / "weights.bin"
    ).stat().st_ino  # hard-linked, not copied
    assert served_copy(built, tmp_path / "served-on", watermark=True) == []
    assert served_copy(built, tmp_path / "capped", watermark=True, max_slots=96) == ["csm_lm: max_slots 96"]
    capped = read_config(tmp_path / "capped" / "csm_lm" / "config.pbtxt")
    assert capped.parameters["max_slots"].string_value == "96"
    assert read_config(built / "csm_lm" / "config.pbtxt") == read_config(
        ROOT / "model_repository" / "csm_lm" / "config.pbtxt"
    )  # the built one left alone


# --- the bundle --------------------------------------------------------------------------------
def test_the_bundle_listing_carries_the_pins_and_only_the_servers_files():
    listing = gpu_bundle.listing()
    pins = gpu_bundle.project_pins()
    packages = listing["packages"]
    assert int(packages["numpy"].split(".")[0]) < 2  # the stub's numpy ABI
    for name in gpu_bundle.PINNED:
        assert packages[name] == pins[gpu_bundle._canonical(name)]
    assert len({gpu_bundle._canonical(name) for name in packages}) == len(packages)
    assert "torch" not in packages  # the machine's own CUDA build
    files = listing["triton_files"]
    assert "pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub" in files
    assert "pytriton/tritonserver/bin/tritonserver" in files
    assert not [f for f in files if "python_backend_stubs/3.1" in f and "/3.12/" not in f]  # one stub
    assert not [f for f in files if "libpython" in f]
    assert any("libtritonserver" in f for f in files) and any("libcudart" in f for f in files)


def test_the_built_bundle_is_whole_and_within_the_limit():
    bundle = ROOT / "build" / "gpu-bundle"
    if not (bundle / gpu_bundle.MANIFEST).is_file():
        pytest.skip("no bundle built here (make gpu-bundle); CI does not download its 50 MB")
    manifest = json.loads((bundle / gpu_bundle.MANIFEST).read_text())
    assert manifest["total_bytes"] <= gpu_bundle.LIMIT_BYTES
    assert set(manifest["files"]) == {gpu_bundle.SITE_ARCHIVE, gpu_bundle.TRITON_ARCHIVE}
    for name, entry in manifest["files"].items():
        assert (bundle / name).stat().st_size == entry["bytes"]
        assert gpu_bundle.sha256_of(bundle / name) == entry["sha256"], f"{name} changed after the manifest"
    assert manifest["packages"] == gpu_bundle.packages(), "the pins changed since the bundle was built: make gpu-bundle"
    with tarfile.open(bundle / gpu_bundle.TRITON_ARCHIVE, "r:xz") as tar:
        names = set(tar.getnames())
    assert set(manifest["triton_files"]) <= names
    assert "nvidia_pytriton-0.7.0.dist-info/METADATA" in names


def test_installing_a_bundle_makes_a_venv_that_sees_the_host_packages_and_reuses_it(tmp_path):
    # A bundle for this interpreter with one package, installed as on the GPU machine.
    bundle, env = tmp_path / "bundle", tmp_path / "env"
    source = tmp_path / "source"
    (source / "bundled_marker").mkdir(parents=True)
    (source / "bundled_marker" / "__init__.py").write_text("WHERE = 'bundle'\n")
    bundle.mkdir()
    gpu_bundle.write_archive(source, ["bundled_marker/__init__.py"], bundle / gpu_bundle.SITE_ARCHIVE)
    gpu_bundle.write_archive(source, ["bundled_marker"], bundle / gpu_bundle.TRITON_ARCHIVE)
    files = {
        name: {"bytes": (bundle / name).stat().st_size} for name in (gpu_bundle.SITE_ARCHIVE, gpu_bundle.TRITON_ARCHIVE)
    }
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    (bundle / gpu_bundle.MANIFEST).write_text(json.dumps({"python": python, "files": files}))

    installed = gpu_bundle.install(bundle, env)
    assert installed["reused"] is False
    probe = subprocess.run(
        [
            str(gpu_bundle.env_python(env)),
            "-c",
            "import bundled_marker, numpy, csm_triton, loadtest; print(bundled_marker.WHERE, numpy.__version__)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["bundle", __import__("numpy").__version__]  # this venv's numpy, seen through
    assert gpu_bundle.install(bundle, env)["reused"] is True


@pytest.mark.integration
def test_a_model_that_fails_to_load_ends_the_servers_start_at_once(tmp_path):
    from csm_triton.serving.process import TritonServer
    from csm_triton.serving.readiness import TritonStartError
    from loadtest.gpu_steps import fail_fast_on_load_errors

    model = tmp_path / "repository" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'name: "broken"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
    )
    (model / "1" / "model.py").write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('no weights here')\n"
    )
    server = TritonServer(
        tmp_path / "repository",
        load_models=["broken"],
        ready_models=["broken"],
        startup_timeout=240,
        log_path=tmp_path / "tritonserver.log",
    )
    started = gpu_check.time.monotonic()
    with pytest.raises(TritonStartError, match="no weights here"):
        with fail_fast_on_load_errors(server):
            server.start()
    assert gpu_check.time.monotonic() - started < 120  # not the 240 s startup timeout
    assert server.process is None  # stopped
