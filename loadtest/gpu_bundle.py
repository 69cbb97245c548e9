"""What the bare GPU machine lacks, packed here to travel with one device run, and
unpacked there into a virtualenv that still sees the machine's own torch.

    python -m loadtest.gpu_bundle --out build/gpu-bundle [--dry-run]     # here: make gpu-bundle
    python3 -m loadtest.gpu_check --bundle build/gpu-bundle ...          # there: installs it first

The GPU machine has Python 3.12 with torch (CUDA), numpy 2, onnx, onnxruntime,
safetensors, huggingface_hub and accelerate, no registry, and at most 64 MiB of files
arrive with a run. The bundle (at most LIMIT_BYTES) holds:

- `tritonserver.tar.xz`: from the nvidia-pytriton wheel, only what serving loads: the
  tritonserver binary, the python backend, its Python 3.12 stub, the local cache and
  the shared libraries (less the 3.13 stub's libpython), laid out as in site-packages so
  that `csm_triton.serving.install` finds it unchanged;
- `site-packages.tar.xz`: the Python packages the machine lacks, installed here for
  CPython 3.12 manylinux x86_64 and trimmed (numpy's tests, transformers' other models).
  An xz tar of installed trees is half the size of the same wheels: numpy < 2 (the
  stub's ABI) alone is an 18 MB wheel and 8 MB here;
- `manifest.json`: every file with its size and sha256, every package and version,
  what is assumed on the machine and what is left out, and why.

Versions are the project's pins (pyproject.toml) and, for the unpinned dependencies,
the versions installed in this checkout's venv: the set the tests ran against.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 50 * 2**20  # 64 MiB travel per run; the checkout itself takes ~1.5 MiB of the rest
TARGET_PYTHON = "3.12"
# The nvidia-pytriton wheel is manylinux_2_35 and ran on that machine, so any older
# manylinux tag runs there too.
PLATFORMS = tuple(f"manylinux_2_{minor}_x86_64" for minor in range(17, 36)) + ("manylinux2014_x86_64",)
SITE_ARCHIVE = "site-packages.tar.xz"
TRITON_ARCHIVE = "tritonserver.tar.xz"
MANIFEST = "manifest.json"
DEFAULT_CACHE = ROOT / "build" / "gpu-bundle-cache"

# Pinned in pyproject.toml: the version comes from there.
PINNED = (
    "numpy",  # < 2: the stub is built against numpy 1.x (docs/triton-embedded.md)
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface_hub",  # CSM's model code; transformers
    # checks safetensors/hub/tokenizers versions at import, so the machine's own may not do
    "protobuf",
    "tritonclient",  # model configs (export), the bench's gRPC stubs, Triton's ORT shim
    "soxr",  # reference resampling in csm_prepare / voice_register
    "onnxscript",  # torch.onnx.export(dynamo=True) of Mimi
    "rich",
    "PyYAML",
    "tqdm",  # export's console, hub's and transformers' imports
    "pytest",  # the engine's GPU tests
)
# Unpinned dependencies of the above, at this venv's versions.
FROM_THIS_VENV = (
    "regex",
    "packaging",
    "filelock",
    "fsspec",
    "typing_extensions",  # transformers / hub
    "httpx2",
    "httpcore2",
    "h11",
    "anyio",
    "idna",
    "truststore",
    "certifi",  # hub's HTTP client (imported)
    "click",
    "typer",
    "shellingham",
    "annotated_doc",  # hub / transformers CLIs (imported at load)
    "markdown_it_py",
    "mdurl",
    "pygments",  # rich
    "grpcio",
    "python-rapidjson",
    "ml_dtypes",  # tritonclient.grpc / tritonclient.utils
    "gevent",
    "geventhttpclient",
    "greenlet",
    "zope.event",
    "zope.interface",
    "brotli",
    "urllib3",  # tritonclient.http
    "onnx_ir",  # onnxscript
    "pluggy",
    "iniconfig",  # pytest
)
ASSUMED_ON_MACHINE = {
    "torch": "the machine's own CUDA build (2.11 + CUDA 13 when last seen); never carried",
    "onnx": "there; onnxscript and the Mimi export use it",
    "onnxruntime": "there; runs Mimi (the CUDA provider only if its build has one)",
    "sympy, networkx, jinja2, mpmath": "torch's own dependencies",
    "accelerate": "there; transformers checks its version when present (>= 1.1)",
}
LEFT_OUT = {
    "resemble-perth, librosa, scipy, numba, llvmlite": (
        "the Perth watermark: 37 MB of weights plus ~120 MB of libraries, past the limit; the GPU run "
        "serves with the watermark off (`enabled: false`) unless the machine can load Perth itself"
    ),
    "matplotlib": "only the benchmark's PNG plots; the JSON and markdown results are written without it",
    "hf_xet": "huggingface_hub imports it only to download from the hub, which nothing here does",
}
# transformers ships ~550 model folders (50 MB); CSM needs its own, Mimi (its codec),
# Encodec's feature extractor (CsmProcessor), Llama (rope helpers) and the auto classes.
TRANSFORMERS_MODELS_KEPT = ("auto", "csm", "encodec", "llama", "mimi")


# --- what travels ------------------------------------------------------------------------
def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def project_pins(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    data = tomllib.loads(pyproject.read_text())
    requirements = list(data["project"]["dependencies"])
    for extra in data["project"].get("optional-dependencies", {}).values():
        requirements += extra
    pins = {}
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        if version:
            pins[_canonical(name.split("[")[0])] = version.strip()
    return pins


def packages() -> dict[str, str]:
    """name -> version of every package that travels."""
    pins = project_pins()
    chosen = {}
    for name in PINNED:
        if _canonical(name) not in pins:
            raise SystemExit(f"{name} is not pinned with == in pyproject.toml")
        chosen[name] = pins[_canonical(name)]
    for name in FROM_THIS_VENV:
        try:
            chosen[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed in {sys.prefix}: run make setup") from None
    return chosen


def triton_files() -> tuple[Path, list[str], str]:
    """(site-packages of nvidia-pytriton, the files serving needs relative to it, its version)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("nvidia-pytriton is not installed here: run make setup")
    site = Path(next(iter(spec.submodule_search_locations))).parent
    server = "pytriton/tritonserver"
    files = [
        f"{server}/bin/tritonserver",
        f"{server}/backends/python/libtriton_python.so",
        f"{server}/backends/python/triton_python_backend_utils.py",
        f"{server}/python_backend_stubs/{TARGET_PYTHON}/triton_python_backend_stub",
    ]
    files += sorted(p.relative_to(site).as_posix() for p in (site / server / "caches").rglob("*") if p.is_file())
    # Every vendored library is in the binaries' closure (ldd) except the libpython that
    # the 3.13 stub links; the 3.12 stub loads the machine's own libpython3.12.
    files += sorted(
        p.relative_to(site).as_posix()
        for p in (site / "nvidia_pytriton.libs").iterdir()
        if not p.name.startswith("libpython")
    )
    missing = [f for f in files if not (site / f).is_file()]
    if missing:
        raise SystemExit(f"nvidia-pytriton is incomplete here, missing {missing}")
    return site, files, importlib.metadata.version("nvidia-pytriton")


def listing() -> dict:
    """What a bundle holds, without building it (--dry-run)."""
    site, files, version = triton_files()
    return {
        "python": TARGET_PYTHON,
        "platforms": list(PLATFORMS),
        "limit_bytes": LIMIT_BYTES,
        "packages": packages(),
        "nvidia_pytriton": version,
        "triton_files": {f: (site / f).stat().st_size for f in files},
        "transformers_models_kept": list(TRANSFORMERS_MODELS_KEPT),
        "assumed_on_machine": ASSUMED_ON_MACHINE,
        "left_out": LEFT_OUT,
    }


# --- building it here --------------------------------------------------------------------
def _pip(*arguments: str) -> None:
    command = [sys.executable, "-m", "pip", *arguments, "--disable-pip-version-check", "-q"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stdout}{result.stderr}")


def _target_flags() -> list[str]:
    flags = ["--only-binary=:all:", "--python-version", TARGET_PYTHON, "--implementation", "cp"]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def install_packages(wanted: dict[str, str], target: Path, cache: Path) -> None:
    """Downloads the wheels for CPython 3.12 (once: the cache is reused) and installs
    them, without dependencies (the list is complete), into `target`."""
    requirements = [f"{name}=={version}" for name, version in wanted.items()]
    cache.mkdir(parents=True, exist_ok=True)
    _pip("download", "--no-deps", *_target_flags(), "-d", str(cache), *requirements)
    _pip(
        "install",
        "--no-deps",
        "--no-compile",
        "--no-index",
        "--find-links",
        str(cache),
        *_target_flags(),
        "--target",
        str(target),
        *requirements,
    )


def trim(site: Path) -> list[str]:
    """Removes what nothing here imports; returns what was removed (for the manifest)."""
    removed = []
    for path in sorted(site.glob("numpy/**/tests")):
        shutil.rmtree(path)
        removed.append(path.relative_to(site).as_posix())
    for path in sorted((site / "transformers" / "models").iterdir()):
        if path.is_dir() and path.name not in TRANSFORMERS_MODELS_KEPT and path.name != "__pycache__":
            shutil.rmtree(path)
    removed.append(f"transformers/models/* except {', '.join(TRANSFORMERS_MODELS_KEPT)}")
    for path in (site / "bin", *site.rglob("__pycache__")):
        if path.exists():
            shutil.rmtree(path)  # console scripts name this machine's python; caches are rebuilt
    removed.append("bin/ (console scripts), __pycache__/")
    strip = shutil.which("strip")
    if strip:
        # Several wheels ship their extensions with DWARF debug info (ml_dtypes 25 MB -> 2 MB,
        # rapidjson 7 -> 1, brotli 5 -> 1): 6 MB of the compressed bundle. Debug sections are
        # never loaded, so removing them changes nothing that runs.
        for path in sorted(site.rglob("*.so*")):
            if path.is_file() and not path.is_symlink():
                subprocess.run([strip, "--strip-debug", str(path)], check=True)
        removed.append("debug sections of every shared library (strip --strip-debug)")
    return removed


def write_archive(source: Path, members: list[str], archive: Path) -> None:
    """An xz tar of `members` (paths relative to `source`), by xz itself when it is
    installed (several times faster than Python's lzma at the same ratio)."""
    temporary = archive.with_name(archive.name + ".part")
    xz = shutil.which("xz")
    with open(temporary, "wb") as out:
        if xz:
            process = subprocess.Popen([xz, "-9", "-T0", "-c"], stdin=subprocess.PIPE, stdout=out)
            with tarfile.open(fileobj=process.stdin, mode="w|") as tar:
                for member in members:
                    tar.add(source / member, arcname=member, recursive=False)
            process.stdin.close()
            if process.wait() != 0:
                raise SystemExit(f"xz failed writing {archive}")
        else:
            with tarfile.open(fileobj=out, mode="w:xz", preset=9) as tar:
                for member in members:
                    tar.add(source / member, arcname=member, recursive=False)
    temporary.replace(archive)


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())


def sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def build(out: Path, cache: Path = DEFAULT_CACHE) -> dict:
    started = time.monotonic()
    manifest = listing()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as scratch:
        site = Path(scratch) / "site-packages"
        install_packages(manifest["packages"], site, cache / "wheels")
        manifest["trimmed"] = trim(site)
        write_archive(site, _tree(site), out / SITE_ARCHIVE)
        manifest["site_packages_unpacked_bytes"] = sum((site / f).stat().st_size for f in _tree(site))
    triton_site, files, version = triton_files()
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-triton-") as scratch:
        # A one-file dist-info: install.locate_pytriton asks importlib.metadata for the version.
        staging = Path(scratch)
        info = staging / f"nvidia_pytriton-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: nvidia-pytriton\nVersion: {version}\n")
        (info / "INSTALLER").write_text("csm-triton gpu bundle (loadtest/gpu_bundle.py)\n")
        for name in files:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(triton_site / name, staging / name)
        write_archive(staging, _tree(staging), out / TRITON_ARCHIVE)
    manifest["files"] = {
        name: {"bytes": (out / name).stat().st_size, "sha256": sha256_of(out / name)}
        for name in (SITE_ARCHIVE, TRITON_ARCHIVE)
    }
    manifest["total_bytes"] = sum(entry["bytes"] for entry in manifest["files"].values())
    manifest["built"] = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - started),
        "command": "python -m loadtest.gpu_bundle " + " ".join(sys.argv[1:]),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if manifest["total_bytes"] > LIMIT_BYTES:
        raise SystemExit(f"bundle is {manifest['total_bytes'] / 2**20:.1f} MiB, over {LIMIT_BYTES / 2**20:.0f} MiB")
    return manifest


# --- installing it there -----------------------------------------------------------------
def env_python(env: Path) -> Path:
    return env / "bin" / "python"


def install(bundle: Path, env: Path) -> dict:
    """A virtualenv at `env` that sees this interpreter's packages (its torch) with the
    bundle's packages in front of them (numpy < 2 first of all), the embedded
    tritonserver in its site-packages, and this checkout on its path. Reused as it is
    when it was made from the same bundle."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if running != manifest["python"]:
        raise SystemExit(f"the bundle is for Python {manifest['python']}, this is {running} ({sys.executable})")
    stamp = env / ".bundle-sha256"
    fingerprint = sha256_of(bundle / MANIFEST)
    if env_python(env).exists() and stamp.is_file() and stamp.read_text() == fingerprint:
        return {"env": str(env), "reused": True}
    for name, entry in manifest["files"].items():
        size = (bundle / name).stat().st_size
        if size != entry["bytes"]:
            raise SystemExit(f"{bundle / name} is {size} bytes, the manifest says {entry['bytes']}: copied in part?")
    shutil.rmtree(env, ignore_errors=True)
    # --without-pip: nothing is installed with pip there, and Debian's python lacks ensurepip.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env)], check=True)
    site = env / "lib" / f"python{running}" / "site-packages"
    for name in (SITE_ARCHIVE, TRITON_ARCHIVE):
        with tarfile.open(bundle / name, "r:xz") as tar:
            tar.extractall(site, filter="tar")  # "tar" keeps the binaries' exec bits
    # Files in site-packages are read in name order; the venv's own packages stay first on sys.path.
    (site / "_csm_checkout.pth").write_text("\n".join(str(ROOT / p) for p in ("src", "clients", "servers", ".")) + "\n")
    if sys.prefix != sys.base_prefix:
        # This python is itself a venv: --system-site-packages would reach only its base
        # interpreter, not the packages (torch) installed here. addsitedir also reads their .pth files.
        host = [p for p in _site_dirs() if Path(p).is_dir()]
        (site / "_csm_host_site.pth").write_text(f"import site; list(map(site.addsitedir, {host!r}))\n")
    stamp.write_text(fingerprint)
    return {"env": str(env), "reused": False, "site_packages": str(site)}


def _site_dirs() -> list[str]:
    import site

    return site.getsitepackages() + [site.getusersitepackages()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-bundle", help="the bundle's folder")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="downloaded wheels, kept between builds")
    parser.add_argument("--dry-run", action="store_true", help="print what would travel (JSON); download nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        print(json.dumps(listing(), indent=2))
        return 0
    manifest = build(args.out, args.cache)
    sizes = ", ".join(f"{name} {entry['bytes'] / 2**20:.1f} MiB" for name, entry in manifest["files"].items())
    print(f"{args.out}: {manifest['total_bytes'] / 2**20:.1f} MiB of {LIMIT_BYTES / 2**20:.0f} ({sizes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
