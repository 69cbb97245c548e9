"""The foundation against a real tritonserver: Mimi codec models and csm_prepare over
HTTP and gRPC, errors per request, dynamic batching, a broken model failing alone,
and the repository's manifest."""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpc
import tritonclient.http as http
from transformers import AutoProcessor
from tritonclient.utils import InferenceServerException

from csm_triton import constants as C
from export.build_repository import sha256_of
from export.mimi_onnx import load_codec

pytestmark = pytest.mark.integration
PROTOCOLS = {"http": http, "grpc": grpc}


@pytest.fixture(params=sorted(PROTOCOLS))
def protocol(request, http_client, grpc_client):
    return PROTOCOLS[request.param], {"http": http_client, "grpc": grpc_client}[request.param]


@pytest.fixture(scope="module")
def codec(tiny_checkpoint):
    return load_codec(tiny_checkpoint)


def tensor(module, name, array):
    datatype = (
        "BYTES"
        if array.dtype == object
        else {np.float32: "FP32", np.int64: "INT64", np.int32: "INT32", np.bool_: "BOOL"}[array.dtype.type]
    )
    item = module.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def start_infer(module, client, model, inputs):
    """Sends a request without waiting (tritonclient's http client is not thread-safe,
    so concurrency uses each client's own async API); returns a function that waits."""
    if module is http:
        pending = client.async_infer(model, inputs)
        return pending.get_result
    answers = queue.Queue()
    client.async_infer(model, inputs, callback=lambda result, error: answers.put((result, error)))

    def wait():
        result, error = answers.get(timeout=60)
        if error is not None:
            raise error
        return result

    return wait


def text(value: str | bytes) -> np.ndarray:
    return np.array([value.encode() if isinstance(value, str) else value], dtype=object)


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * C.SAMPLE_RATE)) / C.SAMPLE_RATE
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * 180 * t * (1 + 0.5 * t)) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def test_server_and_models_are_ready_on_both_protocols(http_client, grpc_client):
    assert http_client.is_server_live() and grpc_client.is_server_live()
    for name in ("csm_prepare", "mimi_encoder", "mimi_decoder"):
        assert http_client.is_model_ready(name) and grpc_client.is_model_ready(name)


def test_mimi_decoder_turns_codes_into_the_same_audio_as_torch(protocol, codec):
    module, client = protocol
    codes = np.random.default_rng(1).integers(0, C.CODEBOOK_SIZE, (1, C.NUM_CODEBOOKS, 25)).astype(np.int64)
    audio = client.infer("mimi_decoder", [tensor(module, "audio_codes", codes)]).as_numpy("audio_values")
    assert audio.shape == (1, 1, 25 * C.SAMPLES_PER_FRAME) and audio.dtype == np.float32
    with torch.no_grad():
        expected = codec.decode(torch.from_numpy(codes)).audio_values.numpy()
    assert np.abs(audio - expected).max() <= C.DECODER_MAX_ABS_DIFF


def test_mimi_encoder_codes_agree_with_torch(protocol, codec):
    module, client = protocol
    audio = speech_like(2.0)[None, None]
    codes = client.infer("mimi_encoder", [tensor(module, "input_values", audio)]).as_numpy("audio_codes")
    with torch.no_grad():
        expected = codec.encode(torch.from_numpy(audio)).audio_codes.numpy()
    assert codes.shape == expected.shape == (1, C.NUM_CODEBOOKS, 25)
    assert (codes == expected).mean() >= C.ENCODER_MIN_CODE_AGREEMENT


def test_csm_prepare_matches_the_csm_processor_layout(protocol, tiny_checkpoint, codec):
    module, client = protocol
    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint))
    reference = speech_like(1.0, seed=3)
    with torch.no_grad():
        reference_codes = codec.encode(torch.from_numpy(reference)[None, None]).audio_codes[0].T.numpy()
    result = client.infer(
        "csm_prepare",
        [
            tensor(module, "TEXT", text("Grüße an Zoë, 42 times!")),
            tensor(module, "REFERENCE_TEXT", text("She sells sea shells.")),
            tensor(module, "REFERENCE_AUDIO", reference),
            tensor(module, "REFERENCE_SAMPLE_RATE", np.array([C.SAMPLE_RATE], np.int32)),
        ],
    )
    conversation = [
        {
            "role": "0",
            "content": [{"type": "text", "text": "She sells sea shells."}, {"type": "audio", "path": reference}],
        },
        # TEXT as spoken (normalized by default; the reference transcript is not)
        {"role": "0", "content": [{"type": "text", "text": "Grüße an Zoë, forty two times!"}]},
    ]
    expected = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"][0]
    assert result.as_numpy("input_ids").tolist() == expected.tolist()
    prompt_codes = result.as_numpy("prompt_codes")
    assert prompt_codes.shape == reference_codes.shape
    assert (prompt_codes == reference_codes).mean() >= C.ENCODER_MIN_CODE_AGREEMENT


def test_csm_prepare_without_a_voice_has_no_audio_codes(protocol):
    module, client = protocol
    result = client.infer("csm_prepare", [tensor(module, "TEXT", text("Hello there."))])
    assert result.as_numpy("prompt_codes").shape == (0, C.NUM_CODEBOOKS)
    assert len(result.as_numpy("input_ids")) > 3


def test_csm_prepare_reads_money_as_words_unless_normalize_is_false(protocol, tiny_checkpoint):
    module, client = protocol
    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint))

    def prompt(spoken: str) -> list[int]:
        conversation = [{"role": "0", "content": [{"type": "text", "text": spoken}]}]
        return processor.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"][0].tolist()

    raw, spoken = "It costs $5.30 on Jan. 3rd.", "It costs five dollars and thirty cents on the third of january."
    default = client.infer("csm_prepare", [tensor(module, "TEXT", text(raw))])
    assert default.as_numpy("input_ids").tolist() == prompt(spoken)
    assert default.as_numpy("normalized_text").tolist() == [spoken.encode()]
    off = client.infer(
        "csm_prepare", [tensor(module, "TEXT", text(raw)), tensor(module, "NORMALIZE", np.array([False]))]
    )
    assert off.as_numpy("input_ids").tolist() == prompt(raw), "the raw text's tokens"
    assert off.as_numpy("normalized_text").tolist() == [raw.encode()]


BAD_PREPARE_INPUTS = {
    "empty text": ([("TEXT", text("   "))], "'TEXT' is empty"),
    "text over the limit": ([("TEXT", text("a" * (C.MAX_LONG_TEXT_CHARS + 1)))], f"limit is {C.MAX_LONG_TEXT_CHARS}"),
    "invalid UTF-8": ([("TEXT", text(b"caf\xe9"))], "not valid UTF-8"),
    "transcript without audio": (
        [("TEXT", text("Hi.")), ("REFERENCE_TEXT", text("Hello."))],
        "without 'REFERENCE_AUDIO'",
    ),
    "voice and reference audio": (
        [("TEXT", text("Hi.")), ("VOICE_ID", text("alice")), ("REFERENCE_AUDIO", np.zeros(24_000, np.float32))],
        "not both",
    ),
    "unknown voice": ([("TEXT", text("Hi.")), ("VOICE_ID", text("nobody-here"))], "unknown voice"),
}


@pytest.mark.parametrize("case", sorted(BAD_PREPARE_INPUTS))
def test_bad_input_gets_a_clear_error_while_a_good_request_succeeds(protocol, case):
    module, client = protocol
    inputs, message = BAD_PREPARE_INPUTS[case]
    good = start_infer(module, client, "csm_prepare", [tensor(module, "TEXT", text("Good request."))])
    bad = start_infer(module, client, "csm_prepare", [tensor(module, name, value) for name, value in inputs])
    with pytest.raises(InferenceServerException) as failure:
        bad()
    assert len(good().as_numpy("input_ids")) > 3
    assert message in failure.value.message()
    assert "Traceback" not in failure.value.message()


def test_wrong_dtype_is_refused_by_name(protocol):
    module, client = protocol
    with pytest.raises(InferenceServerException, match="audio_codes"):
        client.infer("mimi_decoder", [tensor(module, "audio_codes", np.zeros((1, 32, 4), np.float32))])


def test_mimi_decoder_batches_concurrent_requests(http_client, grpc_client):
    before = _executions(http_client, "mimi_decoder")
    codes = np.random.default_rng(2).integers(0, C.CODEBOOK_SIZE, (1, C.NUM_CODEBOOKS, 10)).astype(np.int64)
    requests = 16
    waits = [
        start_infer(grpc, grpc_client, "mimi_decoder", [tensor(grpc, "audio_codes", codes)]) for _ in range(requests)
    ]
    outputs = [wait().as_numpy("audio_values") for wait in waits]
    # Triton updates the statistics just after it answers: wait until all 16 count.
    deadline = time.monotonic() + 10
    after = _executions(http_client, "mimi_decoder")
    while after["inference_count"] - before["inference_count"] < requests and time.monotonic() < deadline:
        time.sleep(0.1)
        after = _executions(http_client, "mimi_decoder")
    # Within the export's parity bound, not bit for bit: the rows were decoded in batches
    # of different sizes, and no runtime promises a float32 reduction order independent
    # of the batch (ONNX Runtime's CPU kernels kept it bit for bit where measured, an
    # AVX-512 Xeon; GPU libraries pick kernels by shape). A batch split or padding error
    # lands far above this bound (-60 dBFS).
    for output in outputs:
        np.testing.assert_allclose(
            output, outputs[0], rtol=0, atol=C.DECODER_MAX_ABS_DIFF, err_msg="batched rows decode like single ones"
        )
    assert after["inference_count"] - before["inference_count"] == requests
    assert after["execution_count"] - before["execution_count"] < requests


def _executions(client, model):
    stats = client.get_inference_statistics(model)["model_stats"][0]
    return {"inference_count": stats["inference_count"], "execution_count": stats["execution_count"]}


def test_a_broken_model_fails_to_load_clearly_and_the_others_keep_serving(triton_server, http_client, broken_model):
    with pytest.raises(InferenceServerException, match="model.onnx"):
        http_client.load_model(broken_model, headers=triton_server.model_control_headers)
    assert not http_client.is_model_ready(broken_model)
    codes = np.zeros((1, C.NUM_CODEBOOKS, 2), np.int64)
    assert http_client.infer("mimi_decoder", [tensor(http, "audio_codes", codes)]).as_numpy("audio_values").size


def test_manifest_records_hashes_versions_and_parity(model_repository):
    manifest = json.loads((model_repository / "manifest.json").read_text())
    assert manifest["profile"] == "cpu" and manifest["onnx_opset"] == C.ONNX_OPSET
    assert manifest["packages"]["torch"].startswith("2.13.0")
    for relative, digest in manifest["artifacts_sha256"].items():
        assert sha256_of(Path(model_repository) / relative) == digest
    assert {"mimi_encoder/1/model.onnx", "mimi_decoder/1/model.onnx"} <= set(manifest["artifacts_sha256"])
    assert manifest["parity"], "parity figures are recorded"
