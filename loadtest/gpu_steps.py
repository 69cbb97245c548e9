"""The steps of `loadtest.gpu_check` that are not another tool's command line, each run
by gpu_check as its own process (its own time budget, its own log):

    python -m loadtest.gpu_steps environment --out DIR
    python -m loadtest.gpu_steps repository --model full|tiny --profile h100|cpu --work DIR --out REPOSITORY
    python -m loadtest.gpu_steps triton --repository REPOSITORY --out DIR [--concurrency 1,8,32,64]

`environment` records the device, driver, torch and CUDA, the torch pinned in
pyproject.toml, and which provider ONNX Runtime really runs a KIND_GPU session on (a
one-convolution probe made as the Triton backend makes Mimi's). `repository` makes a
random checkpoint of CSM-1B's full shape (or the tiny one) without any download and
builds a model repository from it with `export.build_repository`. `triton` serves a copy
of that repository with the embedded tritonserver and runs `loadtest.bench` against it
one concurrency level at a time, each a warm-up pass (CUDA graphs captured, stored
voices' prefixes cached) then the measured one, rewriting the merged results after
every level: a level that runs out of time leaves the earlier ones on disk. It also
records which provider Mimi's decoder ran on (a probe of the served model, and the
server log's warnings): Triton figures with Mimi on the CPU measure the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "torch",
    "numpy",
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxscript",
    "tritonclient",
    "grpcio",
    "protobuf",
    "nvidia-pytriton",
)
COMPLETE = ".complete"  # written last into a generated checkpoint: a killed build is redone


def device_tag() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --- environment --------------------------------------------------------------------------
def _run(command: list[str]) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def perth_status() -> str:
    """ "ok" when Perth (the watermark) loads in this environment, else why not."""
    try:
        from csm_triton.core.watermark import load_perth

        load_perth("cpu")
        return "ok"
    except Exception as error:  # noqa: BLE001 - any reason is the answer
        return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def environment(out: Path) -> dict:
    import torch

    from loadtest import workload

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            devices.append(
                {
                    "name": properties.name,
                    "capability": f"{properties.major}.{properties.minor}",
                    "memory_gib": round(properties.total_memory / 2**30, 1),
                }
            )
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    except ImportError:
        providers = None
    smi = shutil.which("nvidia-smi")
    probe = onnxruntime_probe("cuda:0" if torch.cuda.is_available() else "cpu")
    report = {
        "device_tag": device_tag(),
        "devices": devices,
        "driver": _run([smi, "--query-gpu=driver_version", "--format=csv,noheader"]) if smi else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu": workload.machine(),
        "cores": os.cpu_count(),
        "packages": versions,
        "onnxruntime_providers": providers,
        "onnxruntime_probe": probe,
        "torch_pinned": pinned_version("torch"),
        "perth": perth_status(),
        "commit": workload.commit(),
    }
    out.mkdir(parents=True, exist_ok=True)
    if smi:
        (out / "nvidia-smi.txt").write_text(_run([smi]) or "")
    (out / f"gpu_check_{report['device_tag']}_environment.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


def pinned_version(package: str) -> str | None:
    """The version pyproject.toml pins `package` to (==), if any."""
    try:
        from loadtest.gpu_bundle import _canonical, project_pins

        return project_pins().get(_canonical(package))
    except (OSError, ValueError, KeyError, SystemExit):
        return None


# --- which provider ONNX Runtime really uses -------------------------------------------------
def _probe_model(folder: Path) -> tuple[Path, dict]:
    """A one-Conv ONNX model (Mimi is convolutions) and its Triton config as a mapping."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "provider_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 6])],
        [numpy_helper.from_array(np.ones((1, 1, 3), np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # loadable by older onnxruntime builds too
    path = folder / "provider_probe.onnx"
    onnx.save(model, path)
    config = {
        "name": "provider_probe",
        "max_batch_size": 0,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1, 1, 8]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1, 1, 6]}],
        "instance_group": [{"count": 1, "kind": "KIND_GPU"}],
    }
    return path, config


def _config_mapping(config_path: Path) -> dict:
    """A config.pbtxt as the mapping Triton hands a Python model (its JSON form)."""
    from google.protobuf import json_format

    from export.model_config import read_config

    return json_format.MessageToDict(read_config(config_path), preserving_proto_field_name=True)


def onnxruntime_probe(device: str, model_dir: Path | None = None) -> dict:
    """The providers ONNX Runtime really runs a session on, made by the Triton backend's
    own OnnxSession (same provider options) and run once: onnxruntime falls back to the
    CPU by itself when its CUDA provider is missing or cannot load its libraries. With
    `model_dir` (a served model: its config and version 1) that model, else a one-Conv
    model; `device` is cuda:N or cpu (a KIND_CPU model is probed on the CPU)."""
    import tempfile

    import numpy as np

    report: dict = {"device": device, "model": model_dir.name if model_dir else "provider_probe"}
    try:
        import onnxruntime as ort
    except ImportError as error:
        return {**report, "available": None, "in_use": None, "provider": "none", "error": str(error)}
    report["onnxruntime"] = ort.__version__
    report["available"] = ort.get_available_providers()
    try:
        from csm_triton.serving.onnxruntime.session import OnnxSession, model_file

        with tempfile.TemporaryDirectory() as folder:
            if model_dir is None:
                path, config = _probe_model(Path(folder))
            else:
                config = _config_mapping(model_dir / "config.pbtxt")
                path = model_file(model_dir, 1, config)
                kinds = {group.get("kind", "KIND_GPU") for group in config.get("instance_group", [{}])}
                device = device if "KIND_GPU" in kinds else "cpu"
                report["device"] = device
            session = OnnxSession(path, config, device=device)
            if model_dir is None:
                session.run({"x": np.ones((1, 1, 8), np.float32)})
            report["in_use"] = session.providers
            report["provider_options"] = {
                name: {
                    key: value
                    for key, value in options.items()
                    if key in ("device_id", "cudnn_conv_algo_search", "arena_extend_strategy")
                }
                for name, options in session.session.get_provider_options().items()
                if name != "CPUExecutionProvider"
            }
    except Exception as error:  # noqa: BLE001 - the reason is the answer
        report.update(in_use=None, error=f"{type(error).__name__}: {error}".splitlines()[0][:300])
    report["provider"] = (report.get("in_use") or ["unknown"])[0]
    return report


CPU_FALLBACK = re.compile(r"no CUDA provider|runs it on the CPU")


def mimi_provider(probe: dict, log_lines: list[str]) -> str:
    """The provider Mimi's decoder ran on: CPUExecutionProvider when any mimi instance
    logged a fall back to the CPU, else the probe's."""
    if any("mimi" in line and CPU_FALLBACK.search(line) for line in log_lines):
        return "CPUExecutionProvider"
    return probe.get("provider") or "unknown"


# --- a random checkpoint and its repository ------------------------------------------------
def full_size_config(tokenizer):
    """CSM-1B's shape (CsmConfig's defaults: backbone 2048 x 16 layers, depth decoder
    1024 x 4, Mimi at full size) with the real model's rope scaling, and the token ids
    of the tiny checkpoint's tokenizer (its ids fit the real text vocabulary)."""
    from transformers import CsmConfig, CsmDepthDecoderConfig

    from csm_triton import constants as C
    from export import tiny_checkpoint as tiny

    audio_id = tokenizer.convert_tokens_to_ids(C.AUDIO_TOKEN)
    return CsmConfig(
        rope_parameters=tiny.BACKBONE_ROPE,
        depth_decoder_config=CsmDepthDecoderConfig(rope_parameters=tiny.DEPTH_DECODER_ROPE),
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=audio_id,
        audio_token_id=audio_id,
        audio_eos_token_id=tokenizer.convert_tokens_to_ids(C.AUDIO_EOS_TOKEN),
        codebook_eos_token_id=C.END_OF_SPEECH_CODE,
        codebook_pad_token_id=C.AUDIO_PAD_CODE,
    )


def random_language_model(config, *, device="cpu", seed: int = 0):
    """CsmForConditionalGeneration with random weights, built fast: no per-module init,
    one normal fill per tensor (norms at 1), on `device` directly; no codec."""
    import torch
    from transformers import CsmForConditionalGeneration
    from transformers.initialization import no_init_weights

    torch.manual_seed(seed)
    with no_init_weights(), torch.device(device):
        model = CsmForConditionalGeneration(config)
    model.codec_model = None
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.fill_(1.0) if "norm" in name else parameter.normal_(0.0, 0.02)
    return model.eval()


def build_full_size_checkpoint(out: Path, seed: int = 0) -> Path:
    """A random CSM-1B-shaped checkpoint in the Hugging Face layout, like
    export.tiny_checkpoint's: the language model in bf16 (half the bytes to write and
    read; csm_lm loads it as float32 and runs it in bf16 on GPU anyway), Mimi in float32
    with its own init and random codebooks, the tiny tokenizer and processor."""
    import torch
    from transformers import CsmProcessor, EncodecFeatureExtractor, MimiModel

    from csm_triton import constants as C
    from export import tiny_checkpoint as tiny

    tokenizer = tiny.build_tokenizer()
    config = full_size_config(tokenizer)
    model = random_language_model(config, seed=seed)
    with torch.no_grad():
        model.to(torch.bfloat16)
        torch.manual_seed(seed)
        model.codec_model = MimiModel(config.codec_config).eval()
        tiny.randomize_codebooks(model, torch.Generator().manual_seed(seed))
        tiny.quiet_decoder(model)
    tiny.configure_generation(model)
    model.save_pretrained(out)
    CsmProcessor(
        feature_extractor=EncodecFeatureExtractor(feature_size=1, sampling_rate=C.SAMPLE_RATE, padding_value=0.0),
        tokenizer=tokenizer,
        chat_template=tiny.CHAT_TEMPLATE,
    ).save_pretrained(out)
    return out


def repository(model: str, profile: str, work: Path, out: Path, checkpoint: Path | None) -> Path:
    from export.build_repository import build_repository
    from export.tiny_checkpoint import build_tiny_checkpoint

    if checkpoint is None:
        checkpoint = work / f"{model}-random-csm"
        if not (checkpoint / COMPLETE).is_file():
            shutil.rmtree(checkpoint, ignore_errors=True)
            started = time.monotonic()
            (build_full_size_checkpoint if model == "full" else build_tiny_checkpoint)(checkpoint)
            (checkpoint / COMPLETE).write_text("")
            print(f"built a random {model} checkpoint in {time.monotonic() - started:.0f} s: {checkpoint}")
    return build_repository(str(checkpoint), profile, out)


# --- Triton end to end ---------------------------------------------------------------------
def served_copy(built: Path, served: Path, watermark: bool, max_slots: int | None = None) -> list[str]:
    """A copy of the built repository to serve (big files hard-linked), adjusted for
    this machine; returns the adjustments. Without Perth the watermark passes audio
    through (its `enabled` parameter) and watermark_detect, which always loads Perth, is
    left out. max_slots overrides csm_lm's (fewer slots, fewer CUDA graphs at load)."""
    shutil.rmtree(served, ignore_errors=True)
    shutil.copytree(built, served, copy_function=_link_or_copy)
    adjustments = []
    if max_slots is not None:
        _set_parameter(served / "csm_lm" / "config.pbtxt", "max_slots", str(max_slots))
        adjustments.append(f"csm_lm: max_slots {max_slots}")
    if not watermark:
        _set_parameter(served / "watermark" / "config.pbtxt", "enabled", "false")
        shutil.rmtree(served / "watermark_detect", ignore_errors=True)
        adjustments += ["watermark: enabled false (audio passes through unmarked)", "watermark_detect: not served"]
    return adjustments


def _set_parameter(config_path: Path, key: str, value: str) -> None:
    from google.protobuf import text_format

    from export.model_config import read_config

    config = read_config(config_path)
    config.parameters[key].string_value = value
    config_path.unlink()  # a hard link: never write through it into the built repository
    config_path.write_text(text_format.MessageToString(config))


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _bench_without_plots():
    """loadtest.bench with its PNG plots switched off (each level is its own bench run;
    the merged report is plotted once at the end, when matplotlib is installed: the GPU
    bundle leaves it out), and the real plot function."""
    from loadtest import bench

    plot = getattr(bench, "_gpu_check_plot", bench.plot)
    bench._gpu_check_plot = plot
    bench.plot = lambda report, out, stem: []
    return bench, plot


def requests_for(concurrency: int, min_requests: int) -> int:
    """Requests per client at a level: at least `min_requests` in all (c=1's TTFA p50
    from one request would be one sample), never fewer than one per client."""
    return max(1, math.ceil(min_requests / concurrency))


def merge_levels(bench, levels_dir: Path, out: Path) -> Path | None:
    """One bench report of every level measured so far (each level wrote its own into
    levels_dir/c<N>/), written into `out` under bench's own name."""
    reports = []
    for path in levels_dir.glob("c*/bench_stream_*.json"):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not reports:
        return None
    reports.sort(key=lambda report: report["levels"][0]["concurrency"])
    merged = {
        **reports[0],
        "levels": [level for report in reports for level in report["levels"]],
        "requests_per_client": {str(r["levels"][0]["concurrency"]): r["requests_per_client"] for r in reports},
    }
    stem = f"bench_stream_{merged['model']}_{merged['device_tag']}"
    from loadtest import common

    common.write_report(out, stem, merged, bench.markdown(merged, stem))
    return out / f"{stem}.json"


def triton(args) -> int:
    from csm_triton.serving.process import TritonServer
    from loadtest import workload

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    run_json = out / f"triton_{device_tag()}_run.json"
    levels_dir = args.work / f"bench-levels-{args.repository.name}"  # per-level raw reports, not results
    shutil.rmtree(levels_dir, ignore_errors=True)
    for stale in out.glob("bench_stream_*"):
        stale.unlink()
    perth = perth_status() if args.watermark == "auto" else args.watermark
    served = args.work / f"served-{args.repository.name}"
    adjustments = served_copy(args.repository, served, watermark=perth in ("ok", "on"), max_slots=args.max_slots)
    token = secrets.token_hex(16)
    os.environ[workload.ADMIN_TOKEN_ENV] = token  # the bench registers its stored voices with it
    models = sorted(p.name for p in served.iterdir() if (p / "config.pbtxt").is_file())
    concurrency = [int(c) for c in args.concurrency.split(",")]
    record = {
        "repository": str(args.repository),
        "perth": perth,
        "adjustments": adjustments,
        "models": models,
        "concurrency": concurrency,
        "levels": [],
    }

    def save() -> None:
        run_json.write_text(json.dumps(record, indent=2) + "\n")

    bench, plot = _bench_without_plots()
    # Which provider Mimi's decoder gets, probed on the served model while the server starts.
    probe: dict = {}
    prober = threading.Thread(
        target=lambda: probe.update(onnxruntime_probe("cuda:0", served / "mimi_decoder")),
        name="mimi-provider-probe",
        daemon=True,
    )
    prober.start()
    server = TritonServer(
        served,
        load_models=models,
        ready_models=models,
        startup_timeout=args.startup_timeout,
        environment={workload.ADMIN_TOKEN_ENV: token},
        log_path=out / "tritonserver.log",
    )
    code = 1
    try:
        with fail_fast_on_load_errors(server):
            server.start()
        record["startup_seconds"] = round(server.start_seconds, 1)
        print(f"tritonserver ready in {server.start_seconds:.0f} s ({len(models)} models)", file=sys.stderr)
        prober.join(timeout=60)
        record["mimi_probe"], record["mimi_provider"] = dict(probe), mimi_provider(probe, [])
        print(f"mimi_decoder runs on {record['mimi_provider']}", file=sys.stderr)
        save()
        common = [
            "--http",
            server.http_url,
            "--grpc",
            server.grpc_url,
            "--model",
            args.model_label,
            "--max-audio-seconds",
            str(args.max_audio_seconds),
        ]
        codes = []
        for index, level in enumerate(concurrency):
            # Warm-up at this level, results discarded, so that the measured pass finds
            # its CUDA graphs captured and both stored voices' prefixes cached.
            started = time.monotonic()
            warmup = bench.main(
                common
                + ["--concurrency", str(level), "--requests-per-client", "1", "--warmup", "2" if index == 0 else "0"]
            )
            warmup_seconds = time.monotonic() - started
            started = time.monotonic()
            per_client = requests_for(level, args.min_requests)
            measured = bench.main(
                common
                + [
                    "--concurrency",
                    str(level),
                    "--requests-per-client",
                    str(per_client),
                    "--warmup",
                    "0",
                    "--out",
                    str(levels_dir / f"c{level}"),
                ]
            )
            codes.append(measured)
            record["levels"].append(
                {
                    "concurrency": level,
                    "requests_per_client": per_client,
                    "warmup_exit_code": warmup,
                    "warmup_seconds": round(warmup_seconds, 1),
                    "bench_exit_code": measured,
                    "bench_seconds": round(time.monotonic() - started, 1),
                }
            )
            merge_levels(bench, levels_dir, out)
            save()
        code = 0 if all(c == 0 for c in codes) else 1
        merged = sorted(out.glob("bench_stream_*.json"))
        if merged:
            try:
                import matplotlib  # noqa: F401

                plot(json.loads(merged[0].read_text()), out, merged[0].stem)
            except ImportError:
                print("matplotlib is not installed: no PNG plots", file=sys.stderr)
    finally:
        server.stop()
        log = _log_lines(out / "tritonserver.log")
        record["engine_log"] = [
            line
            for line in log
            if re.search(
                r"KV slots|CUDA graph|captured|no CUDA provider|"
                r"runs it on the CPU",
                line,
            )
        ][:20]
        prober.join(timeout=1)
        record["mimi_probe"] = dict(probe)
        record["mimi_provider"] = mimi_provider(probe, log)
        save()
    return code


@contextlib.contextmanager
def fail_fast_on_load_errors(server):
    """While `server` starts: a model that fails to load leaves tritonserver running (in
    explicit mode) and start() waiting for its readiness until the timeout, minutes of
    the run's budget. End the server as soon as its log says so; start() then fails at
    once with the log's tail."""
    log = Path(server.log_path)
    offset = log.stat().st_size if log.exists() else 0  # earlier runs' lines are not this start's
    done = threading.Event()

    def watch() -> None:
        while not done.wait(1.0):
            try:
                with open(log, "rb") as handle:
                    handle.seek(offset)
                    failed = b"load failed for model" in handle.read()
            except OSError:
                continue
            if failed and server.process is not None:
                print("a model failed to load: stopping tritonserver", file=sys.stderr)
                server.process.terminate()
                return

    watcher = threading.Thread(target=watch, name="load-error-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def _log_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def main(argv=None) -> int:
    # gpu_check ends a step that runs out of time with SIGTERM: exit through the finally
    # blocks, so that a tritonserver started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("environment")
    env.add_argument("--out", type=Path, required=True)
    repo = commands.add_parser("repository")
    repo.add_argument("--model", choices=["full", "tiny"], required=True)
    repo.add_argument("--profile", required=True)
    repo.add_argument("--work", type=Path, required=True, help="where the random checkpoint is made (and kept)")
    repo.add_argument("--checkpoint", type=Path, help="an existing checkpoint instead of a random one")
    repo.add_argument("--out", type=Path, required=True)
    serve = commands.add_parser("triton")
    serve.add_argument("--repository", type=Path, required=True)
    serve.add_argument("--work", type=Path, required=True, help="where the served copy is made")
    serve.add_argument("--out", type=Path, required=True)
    serve.add_argument("--model-label", default="full-random")
    serve.add_argument("--concurrency", default="1,8,32,64")
    serve.add_argument(
        "--min-requests", type=int, default=8, help="requests per level at least (one per client at least)"
    )
    serve.add_argument("--max-audio-seconds", type=float, default=4.0)
    serve.add_argument("--startup-timeout", type=float, default=300.0)
    serve.add_argument("--max-slots", type=int, help="csm_lm's max_slots instead of the profile's")
    serve.add_argument(
        "--watermark", choices=["auto", "on", "off"], default="auto", help="auto: on when Perth loads here"
    )
    args = parser.parse_args(argv)
    if args.command == "environment":
        environment(args.out)
        return 0
    if args.command == "repository":
        repository(args.model, args.profile, args.work, args.out, args.checkpoint)
        return 0
    return triton(args)


if __name__ == "__main__":
    sys.exit(main())
