"""How a request travels to Triton, below the clients' calls: the request for the
server's limits, tensors for tritonclient, HTTP streaming over Triton's
`generate_stream` (server-sent events), the blocking client's gRPC stream, and the
reading of one gRPC stream answer.

Separate from client.py, which holds what a call is and the two clients (blocking and
asyncio) that share these helpers.
"""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping

import numpy as np
import tritonclient.grpc as grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from csm_clients import calls
from csm_clients.audio import MODEL_SAMPLE_RATE, Speech
from csm_clients.errors import ServerError, from_stream_message, from_triton

__all__ = ["config_request", "generate_body", "infer_inputs", "stream_over_grpc", "stream_over_sse", "stream_step"]


def infer_inputs(module, inputs: Mapping[str, np.ndarray]) -> list:
    tensors = []
    for name, value in inputs.items():
        tensor = module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def config_request(protocol: str, timeout: float) -> dict:
    """get_model_config()'s arguments for csm_tts, whose config holds the server's limits
    (limits.py); gRPC answers a protobuf unless as_json."""
    grpc_only = {"as_json": True, "client_timeout": timeout} if protocol == "grpc" else {}
    return {"model_name": calls.TTS_MODEL, **grpc_only}


def generate_body(inputs: Mapping[str, np.ndarray]) -> bytes:
    """Inputs as the JSON object Triton's generate extension takes: [1]-shaped tensors as
    scalars, the reference clip as a list."""
    body = {}
    for name, value in inputs.items():
        items = [item.decode("utf-8") if isinstance(item, bytes) else item.item() for item in value.ravel()]
        body[name] = items[0] if value.shape == (1,) else items
    return json.dumps(body).encode()


def stream_over_sse(url: str, inputs: Mapping[str, np.ndarray], timeout: float) -> Iterator[Speech]:
    request = urllib.request.Request(
        f"http://{url}/v2/models/{calls.STREAM_MODEL}/generate_stream",
        data=generate_body(inputs),
        headers={"Content-Type": "application/json"},
    )
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:  # the body is one event holding the message
        event = next(_sse_events(error.read().splitlines()), {})
        raise from_stream_message(event.get("error", str(error))) from None
    except OSError as error:
        raise from_triton(error, url) from None
    with response:
        for event in _sse_events(response):
            if "error" in event:
                raise from_stream_message(event["error"])
            if "AUDIO" in event or "FINISH_REASONS" in event:  # the final one: empty AUDIO, FINISH_REASONS
                yield Speech(
                    np.asarray(event.get("AUDIO", []), np.float32).reshape(-1),
                    int(np.ravel(event.get("SAMPLE_RATE", [MODEL_SAMPLE_RATE]))[0]),
                    tuple(str(r) for r in np.ravel(event.get("FINISH_REASONS", []))),
                    tuple(int(f) for f in np.ravel(event.get("SEGMENT_FRAMES", []))),
                    tuple(str(t) for t in np.ravel(event.get("NORMALIZED_TEXT", []))),
                    next((str(c) for c in np.ravel(event.get("CONTINUATION", []))), None),
                    calls.segment_times(event.get("SEGMENT_TIMES", [])),
                )


def _sse_events(lines) -> Iterator[dict]:
    return (json.loads(line[5:]) for line in lines if line.startswith(b"data:"))


def stream_over_grpc(url: str, inputs: Mapping[str, np.ndarray], timeout: float) -> Iterator[Speech]:
    """The blocking client's gRPC stream; stopping early cancels the generation."""
    # One client per stream: a tritonclient gRPC client holds one stream at a time.
    client = grpc.InferenceServerClient(url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    finished = False
    try:
        try:
            client.async_stream_infer(calls.STREAM_MODEL, infer_inputs(grpc, inputs), enable_empty_final_response=True)
        except InferenceServerException as error:  # the stream broke: its cause went to the callback
            try:
                error = answers.get(timeout=5)[1] or error
            except queue.Empty:
                pass
            raise from_triton(error, url) from None
        while not finished:
            try:
                result, error = answers.get(timeout=timeout)
            except queue.Empty:
                raise ServerError(f"no stream response within {timeout:g} s") from None
            chunk, finished = stream_step(result, error, url)
            if chunk is not None:
                yield chunk
    finally:
        client.stop_stream(cancel_requests=not finished)
        client.close()


def stream_step(result, error, url: str) -> tuple[Speech | None, bool]:
    """One gRPC stream answer -> (its audio chunk or None, whether it was the last)."""
    if error is not None:
        raise from_triton(error, url)
    response = result.get_response()
    final = response.parameters.get("triton_final_response")
    # The final response carries an empty AUDIO and FINISH_REASONS (SpeechStream keeps those).
    chunk = calls.speech_from(result) if response.outputs and result.as_numpy("AUDIO") is not None else None
    return chunk, bool(final is not None and final.bool_param)
