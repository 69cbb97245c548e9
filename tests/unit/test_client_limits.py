"""The clients' limits come from the server: csm_tts's config publishes the numbers of
csm_triton.constants (its `client_limits` parameter), and a connected client, the CLI and
the gateway check a request against what their server says, not against copies."""

from __future__ import annotations

import asyncio
import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException

from csm_clients import InvalidRequest
from csm_clients.async_client import AsyncVoiceCloner
from csm_clients.client import VoiceCloner
from csm_clients.conversation import check_text
from csm_clients.limits import DEFAULT_LIMITS, Limits
from csm_triton import constants as C
from export.model_config import PROFILES, render_config
from tests.unit.test_client_offline import RIGHT_KEY, offline_gateway

CSM_TTS_CONFIG = Path(__file__).resolve().parents[2] / "model_repository" / "csm_tts" / "config.pbtxt"


def committed_config(**changed) -> model_config_pb2.ModelConfig:
    """The committed csm_tts config; `changed`: limits this server publishes otherwise."""
    config = text_format.Parse(CSM_TTS_CONFIG.read_text(), model_config_pb2.ModelConfig())
    if changed:
        parameter = config.parameters[C.CLIENT_LIMITS_PARAMETER]
        parameter.string_value = json.dumps({**json.loads(parameter.string_value), **changed})
    return config


def http_answer(config: model_config_pb2.ModelConfig) -> dict:
    """tritonclient.http's get_model_config: Triton's JSON of the config (proto field names)."""
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def grpc_answer(config: model_config_pb2.ModelConfig) -> dict:
    """tritonclient.grpc's get_model_config(as_json=True): the ModelConfigResponse as JSON."""
    response = service_pb2.ModelConfigResponse(config=config)
    return json.loads(json_format.MessageToJson(response, preserving_proto_field_name=True))


# --- the server's side: csm_tts publishes its constants -------------------------------------------
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_csm_tts_publishes_the_constants_the_server_checks_with(profile):
    text = CSM_TTS_CONFIG.read_text()
    rendered = text_format.Parse(render_config(text, profile, "csm_tts"), model_config_pb2.ModelConfig())
    published = rendered.parameters[C.CLIENT_LIMITS_PARAMETER].string_value
    assert published == committed_config().parameters[C.CLIENT_LIMITS_PARAMETER].string_value, (
        "model_repository/csm_tts/config.pbtxt's client_limits is stale: copy export.model_config.client_limits_json()"
    )
    assert (
        json.loads(published)
        == C.CLIENT_LIMITS
        == {
            "MAX_TEMPERATURE": C.MAX_TEMPERATURE,
            "MAX_TOP_K": C.CODEBOOK_SIZE,
            "MAX_SEED": np.iinfo(np.int64).max,
            "MAX_AUDIO_SECONDS": C.MAX_AUDIO_SECONDS_LIMIT,
            "MAX_SPEAKER_ID": C.MAX_SPEAKER_ID,
            "MAX_CONTEXT_TURNS": C.MAX_CONTEXT_TURNS,
            "MAX_CONTEXT_AUDIO_SECONDS": C.MAX_CONTEXT_AUDIO_SECONDS,
            "MIN_TURN_SECONDS": C.MIN_REFERENCE_SECONDS,
            "MAX_TURN_SECONDS": C.MAX_REFERENCE_SECONDS,
            "MAX_TURN_TEXT_CHARS": C.MAX_TEXT_CHARS,
            "MAX_LONG_TEXT_CHARS": C.MAX_LONG_TEXT_CHARS,
            "SEGMENT_MAX_CHARS": C.SEGMENT_MAX_CHARS,
            "MAX_REFERENCE_SECONDS": C.MAX_REFERENCE_SECONDS,
            "MIN_INPUT_SAMPLE_RATE": C.MIN_INPUT_SAMPLE_RATE,
            "MAX_INPUT_SAMPLE_RATE": C.MAX_INPUT_SAMPLE_RATE,
            "MAX_ADAPTER_BYTES": C.MAX_ADAPTER_BYTES,
            "MAX_ADAPTER_CONFIG_BYTES": C.MAX_ADAPTER_CONFIG_BYTES,
            "MAX_ADAPTER_MANIFEST_BYTES": C.MAX_ADAPTER_MANIFEST_BYTES,
        }
    )
    assert set(C.CLIENT_LIMITS) == {field.name for field in fields(Limits)}, "every published limit is read"


# --- the client's side: Limits.from_model_config ----------------------------------------------------
@pytest.mark.parametrize("answer", [http_answer, grpc_answer])
def test_the_client_reads_the_committed_config_as_tritonclient_answers_it(answer):
    # The documented defaults (offline, or a server that publishes none) are what the server publishes.
    assert Limits.from_model_config(answer(committed_config())) == DEFAULT_LIMITS


@pytest.mark.parametrize("answer", [http_answer, grpc_answer])
def test_a_servers_smaller_limit_refuses_a_text_the_default_accepts(answer):
    limits = Limits.from_model_config(answer(committed_config(MAX_LONG_TEXT_CHARS=100)))
    assert limits.MAX_LONG_TEXT_CHARS == 100 and limits.MAX_TOP_K == DEFAULT_LIMITS.MAX_TOP_K
    check_text("x" * 150)  # the documented 20,000
    with pytest.raises(InvalidRequest, match=r"^input 'TEXT' has 150 characters; the limit is 100$"):
        check_text("x" * 150, limits=limits)


@pytest.mark.parametrize(
    "config",
    [
        None,
        "csm_tts",
        [],
        {},
        {"parameters": {}},  # an older server: no client_limits
        {"parameters": {"client_limits": {}}},
        {"parameters": {"client_limits": {"string_value": "{not json"}}},
        {"parameters": {"client_limits": {"string_value": "[1, 2]"}}},
        {"parameters": {"client_limits": {"string_value": None}}},
        {"config": {"parameters": {"client_limits": {"string_value": "null"}}}},
    ],
)
def test_a_config_without_usable_limits_gives_the_documented_ones(config):
    assert Limits.from_model_config(config) == DEFAULT_LIMITS


def test_each_published_value_is_taken_only_when_it_is_a_usable_limit():
    published = {
        "MAX_TURN_SECONDS": 10,  # an integer for a float limit: taken, as a float
        "MAX_CONTEXT_TURNS": 4,
        "MAX_TOP_K": "50",  # not a number
        "MAX_SPEAKER_ID": -1,  # not positive
        "MAX_TEMPERATURE": float("inf"),  # json's Infinity
        "MAX_AUDIO_SECONDS": True,  # a bool is no number here
        "MAX_LONG_TEXT_CHARS": 2.5,  # not an integer
        "MAX_SEED": 2**64,  # past INT64: the check would let through what the conversion breaks
        "SOMETHING_NEW": 1,  # a newer server's: ignored
    }
    config = {"parameters": {"client_limits": {"string_value": json.dumps(published)}}}
    limits = Limits.from_model_config(config)
    assert (limits.MAX_TURN_SECONDS, limits.MAX_CONTEXT_TURNS) == (10.0, 4)
    assert type(limits.MAX_TURN_SECONDS) is float
    unchanged = {field.name for field in fields(Limits)} - {"MAX_TURN_SECONDS", "MAX_CONTEXT_TURNS"}
    assert {name: getattr(limits, name) for name in unchanged} == {
        name: getattr(DEFAULT_LIMITS, name) for name in unchanged
    }


def test_a_server_only_tightens_the_limits_the_gateway_bounds_its_work_with():
    """Whatever answers on the gateway's Triton address must not loosen what the gateway
    decodes or accepts: a larger maximum or a smaller minimum is read as the default."""
    published = {
        "MAX_TURN_SECONDS": 1e9,  # an hour of silence as FLAC: ~700 MB of samples per clip
        "MAX_CONTEXT_AUDIO_SECONDS": 1e9,
        "MAX_INPUT_SAMPLE_RATE": 2**31 - 1,
        "MAX_LONG_TEXT_CHARS": 10**400,  # a JSON integer math.isfinite overflows on
        "MAX_REFERENCE_SECONDS": 1e308,
        "MIN_TURN_SECONDS": 0.01,  # looser minimum
        "MIN_INPUT_SAMPLE_RATE": 10**9,  # a minimum past its maximum
        "MAX_CONTEXT_TURNS": 4,  # tighter: taken
        "MIN_TURN_SECONDS_UNUSED": 5,
    }
    config = {"parameters": {"client_limits": {"string_value": json.dumps(published)}}}
    limits = Limits.from_model_config(config)
    assert limits.MAX_CONTEXT_TURNS == 4
    assert limits == Limits(MAX_CONTEXT_TURNS=4)
    raised = {"parameters": {"client_limits": {"string_value": json.dumps({"MIN_TURN_SECONDS": 2})}}}
    assert Limits.from_model_config(raised).MIN_TURN_SECONDS == 2.0  # a tighter minimum is taken


# --- the clients read their server's limits once and check against them ----------------------------
class ConfigOnly:
    """A tritonclient client whose server publishes `config` and must never be sent a request."""

    def __init__(self, answer=None, error=None):
        self.answer, self.error, self.asked = answer, error, []

    def get_model_config(self, **arguments):
        self.asked.append(arguments)
        if self.error is not None:
            raise self.error
        return self.answer

    def infer(self, **_):
        raise AssertionError("a request the server's limits refuse was sent")


def test_the_blocking_client_reads_csm_tts_config_once_and_refuses_before_sending():
    cloner = VoiceCloner("127.0.0.1:1")
    cloner._client = server = ConfigOnly(grpc_answer(committed_config(MAX_LONG_TEXT_CHARS=100)))
    for _ in range(2):
        with pytest.raises(InvalidRequest, match="the limit is 100"):
            cloner.synthesize("x" * 150)
        with pytest.raises(InvalidRequest, match="the limit is 100"):
            cloner.stream("x" * 150)  # at the call, before any chunk
    assert server.asked == [{"model_name": "csm_tts", "as_json": True, "client_timeout": cloner.timeout}]
    http = VoiceCloner("127.0.0.1:1", "http")
    http._client = ConfigOnly(http_answer(committed_config(MAX_TOP_K=50)))
    assert http.limits().MAX_TOP_K == 50 and http._client.asked == [{"model_name": "csm_tts"}]


def test_a_server_that_cannot_be_asked_gives_the_documented_limits_and_is_asked_again():
    cloner = VoiceCloner("127.0.0.1:1")
    cloner._client = server = ConfigOnly(error=InferenceServerException("unavailable", status="StatusCode.UNAVAILABLE"))
    assert cloner.limits() is DEFAULT_LIMITS and cloner.limits() is DEFAULT_LIMITS
    assert len(server.asked) == 2
    assert VoiceCloner("127.0.0.1:1").limits() is DEFAULT_LIMITS  # nothing listens there


def test_the_async_client_checks_against_its_servers_limits():
    class AsyncConfigOnly(ConfigOnly):
        async def get_model_config(self, **arguments):
            return super().get_model_config(**arguments)

        async def close(self):
            pass

    async def scenario():
        cloner = AsyncVoiceCloner("127.0.0.1:1")
        cloner._connection = server = AsyncConfigOnly(grpc_answer(committed_config(MAX_LONG_TEXT_CHARS=100)))
        with pytest.raises(InvalidRequest, match="the limit is 100"):
            await cloner.synthesize("x" * 150)
        with pytest.raises(InvalidRequest, match="the limit is 100"):
            async for _ in cloner.stream("x" * 150):
                pass
        assert (await cloner.limits()).MAX_LONG_TEXT_CHARS == 100 and len(server.asked) == 1

    asyncio.run(scenario())


def test_csm_tts_refuses_what_its_server_refuses(monkeypatch, capsys):
    from csm_clients.cli import main

    monkeypatch.setattr(VoiceCloner, "limits", lambda self: Limits(MAX_TOP_K=50))
    assert main(["--url", "127.0.0.1:1", "say", "Hi.", "-o", "x.wav", "--top-k", "100"]) == 2
    assert capsys.readouterr().err == "csm-tts say: error: --top-k: input 'TOP_K' must be in [1, 50], got 100\n"


def test_the_gateway_refuses_what_its_server_refuses(offline_gateway, monkeypatch):
    async def limits(self):
        return Limits(MAX_TOP_K=50, MAX_SPEAKER_ID=3)

    monkeypatch.setattr(AsyncVoiceCloner, "limits", limits)
    for form, message in (
        ({"top_k": "100"}, "top_k: input 'TOP_K' must be in [1, 50], got 100"),
        ({"speaker": "4"}, "speaker: speaker id 4; speaker ids are 0-3"),
    ):
        answer = offline_gateway.post("/clone-voice", data={"text": "Hi.", **form}, headers=RIGHT_KEY)
        assert answer.status_code == 400 and answer.json()["detail"] == message, answer.text
