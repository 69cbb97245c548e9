"""Voice profiles against a real tritonserver, over HTTP and gRPC: register real
speech (espeak-ng) and a LoRA adapter made by peft, list, delete, the admin token, bad ids and bad audio refused
clearly, voices surviving a server restart, concurrent registers and deletes answered
as the store did them, a full disk refused clearly, and python stubs that exit when
their server is killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import tritonclient.grpc as grpc
import tritonclient.http as http
from tritonclient.utils import InferenceServerException

from csm_triton import constants as C
from csm_triton.core.audio import read_audio_file
from csm_triton.serving.process import TritonServer

from .conftest import ADMIN_TOKEN

pytestmark = pytest.mark.integration
PROTOCOLS = {"http": http, "grpc": grpc}
TRANSCRIPT = "The quick brown fox jumps over the lazy dog, twice before breakfast."
INVALID_ARG = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}


@dataclass(frozen=True)
class Speech:
    samples: np.ndarray  # float32 mono
    sample_rate: int
    transcript: str

    @property
    def seconds(self) -> float:
        return self.samples.size / self.sample_rate


@dataclass(frozen=True)
class Protocol:
    name: str
    module: object
    client: object


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"


@pytest.fixture(scope="session")
def espeak_wav(tmp_path_factory):
    """Real speech made on the spot: espeak-ng's WAV (22050 Hz, 16-bit)."""
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run make setup-test (apt-get install -y espeak-ng sox)")
    path = tmp_path_factory.mktemp("speech") / "espeak.wav"
    _run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(path), TRANSCRIPT])
    return path


@pytest.fixture(scope="session")
def speech_24k(espeak_wav) -> Speech:
    """The espeak-ng clip converted by sox to 24 kHz mono float32."""
    target = espeak_wav.with_name("speech-24k.wav")
    _run(["sox", str(espeak_wav), "-r", str(C.SAMPLE_RATE), "-c", "1", "-e", "floating-point", "-b", "32", str(target)])
    samples, rate = read_audio_file(target)
    assert rate == C.SAMPLE_RATE and samples.dtype == np.float32
    assert C.MIN_REFERENCE_SECONDS < samples.size / rate < C.MAX_REFERENCE_SECONDS
    return Speech(samples, rate, TRANSCRIPT)


@pytest.fixture(scope="session")
def speech_native(espeak_wav) -> Speech:
    samples, rate = read_audio_file(espeak_wav)
    assert rate != C.SAMPLE_RATE, "this clip exercises the server's resampling"
    return Speech(samples, rate, TRANSCRIPT)


@pytest.fixture(params=sorted(PROTOCOLS))
def protocol(request, http_client, grpc_client) -> Protocol:
    return Protocol(request.param, PROTOCOLS[request.param], {"http": http_client, "grpc": grpc_client}[request.param])


@pytest.fixture(scope="session")
def voice_dir(served_repository):
    """Where the voice models keep their files: runtime/voices next to the repository."""
    return served_repository.parent / "runtime" / "voices"


def token(value: str | None = ADMIN_TOKEN) -> dict:
    # A fresh dict each call: tritonclient.http adds its own keys to the one it is given.
    return {} if value is None else {C.ADMIN_TOKEN_HEADER: value}


def tensor(module, name: str, array: np.ndarray):
    datatype = {np.object_: "BYTES", np.float32: "FP32", np.int32: "INT32", np.float64: "FP64"}[array.dtype.type]
    item = module.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def text(value: str) -> np.ndarray:
    return np.array([value.encode()], dtype=np.object_)


def register_inputs(module, voice_id: str, speech: Speech, *, samples=None, sample_rate=None, transcript=None):
    return [
        tensor(module, "VOICE_ID", text(voice_id)),
        tensor(module, "REFERENCE_AUDIO", speech.samples if samples is None else samples),
        tensor(
            module,
            "REFERENCE_SAMPLE_RATE",
            np.array([speech.sample_rate if sample_rate is None else sample_rate], np.int32),
        ),
        tensor(module, "REFERENCE_TEXT", text(speech.transcript if transcript is None else transcript)),
    ]


def register(p: Protocol, voice_id: str, speech: Speech, headers=None, **changes) -> dict:
    result = p.client.infer(
        "voice_register",
        register_inputs(p.module, voice_id, speech, **changes),
        headers=token() if headers is None else headers,
    )
    return json.loads(result.as_numpy("VOICE")[0])


def voices(p: Protocol) -> dict[str, dict]:
    listed = json.loads(p.client.infer("voice_list", []).as_numpy("VOICES")[0])
    return {voice["voice_id"]: voice for voice in listed}


def delete(p: Protocol, voice_id: str, headers=None) -> dict:
    result = p.client.infer(
        "voice_delete", [tensor(p.module, "VOICE_ID", text(voice_id))], headers=token() if headers is None else headers
    )
    return json.loads(result.as_numpy("DELETED")[0])


def refused(p: Protocol, call) -> str:
    """The message of a refused request, checked to be a clean INVALID_ARG."""
    with pytest.raises(InferenceServerException) as failure:
        call()
    assert str(failure.value.status()) == INVALID_ARG[p.name], failure.value
    message = failure.value.message()
    assert "Traceback" not in message and ADMIN_TOKEN not in message
    return message


# --- the round trip --------------------------------------------------------------------------
def test_voice_models_are_ready(http_client, grpc_client):
    for name in ("voice_register", "voice_list", "voice_delete"):
        assert http_client.is_model_ready(name) and grpc_client.is_model_ready(name)


def test_register_list_and_delete(protocol, speech_24k, voice_dir):
    voice_id = f"fox-{protocol.name}"
    stored = register(protocol, voice_id, speech_24k)
    assert stored["voice_id"] == voice_id and stored["transcript"] == TRANSCRIPT
    assert stored["duration_seconds"] == pytest.approx(speech_24k.seconds, abs=1e-3)
    assert stored["created_at"].endswith("Z")

    listed = voices(protocol)[voice_id]
    assert listed == stored, "the list shows what was registered"
    assert (voice_dir / f"{voice_id}.json").is_file()

    deleted = delete(protocol, voice_id)
    assert deleted["voice_id"] == voice_id and deleted["transcript"] == TRANSCRIPT
    assert voice_id not in voices(protocol)
    assert not list(voice_dir.glob(f"{voice_id}.*")), "its files are gone"
    assert f"unknown voice '{voice_id}'" in refused(protocol, lambda: delete(protocol, voice_id))


@pytest.fixture(scope="module")
def adapter_run(tiny_checkpoint, tmp_path_factory):
    """What `make finetune` leaves on the served (tiny) base: OUT/adapter + OUT/manifest.json."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import CsmForConditionalGeneration

    from csm_triton.core.adapters import base_model_sha256
    from finetune.train import DEFAULT_TARGET_MODULES, LM_PREFIX

    run = tmp_path_factory.mktemp("finetune-run")
    model = CsmForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=LM_PREFIX + "(" + "|".join(DEFAULT_TARGET_MODULES) + ")$")
    ).save_pretrained(run / "adapter")
    (run / "manifest.json").write_text(json.dumps({"base_model_sha256": base_model_sha256(tiny_checkpoint)}))
    return run


def adapter_inputs(module, voice_id: str, run, *, config: bytes | None = None) -> list:
    blob = lambda data: np.array([data], dtype=np.object_)  # noqa: E731
    return [
        tensor(module, "VOICE_ID", text(voice_id)),
        tensor(module, "ADAPTER_CONFIG", blob(config or (run / "adapter" / "adapter_config.json").read_bytes())),
        tensor(module, "ADAPTER_WEIGHTS", blob((run / "adapter" / "adapter_model.safetensors").read_bytes())),
        tensor(module, "ADAPTER_MANIFEST", blob((run / "manifest.json").read_bytes())),
        tensor(module, "DEFAULT_SPEAKER", np.array([1], np.int32)),
    ]


def test_an_adapter_voice_registers_lists_and_deletes_with_the_admin_token(protocol, adapter_run, voice_dir):
    """Issue 26: the adapter folder make finetune writes registers as a voice through
    voice_register, checked against the served base (shapes and base hash)."""
    voice_id = f"tuned-{protocol.name}"

    def register_adapter(headers, name=voice_id, **changes):
        inputs = adapter_inputs(protocol.module, name, adapter_run, **changes)
        return json.loads(protocol.client.infer("voice_register", inputs, headers=headers).as_numpy("VOICE")[0])

    assert "permission denied" in refused(protocol, lambda: register_adapter(token(None)))
    assert "wrong admin token" in refused(protocol, lambda: register_adapter(token("not-the-token")))
    assert voice_id not in voices(protocol)

    stored = register_adapter(token())
    assert stored["kind"] == "adapter" and stored["rank"] == 4 and stored["lora_alpha"] == 8.0
    assert stored["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert stored["base_hash_checked"] and len(stored["base_model_sha256"]) == 64 and stored["default_speaker"] == 1
    assert stored["size_bytes"] == sum(
        path.stat().st_size for path in (adapter_run / "adapter").iterdir() if path.name != "README.md"
    )
    assert voices(protocol)[voice_id] == stored, "voice_list shows kind, rank, targets, base hash and size"
    (folder,) = voice_dir.glob(f"{voice_id}.*.adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert "already exists" in refused(protocol, lambda: register_adapter(token()))

    config = json.loads((adapter_run / "adapter" / "adapter_config.json").read_text())
    too_big = json.dumps({**config, "r": 65}).encode()
    message = refused(protocol, lambda: register_adapter(token(), f"{voice_id}-r65", config=too_big))
    assert "rank r=65 is not supported; the engine applies ranks 1 to 64" in message
    assert f"{voice_id}-r65" not in voices(protocol) and not list(voice_dir.glob(f"{voice_id}-r65*"))

    deleted = delete(protocol, voice_id)
    assert deleted["voice_id"] == voice_id and deleted["kind"] == "adapter"
    assert voice_id not in voices(protocol) and not list(voice_dir.glob(f"{voice_id}.*")), "its folder is gone"


def test_stored_codes_are_mimi_encoders_codes_of_the_reference(http_client, speech_24k, voice_dir):
    p = Protocol("http", http, http_client)
    register(p, "codes-check", speech_24k)
    try:
        metadata = json.loads((voice_dir / "codes-check.json").read_text())
        stored = np.load(voice_dir / metadata["codes_file"])
        direct = http_client.infer("mimi_encoder", [tensor(http, "input_values", speech_24k.samples[None, None])])
        expected = direct.as_numpy("audio_codes")[0].T
        assert stored.shape == expected.shape == (metadata["frames"], C.NUM_CODEBOOKS)
        assert stored.shape[0] == int(np.ceil(speech_24k.samples.size / C.SAMPLES_PER_FRAME))
        # Exact: integer codes of the same samples from the same encoder, one request each.
        np.testing.assert_array_equal(stored, expected)
    finally:
        delete(p, "codes-check")


def test_a_reference_at_another_rate_is_resampled(protocol, speech_native):
    voice_id = f"native-rate-{protocol.name}"
    stored = register(protocol, voice_id, speech_native)
    try:
        assert stored["duration_seconds"] == pytest.approx(speech_native.seconds, abs=1e-3)
    finally:
        delete(protocol, voice_id)


def test_an_existing_voice_is_not_overwritten(protocol, speech_24k):
    voice_id = f"taken-{protocol.name}"
    register(protocol, voice_id, speech_24k)
    try:
        message = refused(protocol, lambda: register(protocol, voice_id, speech_24k, transcript="Another text."))
        assert f"voice '{voice_id}' already exists" in message
        assert voices(protocol)[voice_id]["transcript"] == TRANSCRIPT
    finally:
        delete(protocol, voice_id)


def test_voice_list_over_plain_kserve_json(triton_server):
    # A model without inputs still needs "inputs": [] in the KServe v2 JSON body.
    request = urllib.request.Request(
        f"http://{triton_server.http_url}/v2/models/voice_list/infer", data=b'{"inputs": []}', method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        body = json.loads(answer.read())
    assert body["outputs"][0]["name"] == "VOICES" and isinstance(json.loads(body["outputs"][0]["data"][0]), list)


# --- the admin token ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sent, message",
    [
        (
            None,
            "permission denied: this request changes voices and needs the admin token in header 'x-csm-admin-token'",
        ),
        ("not-the-token", "permission denied: wrong admin token in header 'x-csm-admin-token'"),
        ("", "permission denied: "),
    ],
)
def test_writes_without_the_right_token_are_refused(protocol, speech_24k, sent, message):
    voice_id = f"no-token-{protocol.name}"
    got = refused(protocol, lambda: register(protocol, voice_id, speech_24k, headers=token(sent)))
    assert got.startswith(message)
    assert voice_id not in voices(protocol)

    register(protocol, voice_id, speech_24k)
    try:
        got = refused(protocol, lambda: delete(protocol, voice_id, headers=token(sent)))
        assert got.startswith(message)
        assert voice_id in voices(protocol), "a refused delete deletes nothing"
    finally:
        delete(protocol, voice_id)


def test_the_token_is_checked_before_the_inputs(protocol, speech_24k):
    message = refused(protocol, lambda: register(protocol, "../x", speech_24k, headers=token("wrong")))
    assert message.startswith("permission denied")


def test_http_header_names_are_case_insensitive(http_client, speech_24k):
    # HTTP forwards the header with the client's spelling; the models lower-case it.
    # (gRPC metadata keys must be lower case: grpc refuses others client-side.)
    p = Protocol("http", http, http_client)
    register(p, "mixed-case", speech_24k, headers={"X-CSM-Admin-Token": ADMIN_TOKEN})
    assert delete(p, "mixed-case", headers={"X-Csm-Admin-Token": ADMIN_TOKEN})["voice_id"] == "mixed-case"


# --- bad requests --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_id", ["../x", "a/b", "Alice", "a" * 65, "-dash-first", "with space"])
def test_bad_voice_ids_are_refused(protocol, speech_24k, voice_dir, bad_id):
    message = refused(protocol, lambda: register(protocol, bad_id, speech_24k))
    assert "'VOICE_ID' is not a valid voice id" in message
    assert "not a valid voice id" in refused(protocol, lambda: delete(protocol, bad_id))
    assert not (voice_dir.parent / "x.json").exists() and not (voice_dir / "a").exists()


def _speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * C.SAMPLE_RATE)) / C.SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


BAD_AUDIO = {
    "too short": (
        {"samples": _speech(0.2)},
        "'REFERENCE_AUDIO' is 0.20 s long; a voice reference needs at least 0.5 s",
    ),
    "too long": ({"samples": _speech(C.MAX_REFERENCE_SECONDS + 1)}, "the limit for a voice reference is 30 s"),
    "NaN": ({"samples": np.full(C.SAMPLE_RATE, np.nan, np.float32)}, "'REFERENCE_AUDIO' contains NaN or infinite"),
    "empty": ({"samples": np.zeros(0, np.float32)}, "'REFERENCE_AUDIO' is empty"),
    "rate 0": ({"sample_rate": 0}, "'REFERENCE_SAMPLE_RATE' must be a positive sample rate in Hz, got 0"),
    "rate too low": ({"sample_rate": 4_000}, "'REFERENCE_SAMPLE_RATE' is 4000 Hz; accepted sample rates are"),
    "empty transcript": ({"transcript": "  "}, "'REFERENCE_TEXT' is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_AUDIO))
def test_bad_reference_audio_is_refused(protocol, speech_24k, case):
    changes, message = BAD_AUDIO[case]
    voice_id = f"bad-audio-{protocol.name}"
    assert message in refused(protocol, lambda: register(protocol, voice_id, speech_24k, **changes))
    assert voice_id not in voices(protocol)


def test_stereo_or_wrong_dtype_is_refused_by_triton_by_name(protocol, speech_24k):
    stereo = [tensor(protocol.module, "REFERENCE_AUDIO", np.stack([speech_24k.samples] * 2))]
    with pytest.raises(InferenceServerException, match="REFERENCE_AUDIO"):
        protocol.client.infer(
            "voice_register",
            register_inputs(protocol.module, "s", speech_24k)[:1]
            + stereo
            + register_inputs(protocol.module, "s", speech_24k)[2:],
            headers=token(),
        )
    doubles = [tensor(protocol.module, "REFERENCE_AUDIO", speech_24k.samples.astype(np.float64))]
    with pytest.raises(InferenceServerException, match="REFERENCE_AUDIO"):
        protocol.client.infer(
            "voice_register",
            register_inputs(protocol.module, "s", speech_24k)[:1]
            + doubles
            + register_inputs(protocol.module, "s", speech_24k)[2:],
            headers=token(),
        )


# --- persistence -----------------------------------------------------------------------------------
def test_voices_survive_a_restart(http_client, served_repository, speech_24k, tmp_path):
    """A second tritonserver on the same repository (as after a restart) lists the voice."""
    p = Protocol("http", http, http_client)
    registered = register(p, "survivor", speech_24k)
    try:
        second = TritonServer(
            served_repository,
            load_models=["voice_list"],
            ready_models=["voice_list"],
            strict_readiness=False,
            log_path=tmp_path / "second-tritonserver.log",
            environment={"CSM_ADMIN_TOKEN": ADMIN_TOKEN},
        )
        with second:
            client = grpc.InferenceServerClient(second.grpc_url)
            try:
                listed = voices(Protocol("grpc", grpc, client))
            finally:
                client.close()
        assert listed["survivor"] == registered
    finally:
        delete(p, "survivor")


# --- under concurrency, a full disk, a killed server -----------------------------------------
def test_concurrent_registers_and_deletes_are_answered_as_the_store_did_them(
    grpc_client, speech_24k, voice_dir, served_repository
):
    """voice_register and voice_delete are separate processes: racing them on the same
    ids, every answer is a success or a clear refusal (never INTERNAL, never a server
    path), and per id successful registers minus successful deletes is what is stored."""
    p = Protocol("grpc", grpc, grpc_client)  # the gRPC client may be shared by threads
    ids = ["race-a", "race-b"]
    answers: dict[str, list[str]] = {voice_id: [] for voice_id in ids}

    def attempt(job: tuple[str, str]) -> tuple[str, str, str]:
        action, voice_id = job
        try:
            if action == "register":
                register(p, voice_id, speech_24k)
            else:
                delete(p, voice_id)
            return action, voice_id, "ok"
        except InferenceServerException as error:
            return action, voice_id, f"{error.status()}: {error.message()}"

    jobs = [(action, voice_id) for _ in range(6) for voice_id in ids for action in ("register", "delete")]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(attempt, jobs))
    try:
        for action, voice_id, outcome in results:
            if outcome != "ok":
                assert outcome.startswith(f"{INVALID_ARG[p.name]}: "), outcome
                expected = "already exists" if action == "register" else "unknown voice"
                assert expected in outcome, outcome
                assert str(served_repository.parent) not in outcome and "Error" not in outcome, outcome
            answers[voice_id].append(f"{action} {outcome == 'ok'}")
        stored = voices(p)
        for voice_id in ids:
            registered = answers[voice_id].count("register True")
            deleted = answers[voice_id].count("delete True")
            assert registered - deleted == (1 if voice_id in stored else 0), (voice_id, answers[voice_id])
        left = sorted(path.name for path in voice_dir.iterdir() if path.name.startswith((".race", "race")))
        assert len(left) == 2 * len([voice_id for voice_id in ids if voice_id in stored]), left
    finally:
        for voice_id in ids:
            if voice_id in voices(p):
                delete(p, voice_id)


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie: exited
    except FileNotFoundError:
        return True


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


SLEEPER_CONFIG = """
name: "sleeper"
backend: "python"
max_batch_size: 0
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
"""
SLEEPER_MODEL = """
import time
import numpy as np
from csm_triton.triton.adapter import PythonModel

class TritonPythonModel(PythonModel):
    def initialize_model(self, args, model_config):
        pass

    def handle(self, request):
        time.sleep(120)  # busy when the server dies: the stub's own idle-time check never runs
        return {"OUT": np.zeros(1, np.float32)}
"""


def test_python_stubs_exit_when_their_tritonserver_is_killed(tmp_path):
    """Two stubs of one model, one idle and one inside a long request, when tritonserver
    dies of SIGKILL and its launcher has not reaped it yet: both are gone within seconds.

    Triton's stub checks its parent with kill(pid, 0), which a zombie passes: with a
    launcher that reaps late (or never), stubs lived on for minutes. Our watchdog sees
    the re-parenting (getppid) instead, the moment the server dies."""
    repository = tmp_path / "repository"
    (repository / "sleeper" / "1").mkdir(parents=True)
    (repository / "sleeper" / "config.pbtxt").write_text(SLEEPER_CONFIG)
    (repository / "sleeper" / "1" / "model.py").write_text(SLEEPER_MODEL)
    log = tmp_path / "killed-tritonserver.log"
    server = TritonServer(repository, load_models=["sleeper"], ready_models=["sleeper"], log_path=log)
    with server, ThreadPoolExecutor(max_workers=1) as pool:
        stubs = _children(server.pid)
        assert len(stubs) == 2, f"expected 2 python stubs under tritonserver {server.pid}, found {stubs}"
        client = http.InferenceServerClient(server.http_url, network_timeout=60)
        pending = pool.submit(client.infer, "sleeper", [tensor(http, "IN", np.zeros(1, np.float32))])
        time.sleep(1.5)  # the request reached a stub
        assert not pending.done()
        os.kill(server.pid, signal.SIGKILL)  # the server alone, not its process group
        killed = time.monotonic()
        while not _process_gone(server.pid):  # dead, and left unreaped: a zombie
            time.sleep(0.01)
        while running := [pid for pid in stubs if not _process_gone(pid)]:
            assert time.monotonic() - killed < 8, f"orphaned stubs still running: {running}\n{server.log_tail(20)}"
            time.sleep(0.1)
        server.process.wait(timeout=10)
        with pytest.raises(Exception):
            pending.result(timeout=30)  # the connection died with the server
        client.close()
    assert log.read_text().count("is gone; stub") == 2, "each stub was ended by its watchdog"


@pytest.fixture()
def small_disk(tmp_path):
    """A 64 KiB tmpfs where a repository of the voice models keeps its voices."""
    root = tmp_path / "small"
    voices_dir = root / "runtime" / "voices"
    voices_dir.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(voices_dir)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount rights): {mounted.stderr.strip()}")
    try:
        yield root, voices_dir
    finally:
        subprocess.run(["umount", "-l", str(voices_dir)], capture_output=True)


def test_a_full_disk_is_a_clear_refusal_and_leaves_the_store_intact(
    served_repository, small_disk, speech_24k, tmp_path
):
    root, voices_dir = small_disk
    repository = root / "repository"
    repository.mkdir()
    for model in ("voice_register", "voice_list"):
        shutil.copytree(served_repository / model, repository / model)  # their store: root/runtime/voices
    (repository / "mimi_encoder").symlink_to(served_repository / "mimi_encoder")
    models = ["voice_register", "voice_list", "mimi_encoder"]
    server = TritonServer(
        repository,
        load_models=models,
        ready_models=models,
        strict_readiness=False,
        log_path=tmp_path / "small-disk-tritonserver.log",
        environment={"CSM_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    with server:
        client = http.InferenceServerClient(server.http_url)
        try:
            p = Protocol("http", http, client)
            kept = register(p, "kept", speech_24k)
            filler = voices_dir / "filler.bin"
            with open(filler, "wb", buffering=0) as out:  # fill what is left
                try:
                    while True:
                        out.write(b"\0" * 4096)
                        out.flush()
                except OSError:
                    pass
            before = sorted(os.listdir(voices_dir))
            message = refused(p, lambda: register(p, "overflow", speech_24k))
            assert message.startswith("voice store is full (No space left on device)"), message
            assert "overflow" in message and str(root) not in message and "Errno" not in message
            assert sorted(os.listdir(voices_dir)) == before, "no temporary, no half-written voice left"
            assert voices(p) == {"kept": kept}
            filler.unlink()
            assert register(p, "overflow", speech_24k)["voice_id"] == "overflow", "room again: it works"
        finally:
            client.close()
