"""Build a deployable Triton model repository from a CSM-1B checkpoint.

    python -m export.build_repository --checkpoint DIR_OR_HUB_ID --profile cpu|a100|h100 --out DIR

Steps: validate the checkpoint; copy the committed `model_repository/` with every
config rendered for the profile; export Mimi's encoder and decoder to ONNX and
check them against torch (the build fails unless they agree); give csm_prepare
the checkpoint's tokenizer; write `manifest.json` (source, versions, hashes,
parity figures). The repository is assembled in a temporary folder next to
`--out` and moved into place at the end, so a failed build never leaves a
half-written repository behind.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from csm_triton import constants as C
from csm_triton.core.prompt import TOKENIZER_FILES
from export.checkpoint import CheckpointError, resolve_checkpoint
from export.model_config import PROFILES, render_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent
COMMITTED_REPOSITORY = PROJECT_ROOT / "model_repository"
MANIFEST = "manifest.json"
RECORDED_PACKAGES = (
    "torch",
    "transformers",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "numpy",
    "tritonclient",
    "nvidia-pytriton",
)

console = Console(stderr=True)


def sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def source_fingerprint(checkpoint: Path, profile: str) -> str:
    """Changes whenever the output would: checkpoint files, committed repository,
    exporter code, profile or package versions."""
    digest = hashlib.sha256(profile.encode())
    for path in sorted(checkpoint.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for root in (COMMITTED_REPOSITORY, PROJECT_ROOT / "export", PROJECT_ROOT / "src" / "csm_triton"):
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(path.relative_to(PROJECT_ROOT).as_posix().encode() + path.read_bytes())
    for package in RECORDED_PACKAGES:
        digest.update(f"{package}={_version(package)}".encode())
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_current(out: Path, fingerprint: str) -> bool:
    manifest = out / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("source_fingerprint") == fingerprint
    except json.JSONDecodeError:
        return False


def copy_committed_models(staging: Path, profile: str) -> list[str]:
    models = []
    for model_dir in sorted(p for p in COMMITTED_REPOSITORY.iterdir() if (p / "config.pbtxt").is_file()):
        target = staging / model_dir.name
        shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        text = (model_dir / "config.pbtxt").read_text()
        (target / "config.pbtxt").write_text(render_config(text, profile, model_dir.name))
        (target / "1").mkdir(exist_ok=True)  # ensembles have an empty version folder
        models.append(model_dir.name)
    return models


def export_codec(checkpoint: Path, staging: Path) -> dict:
    # Imported here: torch and the exporter are heavy and only this step needs them.
    from export.mimi_onnx import check_mimi_parity, export_mimi

    encoder = staging / "mimi_encoder" / "1" / "model.onnx"
    decoder = staging / "mimi_decoder" / "1" / "model.onnx"
    encoder.parent.mkdir(parents=True, exist_ok=True)
    decoder.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    export_mimi(checkpoint, encoder, decoder)
    console.print(f"exported Mimi encoder and decoder in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    parity = check_mimi_parity(checkpoint, encoder, decoder)
    console.print(f"checked ONNX against torch in {time.perf_counter() - started:.1f} s")
    return parity


LM_FILES = ("config.json", "generation_config.json")


def _link_or_copy(source: Path, target: Path) -> None:
    # A hard link costs nothing for the 1B model's 6 GB of weights when the checkpoint
    # and the repository share a filesystem; otherwise copy.
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def copy_lm_weights(checkpoint: Path, staging: Path) -> None:
    """csm_lm loads CSM from its own folder, so the repository is self-contained
    (a container's volume holds everything; nothing is fetched at start)."""
    target = staging / "csm_lm" / "1" / "checkpoint"
    target.mkdir(parents=True, exist_ok=True)
    weights = sorted(checkpoint.glob("*.safetensors")) + sorted(checkpoint.glob("model.safetensors.index.json"))
    for source in [checkpoint / name for name in LM_FILES] + weights:
        _link_or_copy(source, target / source.name)


def copy_tokenizer(checkpoint: Path, staging: Path) -> None:
    target = staging / "csm_prepare" / "1" / "tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(checkpoint / name, target / name)


def write_manifest(
    staging: Path, *, source: str, checkpoint: Path, profile: str, models: list[str], parity: dict, fingerprint: str
) -> None:
    artifacts = {
        path.relative_to(staging).as_posix(): sha256_of(path)
        for path in sorted(staging.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    manifest = {
        "source": source,
        "checkpoint": str(checkpoint),
        "checkpoint_model": json.loads((checkpoint / "config.json").read_text()).get("_name_or_path"),
        "profile": profile,
        "models": models,
        "onnx_opset": C.ONNX_OPSET,
        "packages": {package: _version(package) for package in RECORDED_PACKAGES},
        "project_commit": _git_commit(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parity": parity,
        "artifacts_sha256": artifacts,
        "source_fingerprint": fingerprint,
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def build_repository(source: str, profile: str, out: Path, *, force: bool = False) -> Path:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    checkpoint = resolve_checkpoint(source)
    out = Path(out).resolve()
    fingerprint = source_fingerprint(checkpoint, profile)
    if not force and is_current(out, fingerprint):
        console.print(f"model repository {out} is up to date")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        models = copy_committed_models(staging, profile)
        parity = export_codec(checkpoint, staging)
        copy_tokenizer(checkpoint, staging)
        copy_lm_weights(checkpoint, staging)
        write_manifest(
            staging,
            source=source,
            checkpoint=checkpoint,
            profile=profile,
            models=models,
            parity=parity,
            fingerprint=fingerprint,
        )
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    console.print(f"model repository ready: {out} (profile {profile})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="local CSM-1B folder (HF layout) or hub id")
    parser.add_argument("--profile", default="a100", choices=sorted(PROFILES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--force", action="store_true", help="rebuild even when the output is current")
    args = parser.parse_args(argv)
    from export.mimi_onnx import ParityError

    try:
        build_repository(args.checkpoint, args.profile, args.out, force=args.force)
    except (CheckpointError, ParityError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
