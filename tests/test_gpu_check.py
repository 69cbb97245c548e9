"""`make gpu-check` and `make gpu-bundle`: the smoke run end to end on the CPU (every
step, tiny model), the runner's handling of failing and slow steps, the summary's
targets against docs/performance.md, the GPU results that get committed, and the
bundle that travels to the GPU machine (its listing always; the built bundle when
`make gpu-bundle` has made one here: CI never downloads its 50 MB)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from loadtest import gpu_bundle, gpu_check, gpu_summary

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["setup", "environment", "repository", "gpu-tests", "engine-bench", "triton"]


# --- the smoke run ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
def test_smoke_run_goes_through_every_step_on_the_cpu(tiny_checkpoint, tmp_path):
    out = tmp_path / "gpu-check"
    run = subprocess.run(
        [sys.executable, "-m", "loadtest.gpu_check", "--smoke", "--out", str(out), "--work", str(tmp_path / "work"),
         "--checkpoint", str(tiny_checkpoint), "--time-limit", "300"],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
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


# --- the runner ------------------------------------------------------------------------------
def python_step(name: str, code: str, budget: float = 30, **options) -> gpu_check.Step:
    return gpu_check.Step(name, f"proves {name}", [sys.executable, "-c", code], budget, **options)


def test_a_failing_and_a_slow_step_are_reported_while_the_others_still_run(tmp_path):
    steps = [
        python_step("fails-in-background", "import sys; print('error: no KV slot fits'); sys.exit(3)",
                    background=True),
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


def test_the_summary_quotes_the_targets_of_the_performance_doc():
    doc = (ROOT / "docs" / "performance.md").read_text()
    for target in gpu_summary.DOC_TARGETS:
        assert target in doc, f"docs/performance.md no longer says {target!r}: update loadtest/gpu_summary.py"


def test_figures_are_judged_against_the_targets_on_a_gpu(tmp_path):
    (tmp_path / "engine-bench").mkdir()
    (tmp_path / "triton").mkdir()
    (tmp_path / "engine-bench" / "engine_full_cuda_bfloat16.json").write_text(json.dumps({"rows": [
        {"batch": 1, "engine_ms_per_step": 8.0, "speedup_vs_generate": 31.0, "engine_x_real_time_aggregate": 10.0},
        {"batch": 64, "engine_ms_per_step": 12.0, "speedup_vs_generate": 1500.0, "engine_x_real_time_aggregate": 420.0},
    ]}))
    levels = [{"concurrency": 1, "ttfa_ms": {"p50": 61.0, "p95": 70.0}, "real_time_factor": {"p50": 0.1},
               "aggregate_x_real_time": 9.0},
              {"concurrency": 64, "ttfa_ms": {"p50": 90.0, "p95": 200.0}, "real_time_factor": {"p50": 0.2},
               "aggregate_x_real_time": 310.0}]
    (tmp_path / "triton" / "bench_stream_full-random_gpu.json").write_text(json.dumps({"levels": levels}))
    rows = {figure: (measured, verdict) for figure, measured, _, verdict in gpu_summary.figures(tmp_path, smoke=False)}
    assert rows["single stream through Triton (c=1: real-time factor p50 x 80 ms)"] == ("8.0 ms/frame", "**met**")
    assert rows["engine vs transformers generate, batch 1, same weights"][1] == "**met**"
    assert rows["aggregate at 64 concurrent streams through Triton"][1] == "**met**"
    assert rows["TTFA p50 at c=1 (stored voice, prefix cached)"] == ("61.0 ms", "**missed**")
    assert rows["TTFA p95 at c=32"] == ("-", "no figure")


def test_only_results_measured_on_a_gpu_are_committed(tmp_path):
    run, results = tmp_path / "run", tmp_path / "results"
    names = ["engine_full_cuda_bfloat16.json", "bench_stream_full-random_gpu.md", "gpu_tests_cuda_report.json",
             "gpu_check_cuda_summary.md", "bench_stream_tiny_cpu.json", "engine_tiny_cpu_float32.md",
             "tritonserver.log", "summary.md"]
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
    assert (tmp_path / "served" / "csm_lm" / "1" / "weights.bin").stat().st_ino == \
        (built / "csm_lm" / "1" / "weights.bin").stat().st_ino  # hard-linked, not copied
    assert served_copy(built, tmp_path / "served-on", watermark=True) == []
    assert served_copy(built, tmp_path / "capped", watermark=True, max_slots=96) == ["csm_lm: max_slots 96"]
    capped = read_config(tmp_path / "capped" / "csm_lm" / "config.pbtxt")
    assert capped.parameters["max_slots"].string_value == "96"
    assert read_config(built / "csm_lm" / "config.pbtxt") == \
        read_config(ROOT / "model_repository" / "csm_lm" / "config.pbtxt")  # the built one left alone


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
    files = {name: {"bytes": (bundle / name).stat().st_size} for name in (gpu_bundle.SITE_ARCHIVE, gpu_bundle.TRITON_ARCHIVE)}
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    (bundle / gpu_bundle.MANIFEST).write_text(json.dumps({"python": python, "files": files}))

    installed = gpu_bundle.install(bundle, env)
    assert installed["reused"] is False
    probe = subprocess.run(
        [str(gpu_bundle.env_python(env)), "-c",
         "import bundled_marker, numpy, csm_triton, loadtest; print(bundled_marker.WHERE, numpy.__version__)"],
        capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["bundle", __import__("numpy").__version__]  # this venv's numpy, seen through
    assert gpu_bundle.install(bundle, env)["reused"] is True


@pytest.mark.integration
def test_a_model_that_fails_to_load_ends_the_servers_start_at_once(tmp_path):
    from csm_triton.serving.process import TritonServer, TritonStartError
    from loadtest.gpu_steps import fail_fast_on_load_errors

    model = tmp_path / "repository" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_size: 0\n'
                                        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
                                        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
                                        'instance_group [ { count: 1 kind: KIND_CPU } ]\n')
    (model / "1" / "model.py").write_text("class TritonPythonModel:\n    def initialize(self, args):\n"
                                          "        raise RuntimeError('no weights here')\n")
    server = TritonServer(tmp_path / "repository", load_models=["broken"], ready_models=["broken"],
                          startup_timeout=240, log_path=tmp_path / "tritonserver.log")
    started = gpu_check.time.monotonic()
    with pytest.raises(TritonStartError, match="no weights here"):
        with fail_fast_on_load_errors(server):
            server.start()
    assert gpu_check.time.monotonic() - started < 120  # not the 240 s startup timeout
    assert server.process is None  # stopped
