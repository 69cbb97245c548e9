"""summary.md of a `loadtest.gpu_check` run: every step with its status, and every
figure beside its target from docs/performance.md.

The targets' wording is docs/performance.md's (tests/deploy/test_gpu_check.py checks that each
one still appears there verbatim); the thresholds that judge them sit beside it here.
"""

from __future__ import annotations

import json
from pathlib import Path

FRAME_MS = 80.0  # one Mimi frame of audio
SINGLE_STREAM = "≤ 10 ms/frame (≥ 8× real time)"
AGGREGATE_64 = "≥ 300× real time (≥ 1,000× at 256; floor 1,920×)"
TTFA = "p50 ≤ 50 ms at c=1; p95 ≤ 250 ms at c=32"
VERSUS_GENERATE = "≥ 20× faster at batch 1 on GPU"
DOC_TARGETS = (SINGLE_STREAM, AGGREGATE_64, TTFA, VERSUS_GENERATE)


CPU_PROVIDER = "CPUExecutionProvider"
TRITON_ROWS = (
    "single stream through Triton",
    "aggregate at 64 concurrent streams through Triton",
    "TTFA p50",
    "TTFA p95",
)


def budget_line(budget: dict) -> str:
    """The device plan against the device's limits (gpu_check.device_budget)."""
    verdict = "a rerun fits" if budget["fits_with_rerun"] else "**a rerun does NOT fit**"
    return (
        f"device plan: {budget['planned_s']:.0f} s of step budgets (setup included) within a "
        f"{budget['time_limit_s']:.0f} s limit = {budget['planned_s'] / budget['device_call_s']:.0%} of one "
        f"{budget['device_call_s']} s call; two runs at the limit + {budget['start_s']} s start-up = "
        f"{budget['two_runs_s']} s of the {budget['device_session_s']} s device session: {verdict}"
    )


def _release(version: str) -> tuple[int, ...]:
    """2.11.0+cu130 -> (2, 11, 0): the release, without the local build tag."""
    numbers = []
    for part in version.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


def torch_skew(device: str | None, pinned: str | None) -> str:
    """One line: the torch that ran against the one pyproject.toml pins."""
    if not device:
        return "torch: not known (no environment record)"
    if not pinned:
        return f"torch {device}: pyproject.toml pins none"
    if _release(device) == _release(pinned):
        return f"torch {device} = the pin {pinned} (pyproject.toml): no skew"
    direction = "older" if _release(device) < _release(pinned) else "newer"
    return (
        f"**torch skew**: the device ran torch {device}, {direction} than the {pinned} pinned in pyproject.toml "
        "(the engine's figures and GPU tests are the device's torch's)"
    )


def mimi_provider(out: Path) -> tuple[str | None, str]:
    """The provider Mimi's decoder ran on, and where that was read: the triton step's
    probe of the served model and server log, else the environment step's probe."""
    run = _load(out / "triton", "triton_*_run.json") or {}
    if run.get("mimi_provider"):
        return run["mimi_provider"], "probe of the served mimi_decoder + tritonserver log"
    environment = _load(out / "environment", "gpu_check_*_environment.json") or {}
    probe = environment.get("onnxruntime_probe") or {}
    if probe.get("provider"):
        return probe["provider"], f"environment probe (one Conv on {probe.get('device')})"
    return None, "no probe"


def _mimi_line(out: Path, smoke: bool = False) -> str:
    provider, source = mimi_provider(out)
    environment = _load(out / "environment", "gpu_check_*_environment.json") or {}
    packages = environment.get("packages") or {}
    build = (
        "onnxruntime-gpu " + packages["onnxruntime-gpu"]
        if packages.get("onnxruntime-gpu")
        else "onnxruntime " + (packages.get("onnxruntime") or "?")
    )
    probe = (
        (_load(out / "triton", "triton_*_run.json") or {}).get("mimi_probe")
        or environment.get("onnxruntime_probe")
        or {}
    )
    options = (probe.get("provider_options") or {}).get("CUDAExecutionProvider") or {}
    search = (
        f"; cudnn_conv_algo_search {options['cudnn_conv_algo_search']}" if options.get("cudnn_conv_algo_search") else ""
    )
    error = f"; {probe['error']}" if probe.get("error") else ""
    flag = (
        ""
        if provider != CPU_PROVIDER
        else (" (as planned: smoke run on the CPU)" if smoke else " (**on the CPU: the Triton figures are invalid**)")
    )
    return (
        f"Mimi (ONNX Runtime, {build}): {provider or 'unknown'}{flag} — {source}; available: "
        f"{', '.join(probe.get('available') or []) or '-'}{search}{error}"
    )


def _load(folder: Path, pattern: str) -> dict | None:
    for path in sorted(folder.glob(pattern)):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None
    return None


def _row(rows: list[dict], key: str, value) -> dict | None:
    return next((row for row in rows if row.get(key) == value), None)


def _verdict(value, met, smoke: bool) -> str:
    if value is None:
        return "no figure"
    if smoke:
        return "not judged (CPU smoke run)"
    return "**met**" if met(value) else "**missed**"


def _figure(value, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}{unit}"


def _gpu_test_rows(tests: dict) -> list[tuple[str, str, str, str]]:
    """The GPU tests' figures (their report: tests/model/conftest.py gpu_report). A test
    that missed its bound failed in pytest already; these rows say by how much."""
    rows = []
    graphs = tests.get("cuda_graph_vs_eager")
    if graphs:
        equal = all(case["codes_equal"] for case in graphs)
        buckets = ", ".join(f"({case['batch']}, {case['attend_len']})" for case in graphs)
        rows.append(
            (
                f"CUDA-graph replay = eager frame step, buckets {buckets}",
                "equal" if equal else "DIFFERENT",
                "equal codes",
                "**met**" if equal else "**missed**",
            )
        )
    precision = tests.get("bf16_vs_fp32")
    if precision:
        first, bound = precision.get("first_codes_equal"), precision.get("first_codes_equal_at_least")
        rows.append(
            (
                f"bf16 vs fp32 engine, greedy, {precision['frames']} frames x {precision['requests']} requests "
                f"({precision['model']})",
                ("" if first is None else f"first codes equal for {first} of {precision['requests']}; ")
                + f"{precision['identical_fraction']:.1%} identical; first divergence at frame "
                f"{precision['first_divergent_frame']}",
                "reported" if bound is None else f"first codes equal for >= {bound} (chance: 1 in 2,048 each)",
                "-" if bound is None else "**met**" if first >= bound else "**missed**",
            )
        )
    slots = tests.get("kv_slots")
    if slots:
        rows.append(
            (
                "KV slots at gpu_memory_fraction 0.85, CSM-1B bf16, 2048 positions",
                f"{slots['production_slots']:,} slots of {slots['production_slot_mib']:.0f} MiB "
                f"({slots['gpu_memory_gib']:.0f} GiB GPU)",
                "reported",
                "-",
            )
        )
    seeds = tests.get("seeded_sampling")
    if seeds:
        first = seeds.get("first_different_frame_in_batch")
        rows.append(
            (
                f"seeded request alone twice, and in a batch of {seeds['batch']} ({seeds['frames']} frames)",
                "repeats alone; in the batch "
                + ("the same codes" if seeds["in_batch_equals_alone"] else f"other codes from frame {first}"),
                "repeats alone (docs/api.md: in a batch not promised on a GPU)",
                "**met**" if seeds["alone_repeats"] else "**missed**",
            )
        )
    device_error = tests.get("device_error")
    if device_error:
        fatal = all(device_error[key].get("fatal") for key in ("out_of_range", "later"))
        rows.append(
            (
                "a real device-side assert (and the next kernel) judged fatal by engine.faults",
                f"{device_error['out_of_range'].get('type', 'nothing raised')}: " + ("fatal" if fatal else "NOT fatal"),
                "fatal (the stub ends, the model reloads)",
                "**met**" if fatal else "**missed**",
            )
        )
    return rows


def figures(out: Path, smoke: bool) -> list[tuple[str, str, str, str]]:
    """(figure, measured, target, verdict) rows."""
    engine = _load(out / "engine-bench", "engine_*.json") or {}
    bench = _load(out / "triton", "bench_stream_*.json") or {}
    tests = _load(out / "gpu-tests", "gpu_tests_*_report.json") or {}
    engine_rows, levels = engine.get("rows", []), bench.get("levels", [])
    batch1, batch64 = _row(engine_rows, "batch", 1) or {}, _row(engine_rows, "batch", 64) or {}
    c1, c32, c64 = (_row(levels, "concurrency", c) or {} for c in (1, 32, 64))

    rtf = (c1.get("real_time_factor") or {}).get("p50")
    triton_ms = rtf * FRAME_MS if rtf is not None else None
    engine_ms = batch1.get("engine_ms_per_step")
    speedup = batch1.get("speedup_vs_generate")
    aggregate = c64.get("aggregate_x_real_time")
    ttfa50 = (c1.get("ttfa_ms") or {}).get("p50")
    ttfa95 = (c32.get("ttfa_ms") or {}).get("p95")
    rows = [
        (
            "single stream through Triton (c=1: real-time factor p50 x 80 ms)",
            _figure(triton_ms, " ms/frame"),
            SINGLE_STREAM,
            _verdict(triton_ms, lambda v: v <= 10, smoke),
        ),
        (
            "single stream, engine in-process (batch 1, steady state)",
            _figure(engine_ms, " ms/frame", 2),
            SINGLE_STREAM,
            _verdict(engine_ms, lambda v: v <= 10, smoke),
        ),
        (
            "engine vs transformers generate, batch 1, same weights",
            _figure(speedup, "×"),
            VERSUS_GENERATE,
            _verdict(speedup, lambda v: v >= 20, smoke),
        ),
        (
            "aggregate at 64 concurrent streams through Triton",
            _figure(aggregate, "× real time"),
            AGGREGATE_64,
            _verdict(aggregate, lambda v: v >= 300, smoke),
        ),
        (
            "aggregate at batch 64, engine in-process (an upper bound)",
            _figure(batch64.get("engine_x_real_time_aggregate"), "× real time"),
            AGGREGATE_64,
            "context",
        ),
        (
            "TTFA p50 at c=1 (stored voice, prefix cached)",
            _figure(ttfa50, " ms"),
            TTFA,
            _verdict(ttfa50, lambda v: v <= 50, smoke),
        ),
        ("TTFA p95 at c=32", _figure(ttfa95, " ms"), TTFA, _verdict(ttfa95, lambda v: v <= 250, smoke)),
    ]
    provider, _ = mimi_provider(out)
    if not smoke and provider == CPU_PROVIDER:
        rows = [
            (figure, measured, target, "**invalid**: Mimi ran on the CPU (ONNX Runtime without CUDA)")
            if figure.startswith(TRITON_ROWS)
            else (figure, measured, target, verdict)
            for figure, measured, target, verdict in rows
        ]
    for row in engine_rows:
        if row["batch"] not in (1, 64):
            rows.append(
                (
                    f"engine in-process, batch {row['batch']}",
                    f"{row['engine_ms_per_step']} ms/step, {row['engine_x_real_time_aggregate']:,}× real time",
                    "-",
                    "context",
                )
            )
    rows += _gpu_test_rows(tests)
    return rows


def summary_markdown(out: Path, record: dict) -> str:
    smoke = record["smoke"]
    environment = _load(out / "environment", "gpu_check_*_environment.json") or {}
    devices = ", ".join(f"{d['name']} ({d['memory_gib']} GiB)" for d in environment.get("devices", [])) or "no GPU"
    title = "GPU check" + (": smoke run on the CPU (tiny model; proves the script, not the figures)" if smoke else "")
    lines = [
        f"# {title}",
        "",
        f"- device: {devices}; driver {environment.get('driver') or '-'}; torch {environment.get('torch', '?')} "
        f"(CUDA {environment.get('torch_cuda') or '-'}); Python {environment.get('python', '?')}",
        f"- machine: {environment.get('cpu', '?')}",
        f"- commit: `{record.get('commit') or environment.get('commit', '?')}`; command: `{record['command']}`",
        f"- {record['seconds']:.0f} s in all (limit {record['time_limit_s']:.0f} s); "
        + (f"**failed: {', '.join(record['failed'])}**" if record["failed"] else "no step failed")
        + ("" if record.get("finished", True) else "; **still running** (written after each step)"),
        f"- {_mimi_line(out, smoke)}",
        f"- {torch_skew(environment.get('torch'), environment.get('torch_pinned'))}",
    ]
    if record.get("budget"):
        lines.append(f"- {budget_line(record['budget'])}")
    lines += [
        "",
        "## Steps",
        "",
        "| step | proves | status | why / note | seconds (budget) | results |",
        "|---|---|---|---|---|---|",
    ]
    for step in record["steps"]:
        files = ", ".join(f"[{Path(f).name}]({f})" for f in step["files"] if not f.endswith(".log"))
        lines.append(
            f"| {step['name']} | {step['proves']} | {step['status']} | {step['reason'].replace('|', '/')} | "
            f"{step['seconds']:.0f} ({step['budget_s']:.0f}) | {files or '-'} |"
        )
    lines += [
        "",
        "## Figures against the targets (docs/performance.md)",
        "",
        "| figure | measured | target | verdict |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in figures(out, smoke)]
    run = _load(out / "triton", "triton_*_run.json") or {}
    lines += [
        "",
        "## Notes",
        "",
        "- Random weights of CSM-1B's shape: speed does not depend on the weights' values, but the audio is "
        "noise and never ends by itself, so every request generates its whole MAX_AUDIO_SECONDS.",
        "- The Triton figures come one concurrency level at a time, each after an unrecorded warm-up pass at "
        "that level (CUDA graphs captured, both stored voices' prefixes cached); the repository was built "
        "while the GPU tests and the engine benchmark ran.",
    ]
    if run.get("startup_seconds") is not None:
        levels = "; ".join(
            f"c={level['concurrency']}: warm-up {level['warmup_seconds']} s, measured "
            f"{level['bench_seconds']} s ({level['requests_per_client']} per client)"
            for level in run.get("levels", [])
        )
        lines.append(
            f"- tritonserver was ready in {run['startup_seconds']:.0f} s ({len(run.get('models', []))} models); "
            f"{levels or 'no level finished'}."
        )
    if run.get("adjustments"):
        lines.append(f"- Served with: {'; '.join(run['adjustments'])} (Perth: {run.get('perth')}).")
    if run.get("engine_log"):
        lines.append(f"- csm_lm: {' / '.join(run['engine_log'][:3])}")
    return "\n".join(lines) + "\n"
