"""csm_clients without a server: error mapping, audio in and out, the requests it builds,
batch input parsing and the summary, the gateway's form errors (what it imports:
tests/unit/test_layers.py)."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import soundfile
from tritonclient.utils import InferenceServerException

from csm_clients import (
    MODEL_SAMPLE_RATE,
    InvalidRequest,
    PermissionDenied,
    Reference,
    ServerError,
    ServerUnavailable,
    Speech,
    Turn,
    calls,
    read_audio,
)
from csm_clients.batch import BatchItem, BatchSummary, read_items
from csm_clients.errors import from_stream_message, from_triton
from csm_clients.transport import generate_body


@pytest.mark.parametrize(
    "status, message, kind",
    [
        ("400", "input 'TEXT' is empty", InvalidRequest),
        (
            "StatusCode.INVALID_ARGUMENT",
            "in ensemble 'csm_tts', input 'TOP_K' must be in [1, 2048], got 0",
            InvalidRequest,
        ),
        (
            "StatusCode.INVALID_ARGUMENT",
            "permission denied: wrong admin token in header 'x-csm-admin-token'",
            PermissionDenied,
        ),
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", ServerUnavailable),
        ("StatusCode.INTERNAL", "csm_lm: internal error (RuntimeError: boom)", ServerError),
        ("404", "Request for unknown model: 'csm_tts' is not found", ServerError),
        (None, "input 'TEMPERATURE' must be in (0, 5], got 0.0", InvalidRequest),  # a stream error: no status
        (None, "csm_tts_stream: internal error (ModelCallError: boom)", ServerError),
    ],
)
def test_triton_errors_become_client_exceptions_with_the_servers_message(status, message, kind):
    error = from_triton(InferenceServerException(message, status=status))
    assert type(error) is kind and str(error) == message
    if isinstance(error, ServerError):
        assert error.status == status


def test_connection_errors_are_server_unavailable():
    error = from_triton(ConnectionRefusedError(111, "Connection refused"), "localhost:1")
    assert isinstance(error, ServerUnavailable) and "localhost:1" in str(error)
    assert isinstance(from_stream_message("permission denied: no"), PermissionDenied)


def encoded(samples: np.ndarray, rate: int, format: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=format)
    return buffer.getvalue()


def tone(seconds: float, rate: int) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def test_read_audio_mixes_down_and_resamples_only_above_the_model_rate(tmp_path):
    stereo_48k = np.stack([tone(1.0, 48_000), np.zeros(48_000, np.float32)], axis=1)
    samples, rate = read_audio(encoded(stereo_48k, 48_000, "FLAC"))
    assert rate == MODEL_SAMPLE_RATE and samples.shape == (24_000,) and samples.dtype == np.float32
    assert np.abs(samples).max() == pytest.approx(0.15, abs=0.01)  # the mean of both channels

    path = tmp_path / "phone.ogg"
    soundfile.write(path, tone(1.0, 16_000), 16_000)
    samples, rate = read_audio(path)
    assert rate == 16_000 and samples.size == 16_000, "slower clips go as recorded: the server resamples"


def test_unreadable_audio_is_an_invalid_request(tmp_path):
    with pytest.raises(InvalidRequest, match="cannot read the reference clip as audio"):
        Reference.from_file(b"not audio at all", "x")
    with pytest.raises(InvalidRequest, match="cannot read"):
        read_audio(tmp_path / "missing.wav")


def test_speech_to_wav_and_saved_at_another_rate(tmp_path):
    speech = Speech(np.concatenate([tone(0.5, 24_000), [1.5]]).astype(np.float32), 24_000)
    samples, rate = soundfile.read(io.BytesIO(speech.to_wav_bytes()))
    assert rate == 24_000 and samples.size == speech.audio.size and samples.max() <= 1.0
    assert soundfile.info(io.BytesIO(speech.to_wav_bytes())).subtype == "PCM_16"
    saved = speech.save(tmp_path / "speech.flac", sample_rate=16_000)
    assert soundfile.info(str(saved)).samplerate == 16_000 and speech.seconds == pytest.approx(0.5, abs=1e-4)


def test_requests_send_only_what_was_given():
    plain = calls.tts_inputs("Hi.")
    assert list(plain) == ["TEXT"] and plain["TEXT"].dtype == object and plain["TEXT"][0] == b"Hi."
    full = calls.tts_inputs("Hi.", "alice", temperature=0.5, top_k=3, seed=9, max_audio_seconds=2)
    assert {name: value.dtype for name, value in full.items() if name != "TEXT"} == {
        "VOICE_ID": np.dtype(object),
        "TEMPERATURE": np.float32,
        "TOP_K": np.int32,
        "SEED": np.int64,
        "MAX_AUDIO_SECONDS": np.float32,
    }
    inline = calls.tts_inputs("Hi.", Reference(tone(1.0, 16_000), 16_000, None))
    assert set(inline) == {"TEXT", "REFERENCE_AUDIO", "REFERENCE_SAMPLE_RATE"}, "no transcript: the server says so"
    register = calls.register_voice("bob", Reference(tone(1.0, 16_000), 16_000, "Hello."))
    assert register.admin and register.model == "voice_register" and register.inputs["REFERENCE_TEXT"][0] == b"Hello."
    assert not calls.list_voices().admin and calls.delete_voice("bob").admin


def test_generate_stream_body_is_the_json_triton_expects():
    inputs = calls.tts_inputs("Hi.", Reference(np.array([0.5, -0.25], np.float32), 16_000, "Ok."), seed=4)
    assert json.loads(generate_body(inputs)) == {
        "TEXT": "Hi.",
        "REFERENCE_AUDIO": [0.5, -0.25],
        "REFERENCE_SAMPLE_RATE": 16_000,
        "REFERENCE_TEXT": "Ok.",
        "SEED": 4,
    }


def test_batch_items_from_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text(
        "\n".join(
            [
                json.dumps({"id": "a", "text": "One."}),
                "",
                "{broken",
                json.dumps({"id": "a", "text": "Same id."}),
                json.dumps({"id": "../up", "text": "Unsafe id."}),
                json.dumps(["not", "an", "object"]),
                json.dumps({"text": "No id.", "seed": 3, "voice": "alice"}),
            ]
        )
    )
    items = read_items(jsonl)
    assert [(item.line, item.id) for item in items] == [
        (1, "a"),
        (3, "line-0003"),
        (4, "a"),
        (5, "../up"),
        (6, "line-0006"),
        (7, "line-0007"),
    ]
    errors = [item.error or "" for item in items]
    assert errors[0] == "" and "not JSON" in errors[1] and "twice" in errors[2] and "file name" in errors[3]
    assert "JSON object" in errors[4]
    assert items[5].request(tmp_path) == ("No id.", {"seed": 3, "voice": "alice"})

    table = tmp_path / "items.csv"
    table.write_text("id,text,temperature,voice\nx,Hello.,0.7,\ny,,,\n")
    rows = read_items(table)
    assert rows[0].request(tmp_path) == ("Hello.", {"temperature": 0.7})
    with pytest.raises(ValueError, match="'text' is required"):
        rows[1].request(tmp_path)


def test_a_batch_line_carries_a_conversation(tmp_path):
    soundfile.write(str(tmp_path / "question.wav"), np.zeros(24_000, np.float32), 24_000)
    item = BatchItem(
        1,
        "x",
        {
            "text": "Fine.",
            "speaker": 1,
            "context": [{"voice": "alice", "speaker": 1}, {"audio": "question.wav", "text": "How are you?"}],
        },
    )
    text, kwargs = item.request(tmp_path)
    assert text == "Fine." and kwargs["speaker"] == 1
    voice, clip = kwargs["context"]
    assert (voice.voice, voice.speaker) == ("alice", 1)
    assert (clip.text, clip.speaker, clip.sample_rate, clip.audio.size) == ("How are you?", 0, 24_000, 24_000)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"text": "Hi.", "speed": 2}, "unknown field(s) speed"),
        ({"text": "Hi.", "voice": "a", "reference_audio": "me.wav"}, "not both"),
        ({"text": "Hi.", "context": "alice"}, "context: must be a list of turns"),
        ({"text": "Hi.", "context": [{"text": "No audio."}]}, "context[0]: has no `audio` nor `voice`"),
        ({"text": "Hi.", "context": [{"voice": "a", "text": "t"}]}, "context[0]: give either `voice`"),
        ({"text": "Hi.", "context": [{"voice": "a", "pitch": 2}]}, "context[0]: expected an object with"),
        ({"text": "Hi.", "seed": "many"}, "field 'seed' must be a number, got 'many'"),
    ],
)
def test_bad_batch_fields_are_reported(tmp_path, fields, message):
    with pytest.raises((ValueError, InvalidRequest), match=re.escape(message)):
        BatchItem(1, "x", fields).request(tmp_path)


def test_batch_summary_table():
    summary = BatchSummary(
        items=5,
        written=4,
        audio_seconds=8.0,
        wall_seconds=2.0,
        failures=[(BatchItem(3, "bad"), "input 'TEXT' is empty")],
    )
    text = summary.table()
    assert summary.real_time_factor == 0.25 and "real-time factor        0.250" in text
    assert "failed                  1" in text and "line 3 (bad): input 'TEXT' is empty" in text
    assert BatchSummary().real_time_factor is None and "real-time factor        -" in BatchSummary().table()


def test_gateway_form_errors_need_no_server():
    from fastapi.testclient import TestClient

    from csm_servers.gateway import create_app

    with TestClient(create_app("127.0.0.1:1")) as client:
        missing = client.post("/clone-voice", data={})
        assert missing.status_code == 400 and missing.json() == {"detail": "text: Field required"}
        junk = client.post(
            "/clone-voice",
            data={"text": "Hi.", "reference_text": "x"},
            files={"reference_audio": ("a.wav", b"junk", "audio/wav")},
        )
        assert junk.status_code == 400 and "cannot read the reference clip as audio" in junk.json()["detail"]
        assert client.get("/health").status_code == 503


def test_cli_usage_errors_exit_2(capsys):
    from csm_clients.cli import main

    with pytest.raises(SystemExit) as usage:
        main(["say", "Hi."])  # no -o
    assert usage.value.code == 2 and "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["--protocol", "carrier-pigeon", "voices", "list"])
    assert usage.value.code == 2


# --- the gateway's form fields: checked against the server's ranges before conversion -------
RIGHT_KEY = {"Authorization": "Bearer right-key"}  # offline_gateway's key: /clone-voice needs it too


@pytest.fixture()
def offline_gateway():
    from fastapi.testclient import TestClient

    from csm_servers.gateway import create_app

    with TestClient(create_app("127.0.0.1:1", api_keys=["right-key"]), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("seed", str(2**63), "seed: input 'SEED' must be in [0, 9223372036854775807], got 9223372036854775808"),
        ("seed", "-1", "seed: input 'SEED' must be in [0, "),
        ("top_k", str(2**31), "top_k: input 'TOP_K' must be in [1, 2048], got 2147483648"),  # no INT32 wrap
        ("top_k", str(10**20), "top_k: input 'TOP_K' must be in [1, 2048], got 100000000000000000000"),
        ("top_k", "1e20", "top_k: Input should be a valid integer"),
        ("top_k", "0", "top_k: input 'TOP_K' must be in [1, 2048], got 0"),
        ("temperature", "0", "temperature: input 'TEMPERATURE' must be in (0, 5], got 0.0"),
        ("temperature", "nan", "temperature: input 'TEMPERATURE' must be in (0, 5], got nan"),
        ("temperature", "1e400", "temperature: input 'TEMPERATURE' must be in (0, 5], got inf"),
        ("max_audio_seconds", "1e9", "max_audio_seconds: input 'MAX_AUDIO_SECONDS' must be in (0, 90]"),
        ("max_audio_seconds", "-inf", "max_audio_seconds: input 'MAX_AUDIO_SECONDS' must be in (0, 90]"),
    ],
)
def test_out_of_range_form_fields_are_a_400_naming_the_field(offline_gateway, field, value, message):
    response = offline_gateway.post("/clone-voice", data={"text": "Hi.", field: value}, headers=RIGHT_KEY)
    assert response.status_code == 400 and response.headers["content-type"] == "application/json"
    assert response.json()["detail"].startswith(message), response.json()


def test_in_range_edges_pass_the_gateway(offline_gateway):
    for form in ({"seed": str(2**63 - 1)}, {"top_k": "2048"}, {"temperature": "5"}, {"max_audio_seconds": "90"}):
        response = offline_gateway.post("/clone-voice", data={"text": "Hi.", **form}, headers=RIGHT_KEY)
        assert response.status_code == 503, response.text  # on to Triton, which is not there


def test_a_non_audio_upload_is_named_by_its_file(offline_gateway):
    response = offline_gateway.post(
        "/clone-voice",
        data={"text": "Hi.", "reference_text": "x"},
        headers=RIGHT_KEY,
        files={"reference_audio": ("notes.txt", b"plain text", "text/plain")},
    )
    detail = response.json()["detail"]
    assert response.status_code == 400 and "'notes.txt'" in detail and "BytesIO" not in detail, detail
    upload = offline_gateway.post(
        "/upload-voice",
        headers={"Authorization": "Bearer right-key"},
        data={"voice_name": "x", "reference_text": "x"},
        files={"reference_audio": ("song.mp3", b"ID3 not really", "audio/mpeg")},
    )
    assert upload.status_code == 400 and "'song.mp3'" in upload.json()["detail"], upload.text


def test_a_gateway_bug_is_a_json_500_without_internals(offline_gateway, monkeypatch):
    from csm_clients.async_client import AsyncVoiceCloner

    async def broken(*args, **kwargs):
        raise OverflowError("Python int too large to convert to C long")

    monkeypatch.setattr(AsyncVoiceCloner, "synthesize", broken)
    response = offline_gateway.post("/clone-voice", data={"text": "Hi."}, headers=RIGHT_KEY)
    assert response.status_code == 500
    assert response.json() == {"detail": "the gateway failed (OverflowError); see its log"}


# --- the gateway's own credential for voice writes ---------------------------------------------
def test_voice_writes_need_a_gateway_api_key(offline_gateway):
    form = {"voice_name": "x", "reference_text": "x"}
    for headers in ({}, {"Authorization": "Basic right-key"}, {"Authorization": "Bearer"}):
        refused = offline_gateway.post("/upload-voice", data=form, headers=headers)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert "'Authorization: Bearer <key>'" in refused.json()["detail"]
        assert offline_gateway.delete("/voices/x", headers=headers).status_code == 401
    wrong = offline_gateway.delete("/voices/x", headers={"Authorization": "Bearer wrong-key"})
    assert wrong.status_code == 401
    assert wrong.json()["detail"] == "permission denied: wrong API key in header 'Authorization'"
    passed = offline_gateway.delete("/voices/x", headers={"Authorization": "bearer  right-key "})
    assert passed.status_code == 503, passed.text  # past the key, on to Triton (not there)
    assert offline_gateway.get("/voices").status_code == 503, "reads need no key"
    scheme = offline_gateway.get("/openapi.json").json()["components"]["securitySchemes"]
    assert list(scheme.values())[0]["scheme"] == "bearer"


def test_without_keys_voice_writes_are_refused_saying_how_to_enable_them():
    from fastapi.testclient import TestClient

    from csm_servers.gateway import create_app

    with TestClient(create_app("127.0.0.1:1", admin_token="admin")) as client:
        refused = client.delete("/voices/x", headers={"Authorization": "Bearer anything"})
    assert refused.status_code == 403
    assert "CSM_GATEWAY_API_KEYS=<key>" in refused.json()["detail"] and "admin" not in refused.json()["detail"]


def test_api_keys_from_the_environment_and_a_file(tmp_path):
    from csm_servers.gateway.keys import ApiKeys

    key_file = tmp_path / "keys"
    key_file.write_text("# the ops team\nfile-key\n\n  other-key  \n")
    keys = ApiKeys.from_environment({"CSM_GATEWAY_API_KEYS": "a, b,,", "CSM_GATEWAY_API_KEY_FILE": str(key_file)})
    assert len(keys) == 4 and "4 API key" in keys.describe()
    for key in ("a", "b", "file-key", "other-key"):
        keys.check(f"Bearer {key}")
    with pytest.raises(PermissionDenied, match="wrong API key"):
        keys.check("Bearer # the ops team")
    assert not ApiKeys.from_environment({}) and "disabled" in ApiKeys().describe()
    with pytest.raises(OSError):
        ApiKeys.from_settings(None, tmp_path / "missing")


def test_the_gateway_listens_on_loopback_unless_told_otherwise(monkeypatch, tmp_path, capsys):
    import uvicorn

    from csm_servers.gateway import __main__ as gateway_main

    runs = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **server: runs.append((app, host, port, server)))
    monkeypatch.setenv("CSM_GATEWAY_API_KEYS", "k1,k2")
    monkeypatch.setenv("CSM_ADMIN_TOKEN", "admin")
    assert gateway_main.main([]) == 0 and runs[-1][1:3] == ("127.0.0.1", 7860)
    assert "need one of 2 API key(s)" in capsys.readouterr().err
    assert gateway_main.main(["--host", "0.0.0.0", "--port", "9000"]) == 0 and runs[-1][1:3] == ("0.0.0.0", 9000)
    with pytest.raises(SystemExit) as usage:
        gateway_main.main(["--api-key-file", str(tmp_path / "missing")])
    assert usage.value.code == 2 and "cannot read the API key file" in capsys.readouterr().err


def test_the_gateway_serves_with_uvicorn_limits_from_flags_and_environment(monkeypatch):
    import uvicorn

    from csm_servers.gateway import __main__ as gateway_main
    from csm_servers.gateway.guard import GatewayGuard

    runs = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **server: runs.append((app, server)))
    monkeypatch.setenv("CSM_GATEWAY_MAX_CONCURRENCY_PER_KEY", "3")
    monkeypatch.setenv("CSM_GATEWAY_HEADER_TIMEOUT_S", "7")
    assert gateway_main.main(["--limit-concurrency", "12", "--max-queue-per-key", "1", "--max-upload-mb", "2"]) == 0
    app, server = runs[-1]
    assert server["limit_concurrency"] == 12 and server["timeout_keep_alive"] == gateway_main.TIMEOUT_KEEP_ALIVE_S
    assert server["h11_max_incomplete_event_size"] == gateway_main.MAX_HEADER_BYTES
    assert issubclass(server["http"], gateway_main.HeaderDeadlineProtocol) and server["http"].header_timeout_s == 7
    guard = next(item for item in app.user_middleware if item.cls is GatewayGuard)
    limits = guard.kwargs["limits"]
    assert (limits.max_concurrency_per_key, limits.max_queue_per_key, limits.max_upload_bytes) == (3, 1, 2 * 2**20)


# --- the admin token: make serve's development token and who reads it -------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_admin_token_lookup_and_its_standard_library_mirror(tmp_path, monkeypatch):
    import sys

    from csm_clients.admin_token import DEVELOPMENT_TOKEN_FILE, admin_token_from_environment

    sys.path.insert(0, str(ROOT))
    try:
        from loadtest import workload
    finally:
        sys.path.remove(str(ROOT))
    assert workload.DEVELOPMENT_TOKEN_FILE == DEVELOPMENT_TOKEN_FILE
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    monkeypatch.chdir(tmp_path)
    cases = [
        ({"CSM_ADMIN_TOKEN": "from-env", "CSM_ADMIN_TOKEN_FILE": str(token_file)}, "from-env"),
        ({"CSM_ADMIN_TOKEN": "", "CSM_ADMIN_TOKEN_FILE": str(token_file)}, "from-the-file"),
        ({"CSM_ADMIN_TOKEN_FILE": str(tmp_path / "missing")}, None),
        ({}, None),  # no build/runtime/admin-token here yet
    ]
    for environ, expected in cases:
        assert admin_token_from_environment(environ) == workload.admin_token(environ) == expected, environ
    (tmp_path / "build" / "runtime").mkdir(parents=True)
    (tmp_path / "build" / "runtime" / "admin-token").write_text("make-serve-token\n")
    assert admin_token_from_environment({}) == workload.admin_token({}) == "make-serve-token"
    assert "build/runtime/admin-token" in workload.no_token_reason({"CSM_ADMIN_TOKEN_FILE": ""})


def _make(*arguments: str, **environment: str):
    import os
    import subprocess

    env = {key: value for key, value in os.environ.items() if key not in ("CSM_ADMIN_TOKEN", "MAKEFLAGS")}
    return subprocess.run(
        ["make", "-s", *arguments], cwd=ROOT, env={**env, **environment}, capture_output=True, text=True, timeout=60
    )


def test_make_serve_creates_a_development_token_once_and_only_without_csm_admin_token(tmp_path):
    import stat

    from csm_clients.admin_token import admin_token_from_environment

    repository = tmp_path / "build" / "model_repository"
    token_file = tmp_path / "build" / "runtime" / "admin-token"
    given = _make("admin-token", f"REPOSITORY={repository}", CSM_ADMIN_TOKEN="operator-token")
    assert given.returncode == 0 and "from the environment" in given.stdout and not token_file.parent.exists()

    created = _make("admin-token", f"REPOSITORY={repository}")
    assert created.returncode == 0, created.stderr
    assert f"created {token_file}" in created.stdout, "it says where"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{48}", token)
    assert [path.name for path in token_file.parent.iterdir()] == ["admin-token"], "no temporary left"
    again = _make("admin-token", f"REPOSITORY={repository}")
    assert again.returncode == 0 and str(token_file) in again.stdout and token_file.read_text().strip() == token
    assert admin_token_from_environment({"CSM_ADMIN_TOKEN_FILE": str(token_file)}) == token

    # make serve runs that step first and hands the server the token; make locust and
    # make gateway point the readers at the same file.
    serve = _make("-n", "serve", f"REPOSITORY={repository}").stdout
    assert serve.index("admin-token") < serve.index("csm_triton.serving serve")
    assert f'CSM_ADMIN_TOKEN="${{CSM_ADMIN_TOKEN:-$(cat {token_file})}}"' in serve
    for target in ("locust", "gateway"):
        dry_run = _make("-n", target, f"REPOSITORY={repository}").stdout
        assert f"CSM_ADMIN_TOKEN_FILE=${{CSM_ADMIN_TOKEN_FILE:-{token_file}}}" in dry_run, dry_run


def test_csm_tts_reads_the_development_token_when_csm_admin_token_is_unset(tmp_path, monkeypatch):
    from csm_clients import cli

    seen = []

    class Recorder:
        def __init__(self, url, protocol, *, admin_token, timeout):
            seen.append(admin_token)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def delete_voice(self, voice_id):
            return {"voice_id": voice_id}

    monkeypatch.setattr(cli, "VoiceCloner", Recorder)
    monkeypatch.delenv("CSM_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("CSM_ADMIN_TOKEN_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "build" / "runtime").mkdir(parents=True)
    (tmp_path / "build" / "runtime" / "admin-token").write_text("dev-token\n")
    assert cli.main(["voices", "rm", "x"]) == 0
    monkeypatch.setenv("CSM_ADMIN_TOKEN", "env-token")
    assert cli.main(["voices", "rm", "x"]) == 0
    assert cli.main(["--admin-token", "flag-token", "voices", "rm", "x"]) == 0
    assert cli.main(["--admin-token", "", "voices", "rm", "x"]) == 0  # explicitly none
    assert seen == ["dev-token", "env-token", "flag-token", ""]


def test_csm_tts_refuses_out_of_range_sampling_before_sending_it(capsys):
    from csm_clients.cli import main

    # No server at this address: a refusal here never left the machine.
    assert main(["--url", "127.0.0.1:1", "say", "Hi.", "-o", "x.wav", "--top-k", str(2**31)]) == 2
    assert capsys.readouterr().err == (
        "csm-tts say: error: --top-k: input 'TOP_K' must be in [1, 2048], got 2147483648\n"
    )
    assert main(["--url", "127.0.0.1:1", "stream", "Hi.", "-o", "x.wav", "--seed", str(2**63)]) == 2
    assert "--seed: input 'SEED' must be in [0, 9223372036854775807]" in capsys.readouterr().err


# --- conversations: Turns encoded to the CONTEXT_* tensors, refused before sending --------
def test_context_turns_become_ragged_tensors_stored_voices_first():
    first, second = tone(1.0, 16_000), tone(0.5, 16_000)
    inputs = calls.tts_inputs(
        "Hi.",
        speaker=2,
        context=[
            Turn.stored_voice("alice", speaker=1),
            Turn("Hello.", 0, first, 16_000),
            Turn("Yes?", 3, second, 16_000),
        ],
    )
    assert inputs["SPEAKER"].tolist() == [2] and inputs["CONTEXT_SPEAKER"].tolist() == [1, 0, 3]
    assert inputs["CONTEXT_VOICE_ID"].tolist() == [b"alice"] and inputs["CONTEXT_TEXT"].tolist() == [b"Hello.", b"Yes?"]
    assert inputs["CONTEXT_AUDIO_LENGTHS"].tolist() == [16_000, 8_000] and inputs["CONTEXT_SAMPLE_RATE"].tolist() == [
        16_000
    ]
    np.testing.assert_array_equal(inputs["CONTEXT_AUDIO"], np.concatenate([first, second]))  # as given, one rate
    assert {inputs[name].dtype for name in ("SPEAKER", "CONTEXT_SPEAKER", "CONTEXT_AUDIO_LENGTHS")} == {
        np.dtype(np.int32)
    }
    body = json.loads(generate_body(inputs))  # HTTP streaming: one turn is a scalar, many a list
    assert body["CONTEXT_VOICE_ID"] == "alice" and body["CONTEXT_TEXT"] == ["Hello.", "Yes?"]
    assert set(calls.tts_inputs("Hi.", speaker=0)) == {"TEXT", "SPEAKER"}


def test_clips_at_different_rates_are_sent_at_the_models_rate():
    inputs = calls.tts_inputs(
        "Hi.", context=[Turn("A.", 0, tone(1.0, 16_000), 16_000), Turn("B.", 1, tone(1.0, 8_000), 8_000)]
    )
    assert inputs["CONTEXT_SAMPLE_RATE"].tolist() == [MODEL_SAMPLE_RATE]
    assert inputs["CONTEXT_AUDIO_LENGTHS"].tolist() == [MODEL_SAMPLE_RATE, MODEL_SAMPLE_RATE]
    assert inputs["CONTEXT_AUDIO"].size == 2 * MODEL_SAMPLE_RATE


def test_a_turn_from_a_file(tmp_path):
    soundfile.write(tmp_path / "hi.wav", tone(1.0, 48_000), 48_000)
    turn = Turn.from_file(tmp_path / "hi.wav", "Hi there.", speaker=4)
    assert (turn.sample_rate, turn.speaker, turn.text) == (MODEL_SAMPLE_RATE, 4, "Hi there.")
    assert turn.seconds == pytest.approx(1.0)
    (tmp_path / "notes.wav").write_text("not audio")
    with pytest.raises(InvalidRequest, match="cannot read the context clip '.*notes.wav' as audio"):
        Turn.from_file(tmp_path / "notes.wav", "x")


def _clip(seconds=1.0, text="Said.", speaker=0):
    return Turn(text, speaker, tone(seconds, 16_000), 16_000)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"speaker": -1}, "speaker: speaker id -1; speaker ids are 0-255"),
        ({"speaker": 256}, "speaker: speaker id 256; speaker ids are 0-255"),
        ({"speaker": True}, "speaker: must be an integer speaker id, got True"),
        ({"speaker": 1.5}, "speaker: must be an integer speaker id, got 1.5"),
        ({"context": [_clip()] * 17}, "17 context turns; the limit is 16"),
        ({"context": [_clip(speaker=2**31)]}, "context turn 0: speaker: speaker id 2147483648"),
        ({"context": [_clip(), "a string"]}, "context turn 1: must be a Turn, got str"),
        ({"context": [_clip(text=None)]}, "context turn 0: has audio but no text"),
        (
            {"context": [_clip(text="x" * 2_001)]},
            "context turn 0: its text has 2001 characters; a turn's text is a string of at most 2000 characters",
        ),
        ({"context": [_clip(0.25)]}, "context turn 0: its clip is 0.25 s long; a context clip must be 0.5-30 s"),
        ({"context": [_clip(20.0)] * 4}, "the context turns hold 80.0 s of audio; the limit is 60 s"),
        ({"context": ["no audio"]}, "context turn 0: must be a Turn"),
        (
            {"context": [_clip(), Turn.stored_voice("alice")]},
            "stored-voice turns must come before the turns with clips",
        ),
        ({"context": [Turn("What?", 0)]}, "context turn 0: has no audio; every context turn needs a clip"),
        ({"context": [Turn("What?", 0, voice="alice")]}, "give either a stored voice or a text with its audio"),
        ({"context": [Turn("What?", 0, tone(1.0, 16_000).reshape(2, -1), 16_000)]}, "must be mono"),
        ({"context": [Turn("What?", 0, tone(1.0, 16_000))]}, "give the sample rate of its audio"),
    ],
)
def test_bad_conversations_are_refused_before_sending(options, message):
    with pytest.raises(InvalidRequest) as refused:
        calls.tts_inputs("Hi.", **options)
    assert message in str(refused.value)


def test_a_text_over_the_long_text_limit_is_refused_before_sending():
    assert calls.tts_inputs("word " * 4_000)["TEXT"].size == 1  # 20,000 characters: the server splits it
    with pytest.raises(InvalidRequest, match="input 'TEXT' has 20001 characters; the limit is 20000"):
        calls.tts_inputs("x" * 20_001)


def test_the_gateways_context_is_checked_before_triton(tmp_path):
    from fastapi.testclient import TestClient

    from csm_servers.gateway import create_app

    buffer = io.BytesIO()
    soundfile.write(buffer, tone(1.0, 16_000), 16_000, format="WAV")
    clip = base64.b64encode(buffer.getvalue()).decode()
    body = {"model": "tts-1", "voice": "alloy", "input": "Hi."}
    with TestClient(create_app("127.0.0.1:1", max_upload_bytes=50_000)) as client:

        def param(**extra):
            answer = client.post("/v1/audio/speech", json={**body, **extra})
            return answer.status_code, answer.json()["error"]["param"]

        good = [{"voice": "alice", "speaker": 1}, {"audio": clip, "text": "Hello.", "speaker": 255}]
        assert param(speaker=255, context=good) == (503, None)  # on to Triton, which is not there
        assert param(speaker=300) == (400, "speaker")
        assert param(context=[{"audio": clip, "text": "Hello."}] * 2) == (400, "context[1].audio")  # over 50 kB
        assert param(context=[{"audio": clip, "text": "x" * 2_001}]) == (400, "context[0].text")
        assert param(context=[{"audio": clip, "text": "Hi."}, {"voice": "alice"}]) == (400, "context")
        assert param(context=[{"voice": "alice", "audio": clip}]) == (400, "context[0]")
        assert param(context={"voice": "alice"}) == (400, "context")
        assert param(input="x" * 20_001) == (400, "input")
        refused = client.post("/clone-voice", data={"text": "Hi.", "context": '[{"voice": 5}]'})
        assert refused.status_code == 400 and refused.json() == {
            "detail": "context[0].voice: Input should be a valid string"
        }


@pytest.mark.parametrize(
    "message, voices, param",
    [
        ("csm_tts: input 'TEXT' is empty", False, "input"),
        ("missing required input 'TEXT'", False, "input"),
        ("input 'CONTEXT_TEXT' has 2 values for 3 context turns", False, "context"),
        ("input 'CONTEXT_AUDIO (turn 0)' is 0.20 s long; each clip needs at least 0.5 s", False, "context"),
        ("input 'CONTEXT_TEXT[1]' is empty", False, "context"),
        ("input 'CONTEXT_SPEAKER' has 3 values for 2 context turns", False, "context"),
        ("'CONTEXT_SAMPLE_RATE' was given without 'CONTEXT_AUDIO'", False, "context"),
        ("input 'SPEAKER' must hold exactly one value, got 2", False, "speaker"),
        ("input 'TOP_K' must be in [1, 2048], got 0", False, "top_k"),
        ("17 context turns; the limit is 16", False, "context"),
        ("unknown voice 'alice'", False, "voice"),
        ("the server is busy", False, None),
        ("input 'VOICE_ID' must match ^[a-z0-9][a-z0-9_-]{0,63}$", True, "name"),
        ("'REFERENCE_TEXT' was given without 'REFERENCE_AUDIO'", True, "transcript"),
        ("input 'REFERENCE_SAMPLE_RATE' must be one integer of at least 0, got [-1]", True, "audio_sample"),
        ("the reference clip is 31.00 s long", True, "audio_sample"),
        ("unknown voice 'alice'", True, "voice_id"),
    ],
)
def test_a_refusal_is_mapped_to_the_field_its_tensor_came_from(message, voices, param):
    from csm_servers.gateway.openai_errors import refused_param

    assert refused_param(message, voices=voices) == param
