"""The load tests' workload, shared by every tool in loadtest/: the texts, the reference
clips, how much audio each request asks for, the stored voices, KServe v2 JSON over
HTTP, and where a result was measured.

Standard library only: the locustfile imports it, and Locust may run in a bare Locust
image (mount the whole loadtest/ folder there, not the locustfile alone).
"""

from __future__ import annotations

import array
import json
import math
import os
import platform
import shlex
import struct
import subprocess
import sys
import urllib.error
import urllib.request
import wave
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
PROJECT_ROOT = HERE.parent

# Mirrors of csm_triton.constants (not imported here: this module must not need the
# project's packages). SAMPLES_PER_FRAME = SAMPLE_RATE / FRAME_RATE_HZ.
SAMPLE_RATE = 24_000
FRAME_RATE_HZ = 12.5
ADMIN_TOKEN_HEADER = "x-csm-admin-token"
ADMIN_TOKEN_ENV = "CSM_ADMIN_TOKEN"
# Mirrors of csm_clients.admin_token's lookup (admin_token_from_environment).
ADMIN_TOKEN_FILE_ENV = "CSM_ADMIN_TOKEN_FILE"
DEVELOPMENT_TOKEN_FILE = Path("build/runtime/admin-token")  # make serve's, in a checkout

VOICE_PREFIX = "loadtest-"
# MAX_AUDIO_SECONDS is sized from the text at this speaking rate: a real model stops at
# the end of speech anyway; the tiny random one never does and produces exactly this.
CHARACTERS_PER_SECOND = 14.0
MIN_AUDIO_SECONDS = 1.0
TIMEOUT_SECONDS = 300.0


# --- texts and reference clips -----------------------------------------------------------
def load_texts(path: Path | str = DATA / "texts.txt") -> list[str]:
    """One text per line; blank lines and lines starting with # are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    texts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not texts:
        raise ValueError(f"{path} holds no texts")
    return texts


def audio_seconds_for(text: str, cap: float) -> float:
    """The MAX_AUDIO_SECONDS a request for `text` asks for: about as long as it takes to
    say, at least MIN_AUDIO_SECONDS, at most `cap`."""
    return round(min(cap, max(MIN_AUDIO_SECONDS, len(text) / CHARACTERS_PER_SECOND)), 2)


def expected_samples(audio_seconds: float) -> int:
    """Samples of an utterance cut at `audio_seconds`, counted as the server counts:
    whole frames, ceil of the FP32 value it receives (1.36 s arrives as 1.3600000143,
    which is 17.0000002 frames, so 18)."""
    as_received = struct.unpack("<f", struct.pack("<f", audio_seconds))[0]
    return math.ceil(as_received * FRAME_RATE_HZ) * int(SAMPLE_RATE / FRAME_RATE_HZ)


@dataclass(frozen=True)
class Reference:
    """A voice reference: a clip, its sample rate and its transcript."""

    name: str
    samples: array.array  # float32 in [-1, 1]
    sample_rate: int
    transcript: str

    @property
    def voice_id(self) -> str:
        return VOICE_PREFIX + self.name.replace("_", "-")

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def read_wav(path: Path | str) -> tuple[array.array, int]:
    """A 16-bit mono WAV file as float32 samples and its rate."""
    with wave.open(str(path), "rb") as clip:
        if clip.getsampwidth() != 2 or clip.getnchannels() != 1:
            raise ValueError(f"{path}: expected 16-bit mono PCM")
        pcm = array.array("h", clip.readframes(clip.getnframes()))
        rate = clip.getframerate()
    if sys.byteorder == "big":
        pcm.byteswap()
    return array.array("f", (value / 32768.0 for value in pcm)), rate


def load_references(path: Path | str = DATA / "references.tsv") -> list[Reference]:
    """file<TAB>transcript per line (# comments skipped), files beside the list."""
    path = Path(path)
    references = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, transcript = line.split("\t", 1)
        samples, rate = read_wav(path.parent / name)
        references.append(Reference(Path(name).stem.removeprefix("reference_"), samples, rate, transcript.strip()))
    if not references:
        raise ValueError(f"{path} lists no reference clips")
    return references


# --- KServe v2 JSON ------------------------------------------------------------------------
def tensor(name: str, datatype: str, data: list, shape: list[int] | None = None) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


def reference_inputs(reference: Reference) -> list[dict]:
    # 5 significant digits: 16-bit audio needs no more, and the JSON stays ~3x smaller.
    samples = [float(f"{value:.5g}") for value in reference.samples]
    return [
        tensor("REFERENCE_AUDIO", "FP32", samples),
        tensor("REFERENCE_SAMPLE_RATE", "INT32", [reference.sample_rate]),
        tensor("REFERENCE_TEXT", "BYTES", [reference.transcript]),
    ]


def tts_inputs(text: str, audio_seconds: float, seed: int, voice_id: str | None = None) -> list[dict]:
    inputs = [
        tensor("TEXT", "BYTES", [text]),
        tensor("MAX_AUDIO_SECONDS", "FP32", [audio_seconds]),
        tensor("SEED", "INT64", [seed]),
    ]
    if voice_id is not None:
        inputs.append(tensor("VOICE_ID", "BYTES", [voice_id]))
    return inputs


# AUDIO comes back as raw float32 after the JSON header (the binary tensor extension):
# a float list in JSON would cost the load generator more CPU than the server spends.
AUDIO_AS_BINARY = [
    {"name": "AUDIO", "parameters": {"binary_data": True}},
    {"name": "SAMPLE_RATE", "parameters": {"binary_data": False}},
]


def audio_samples_in(body: bytes, header_length: str | None) -> int:
    """The AUDIO sample count of a csm_tts answer (binary or plain JSON)."""
    header = json.loads(body[: int(header_length)] if header_length else body)
    for output in header.get("outputs", []):
        if output["name"] == "AUDIO":
            return int(output["shape"][0])
    raise ValueError("the answer has no AUDIO output")


class _RedirectRefused(urllib.request.HTTPRedirectHandler):
    """urllib follows 301/302/303 (and 307/308 for GET) and carries every header the
    request had, the admin token too, to whatever host the Location names. A KServe v2
    server has no reason to redirect: a redirect is an error naming where it pointed."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        fp.close()
        raise TritonError(
            code,
            f"{req.full_url} redirects to {newurl!r}; not followed (the request's "
            "headers, the admin token among them, go only to the host given)",
        )


_OPENER = urllib.request.build_opener(_RedirectRefused)


class TritonHTTP:
    """A few KServe v2 calls with urllib: infer with JSON, GET a JSON document. Redirects
    are not followed (TritonError naming the Location)."""

    def __init__(self, url: str, timeout: float = TIMEOUT_SECONDS):
        self.base = url if url.startswith("http") else f"http://{url}"
        self.base = self.base.rstrip("/")
        self.timeout = timeout

    def infer(self, model: str, inputs: list[dict], headers: dict[str, str] | None = None) -> dict:
        body = json.dumps({"inputs": inputs}).encode()
        request = urllib.request.Request(
            f"{self.base}/v2/models/{model}/infer",
            data=body,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        return self._json(request)

    def get(self, path: str) -> dict:
        return self._json(urllib.request.Request(f"{self.base}{path}"))

    def _json(self, request: urllib.request.Request) -> dict:
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            try:
                message = json.load(error).get("error", "")
            except ValueError:
                message = ""
            raise TritonError(error.code, message or str(error)) from None


class TritonError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


# --- stored voices ---------------------------------------------------------------------------
def admin_token_file(environ=None) -> Path:
    """Where a token is looked for when $CSM_ADMIN_TOKEN is unset."""
    environ = os.environ if environ is None else environ
    return Path(environ[ADMIN_TOKEN_FILE_ENV]) if environ.get(ADMIN_TOKEN_FILE_ENV) else DEVELOPMENT_TOKEN_FILE


def admin_token(environ=None) -> str | None:
    """$CSM_ADMIN_TOKEN; else the first line of $CSM_ADMIN_TOKEN_FILE (make serve's
    development token, build/runtime/admin-token, by default); else None. The same
    lookup as csm_clients.admin_token.admin_token_from_environment, without the package."""
    environ = os.environ if environ is None else environ
    if environ.get(ADMIN_TOKEN_ENV):
        return environ[ADMIN_TOKEN_ENV]
    try:
        lines = admin_token_file(environ).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    return (lines[0].strip() if lines else "") or None


def no_token_reason(environ=None) -> str:
    return (
        f"{ADMIN_TOKEN_ENV} is not set and {admin_token_file(environ)} holds no token "
        f"(make serve writes one there when {ADMIN_TOKEN_ENV} is unset)"
    )


def register_voices(http: TritonHTTP, references: list[Reference], token: str | None) -> tuple[list[str], list[str]]:
    """Register each reference as a stored voice: (usable voice ids, ids this call created).

    A voice that is already there is reused. Without a token nothing can be written, so
    only voices that exist already are usable.
    """
    usable, created = [], []
    existing = {voice["voice_id"] for voice in list_voices(http)}
    for reference in references:
        if reference.voice_id in existing:
            usable.append(reference.voice_id)
            continue
        if not token:
            continue
        inputs = [tensor("VOICE_ID", "BYTES", [reference.voice_id]), *reference_inputs(reference)]
        try:
            http.infer("voice_register", inputs, headers={ADMIN_TOKEN_HEADER: token})
            created.append(reference.voice_id)
        except TritonError as error:
            if "already exists" not in error.message:  # another load generator was quicker
                raise
        usable.append(reference.voice_id)
    return usable, created


def list_voices(http: TritonHTTP) -> list[dict]:
    answer = http.infer("voice_list", [])
    return json.loads(answer["outputs"][0]["data"][0])


def delete_voices(http: TritonHTTP, voice_ids: list[str], token: str | None) -> None:
    for voice_id in voice_ids:
        try:
            http.infer(
                "voice_delete", [tensor("VOICE_ID", "BYTES", [voice_id])], headers={ADMIN_TOKEN_HEADER: token or ""}
            )
        except TritonError as error:
            print(f"could not delete voice {voice_id}: {error}", file=sys.stderr)


# --- where a result was measured -----------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name, e.g. "AMD EPYC 9R14" (from /proc/cpuinfo where it exists)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def git_commit() -> str:
    """This checkout's short commit, for a result's `commit` field ("unknown" outside git)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=PROJECT_ROOT
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """This machine's CPU model, cores and OS, e.g. for a result's `machine` field."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()}, {cores} cores, {platform.system()} {platform.machine()}"


def commit() -> str:
    """The checked-out commit; with the top-level folders of any uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        changed = sorted(
            {
                line[3:].split("/", 1)[0] + ("/" if "/" in line[3:] else "")
                for line in git("status", "--porcelain").splitlines()
                if line[3:]
            }
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} + uncommitted changes in {', '.join(changed)}" if changed else head


def command_line() -> str:
    """How this process was started, as one would type it in the project root."""
    program = Path(sys.argv[0]).resolve()
    if program.suffix == ".py" and program.is_relative_to(PROJECT_ROOT):
        module = ".".join(program.relative_to(PROJECT_ROOT).with_suffix("").parts)
        head = ["python", "-m", module]
    else:  # e.g. the locust script of the venv
        head = [program.name]
    return shlex.join(head + sys.argv[1:])
