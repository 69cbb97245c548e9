"""Voice profiles against a real tritonserver, over HTTP and gRPC: register real
speech (espeak-ng), list, delete, the admin token, bad ids and bad audio refused
clearly, and voices surviving a server restart."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
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
        pytest.fail(f"{', '.join(missing)} not installed: run scripts/setup.sh (apt-get install -y espeak-ng sox)")
    path = tmp_path_factory.mktemp("speech") / "espeak.wav"
    _run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(path), TRANSCRIPT])
    return path


@pytest.fixture(scope="session")
def speech_24k(espeak_wav) -> Speech:
    """The espeak-ng clip converted by sox to 24 kHz mono float32."""
    target = espeak_wav.with_name("speech-24k.wav")
    _run(["sox", str(espeak_wav), "-r", str(C.SAMPLE_RATE), "-c", "1", "-e", "floating-point", "-b", "32",
          str(target)])
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
    return Protocol(request.param, PROTOCOLS[request.param],
                    {"http": http_client, "grpc": grpc_client}[request.param])


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
        tensor(module, "REFERENCE_SAMPLE_RATE",
               np.array([speech.sample_rate if sample_rate is None else sample_rate], np.int32)),
        tensor(module, "REFERENCE_TEXT", text(speech.transcript if transcript is None else transcript)),
    ]


def register(p: Protocol, voice_id: str, speech: Speech, headers=None, **changes) -> dict:
    result = p.client.infer("voice_register", register_inputs(p.module, voice_id, speech, **changes),
                            headers=token() if headers is None else headers)
    return json.loads(result.as_numpy("VOICE")[0])


def voices(p: Protocol) -> dict[str, dict]:
    listed = json.loads(p.client.infer("voice_list", []).as_numpy("VOICES")[0])
    return {voice["voice_id"]: voice for voice in listed}


def delete(p: Protocol, voice_id: str, headers=None) -> dict:
    result = p.client.infer("voice_delete", [tensor(p.module, "VOICE_ID", text(voice_id))],
                            headers=token() if headers is None else headers)
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
    request = urllib.request.Request(f"http://{triton_server.http_url}/v2/models/voice_list/infer",
                                     data=b'{"inputs": []}', method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        body = json.loads(answer.read())
    assert body["outputs"][0]["name"] == "VOICES" and isinstance(json.loads(body["outputs"][0]["data"][0]), list)


# --- the admin token ---------------------------------------------------------------------------
@pytest.mark.parametrize("sent, message", [
    (None, "permission denied: this request changes voices and needs the admin token in header 'x-csm-admin-token'"),
    ("not-the-token", "permission denied: wrong admin token in header 'x-csm-admin-token'"),
    ("", "permission denied: "),
])
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
    "too short": ({"samples": _speech(0.2)}, "'REFERENCE_AUDIO' is 0.20 s long; a voice reference needs at least 0.5 s"),
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
        protocol.client.infer("voice_register", register_inputs(protocol.module, "s", speech_24k)[:1] + stereo
                              + register_inputs(protocol.module, "s", speech_24k)[2:], headers=token())
    doubles = [tensor(protocol.module, "REFERENCE_AUDIO", speech_24k.samples.astype(np.float64))]
    with pytest.raises(InferenceServerException, match="REFERENCE_AUDIO"):
        protocol.client.infer("voice_register", register_inputs(protocol.module, "s", speech_24k)[:1] + doubles
                              + register_inputs(protocol.module, "s", speech_24k)[2:], headers=token())


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
