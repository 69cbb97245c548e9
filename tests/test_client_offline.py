"""csm_clients without a server: error mapping, audio in and out, the requests it builds,
batch input parsing and the summary, the gateway's form errors (what it imports:
tests/test_layers.py)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import soundfile
from tritonclient.utils import InferenceServerException

from csm_clients import (MODEL_SAMPLE_RATE, InvalidRequest, PermissionDenied, Reference, ServerError,
                         ServerUnavailable, Speech, read_audio)
from csm_clients import calls
from csm_clients.batch import BatchItem, BatchSummary, read_items
from csm_clients.client import _generate_body
from csm_clients.errors import from_stream_message, from_triton


@pytest.mark.parametrize("status, message, kind", [
    ("400", "input 'TEXT' is empty", InvalidRequest),
    ("StatusCode.INVALID_ARGUMENT", "in ensemble 'csm_tts', input 'TOP_K' must be in [1, 2048], got 0", InvalidRequest),
    ("StatusCode.INVALID_ARGUMENT", "permission denied: wrong admin token in header 'x-csm-admin-token'",
     PermissionDenied),
    ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", ServerUnavailable),
    ("StatusCode.INTERNAL", "csm_lm: internal error (RuntimeError: boom)", ServerError),
    ("404", "Request for unknown model: 'csm_tts' is not found", ServerError),
    (None, "input 'TEMPERATURE' must be in (0, 5], got 0.0", InvalidRequest),  # a stream error: no status
    (None, "csm_tts_stream: internal error (ModelCallError: boom)", ServerError),
])
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
        "VOICE_ID": np.dtype(object), "TEMPERATURE": np.float32, "TOP_K": np.int32, "SEED": np.int64,
        "MAX_AUDIO_SECONDS": np.float32}
    inline = calls.tts_inputs("Hi.", Reference(tone(1.0, 16_000), 16_000, None))
    assert set(inline) == {"TEXT", "REFERENCE_AUDIO", "REFERENCE_SAMPLE_RATE"}, "no transcript: the server says so"
    register = calls.register_voice("bob", Reference(tone(1.0, 16_000), 16_000, "Hello."))
    assert register.admin and register.model == "voice_register" and register.inputs["REFERENCE_TEXT"][0] == b"Hello."
    assert not calls.list_voices().admin and calls.delete_voice("bob").admin


def test_generate_stream_body_is_the_json_triton_expects():
    inputs = calls.tts_inputs("Hi.", Reference(np.array([0.5, -0.25], np.float32), 16_000, "Ok."), seed=4)
    assert json.loads(_generate_body(inputs)) == {
        "TEXT": "Hi.", "REFERENCE_AUDIO": [0.5, -0.25], "REFERENCE_SAMPLE_RATE": 16_000, "REFERENCE_TEXT": "Ok.",
        "SEED": 4}


def test_batch_items_from_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text("\n".join([
        json.dumps({"id": "a", "text": "One."}),
        "",
        "{broken",
        json.dumps({"id": "a", "text": "Same id."}),
        json.dumps({"id": "../up", "text": "Unsafe id."}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"text": "No id.", "seed": 3, "voice": "alice"}),
    ]))
    items = read_items(jsonl)
    assert [(item.line, item.id) for item in items] == [(1, "a"), (3, "line-0003"), (4, "a"), (5, "../up"),
                                                       (6, "line-0006"), (7, "line-0007")]
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


@pytest.mark.parametrize("fields, message", [
    ({"text": "Hi.", "speed": 2}, "unknown field(s) speed"),
    ({"text": "Hi.", "voice": "a", "reference_audio": "me.wav"}, "not both"),
    ({"text": "Hi.", "seed": "many"}, "field 'seed' must be a number, got 'many'"),
])
def test_bad_batch_fields_are_reported(tmp_path, fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BatchItem(1, "x", fields).request(tmp_path)


def test_batch_summary_table():
    summary = BatchSummary(items=5, written=4, audio_seconds=8.0, wall_seconds=2.0,
                           failures=[(BatchItem(3, "bad"), "input 'TEXT' is empty")])
    text = summary.table()
    assert summary.real_time_factor == 0.25 and "real-time factor        0.250" in text
    assert "failed                  1" in text and "line 3 (bad): input 'TEXT' is empty" in text
    assert BatchSummary().real_time_factor is None and "real-time factor        -" in BatchSummary().table()


def test_gateway_form_errors_need_no_server():
    from fastapi.testclient import TestClient

    from csm_clients.gateway import create_app

    with TestClient(create_app("127.0.0.1:1")) as client:
        missing = client.post("/clone-voice", data={})
        assert missing.status_code == 400 and missing.json() == {"detail": "text: Field required"}
        junk = client.post("/clone-voice", data={"text": "Hi.", "reference_text": "x"},
                           files={"reference_audio": ("a.wav", b"junk", "audio/wav")})
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
