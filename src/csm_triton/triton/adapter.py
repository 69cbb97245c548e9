"""The one module that imports `triton_python_backend_utils`.

Every Triton model class (`csm_triton.triton.models`) subclasses `PythonModel` and implements
`initialize_model` and `handle` with plain numpy in, plain numpy out. This module
turns Triton requests into those arrays and the results (or errors) back into
responses, one request at a time, so that one bad request never fails its
batch-mates.
"""

from __future__ import annotations

import json
import logging
import threading
import traceback
from collections.abc import Mapping
from typing import Any

import numpy as np

from csm_triton.core import validation
from csm_triton.errors import InvalidInput, PermissionDenied
from csm_triton.triton import calls, metrics, stub_threads
from csm_triton.triton.calls import INTERNAL_ERROR_MARK, UNAVAILABLE_MARK, ModelCallError, ModelUnavailable
from csm_triton.triton.parameters import Parameters, parse_model_config

# Without Triton, so in modules of their own (re-exported: models and tests use them from here).
from csm_triton.triton.stub_threads import OPEN_WORK, start_parent_watchdog

try:  # Only present inside a Triton python stub.
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised in unit tests without Triton
    pb_utils = None

LOG = logging.getLogger("csm_triton")

__all__ = ["InvalidInput", "PermissionDenied", "PythonModel", "input_array", "input_texts", "request_parameters"]


def _log(level: str, message: str) -> None:
    if pb_utils is not None and hasattr(pb_utils, "Logger"):
        getattr(pb_utils.Logger, f"log_{level}")(message)
    else:
        getattr(LOG, level)(message)


def log_info(message: str) -> None:
    _log("info", message)


def log_error(message: str) -> None:
    _log("error", message)


def model_directory(args: Mapping[str, str]) -> str:
    return f"{args['model_repository']}/{args['model_version']}"


def input_array(request, name: str, *, required: bool = True) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise InvalidInput(f"missing required input '{name}'")
        return None
    return tensor.as_numpy()


def present_inputs(request, names) -> dict[str, np.ndarray]:
    """The inputs among `names` that this request carries (optional ones may be absent)."""
    inputs = {}
    for name in names:
        value = input_array(request, name, required=False)
        if value is not None:
            inputs[name] = value
    return inputs


def input_texts(request, name: str, *, required: bool = True) -> list[str] | None:
    """A BYTES input decoded as UTF-8, one string per element."""
    array = input_array(request, name, required=required)
    if array is None:
        return None
    return validation.decode_utf8(array, name)


def request_parameters(request) -> dict[str, Any]:
    """Request parameters, including headers forwarded by Triton's header patterns."""
    raw = request.parameters()
    return {str(k).lower(): v for k, v in (json.loads(raw) if raw else {}).items()}


def build_response(outputs: Mapping[str, np.ndarray]):
    tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in outputs.items()]
    return pb_utils.InferenceResponse(output_tensors=tensors)


def error_response(error: BaseException, model_name: str):
    if isinstance(error, PermissionDenied):
        # The python backend (2.51) has no PERMISSION_DENIED code (it offers UNKNOWN,
        # INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS,
        # CANCELLED). INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT) fits best: the token
        # is part of the request; UNAVAILABLE would invite clients to retry. The
        # message starts with "permission denied: " so the cause is unmistakable.
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
    if isinstance(error, InvalidInput):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
    if isinstance(error, ModelUnavailable):
        # A server fault the client did not cause and may retry (HTTP 503, gRPC
        # UNAVAILABLE); the model supervisor is reloading the model meanwhile.
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(f"{model_name}{UNAVAILABLE_MARK}{error})", pb_utils.TritonError.UNAVAILABLE)
        )
    # Anything else is our bug: log the traceback on the server, tell the client
    # only what failed.
    log_error(f"{model_name}: unexpected error\n{''.join(traceback.format_exception(error))}")
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(f"{model_name}{INTERNAL_ERROR_MARK}{type(error).__name__}: {error})")
    )


class PythonModel:
    """Base of every non-decoupled python model: per-request isolation of errors."""

    model_name = "model"

    def initialize(self, args):
        start_parent_watchdog()
        self.model_config = parse_model_config(args)
        self.model_name = args.get("model_name", self.model_name)
        OPEN_WORK.label = self.model_name
        self.parameters = Parameters(self.model_config, self.model_name)
        self.initialize_model(args, self.model_config)

    def initialize_model(self, args: Mapping[str, str], model_config: dict) -> None:
        raise NotImplementedError

    def handle(self, request) -> Mapping[str, np.ndarray]:
        raise NotImplementedError

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(build_response(self.handle(request)))
            except Exception as error:  # noqa: BLE001 - every failure becomes a response
                responses.append(error_response(error, self.model_name))
        return responses

    def finalize(self):
        pass


# --- BLS: calling other models of the same server ------------------------------------
SERVER_STOPPING_MESSAGE = "Server not ready"  # how 2.51 answers a stub's question during shutdown


# Each call is awaited with a deadline and a readiness check (csm_triton.triton.calls):
# a request to a python stub that dies is never answered in Triton 2.51.
def _bls_request(
    model_name: str,
    inputs: Mapping[str, np.ndarray],
    output_names,
    parameters=None,
    request_id: str = "",
    timeout_s: float = calls.BLS_TIMEOUT_S,
):
    tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in inputs.items()]
    kwargs = {"parameters": parameters} if parameters else {}
    if request_id:
        kwargs["request_id"] = request_id
    # `timeout` (microseconds) bounds only the wait in a dynamic batcher's queue whose
    # policy allows overrides; the caller's own wait is PendingCall's.
    return pb_utils.InferenceRequest(
        model_name=model_name,
        inputs=tensors,
        requested_output_names=list(output_names),
        timeout=int(timeout_s * 1e6),
        **kwargs,
    )


def _raise_error(response, model_name: str) -> None:
    error = response.error()
    code = error.code()
    raise calls.callee_error(
        model_name,
        error.message(),
        unavailable=code == pb_utils.TritonError.UNAVAILABLE,
        invalid_arg=code == pb_utils.TritonError.INVALID_ARG,
    )


def _outputs(response, model_name: str, output_names) -> dict[str, np.ndarray]:
    if response.has_error():
        _raise_error(response, model_name)
    # An output the response does not carry is left out (e.g. csm_lm's finish_reason,
    # on its final response only); callers index what they require.
    tensors = {name: pb_utils.get_output_tensor_by_name(response, name) for name in output_names}
    return {name: tensor.as_numpy() for name, tensor in tensors.items() if tensor is not None}


def _model_ready(model_name: str) -> bool:
    try:
        return bool(pb_utils.is_model_ready(model_name))
    except Exception as error:  # noqa: BLE001 - a failed question is no answer: keep waiting...
        # ...unless the server is shutting down: then the call will never be answered.
        return SERVER_STOPPING_MESSAGE not in str(error)


def call_model(
    model_name: str,
    inputs: Mapping[str, np.ndarray],
    output_names,
    parameters: Mapping[str, Any] | None = None,
    *,
    timeout_s: float = calls.BLS_TIMEOUT_S,
) -> dict[str, np.ndarray]:
    """One request to a non-decoupled model. Raises InvalidInput for its client error,
    ModelUnavailable when it cannot answer (see calls.BLS_TIMEOUT_S), else ModelCallError."""
    request = _bls_request(model_name, inputs, output_names, parameters, timeout_s=timeout_s)
    pending = calls.PendingCall(model_name, lambda: (request.exec(),), timeout_s, ready=_model_ready)
    try:
        response = pending.next()
    except StopIteration:  # pragma: no cover - exec() always answers once
        raise ModelCallError(f"{model_name}: no response") from None
    return _outputs(response, model_name, output_names)


def stream_model(
    model_name: str,
    inputs: Mapping[str, np.ndarray],
    output_names,
    parameters: Mapping[str, Any] | None = None,
    request_id: str = "",
    *,
    timeout_s: float = calls.BLS_TIMEOUT_S,
):
    """Responses of a decoupled model, one dict per non-empty response; timeout_s
    bounds the wait for each response, not the whole stream."""
    request = _bls_request(model_name, inputs, output_names, parameters, request_id, timeout_s=timeout_s)
    pending = calls.PendingCall(model_name, lambda: request.exec(decoupled=True), timeout_s, ready=_model_ready)
    try:
        while True:
            try:
                response = pending.next()
            except StopIteration:
                return
            if response.has_error():
                _raise_error(response, model_name)
            if not response.output_tensors():  # the empty final response
                continue
            yield _outputs(response, model_name, output_names)
    finally:
        pending.close()


# --- decoupled models: responses sent as they come -----------------------------------
class StreamSender:
    """One request's response sender. Exactly one final response is sent, whatever
    happens: `finish` or `fail` (later calls are ignored)."""

    def __init__(self, request, model_name: str, on_close=lambda: None):
        self._sender = request.get_response_sender()
        self._model_name = model_name
        self._on_close = on_close  # called once, after the final response was sent (or failed to be)
        # The model's thread and a server stop (DecoupledModel.on_server_stop) may end it at once.
        self._lock = threading.Lock()
        self.closed = False

    def send(self, outputs: Mapping[str, np.ndarray]) -> None:
        with self._lock:
            if not self.closed:
                self._sender.send(build_response(outputs))

    def finish(self, outputs: Mapping[str, np.ndarray] | None = None) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            try:
                final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
                if outputs:
                    self._sender.send(build_response(outputs), flags=final)
                else:
                    self._sender.send(flags=final)
            finally:
                self._on_close()

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            try:
                self._sender.send(
                    error_response(error, self._model_name), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
                )
            finally:
                self._on_close()

    def is_cancelled(self) -> bool:
        return self._sender.is_cancelled()


class DecoupledModel(PythonModel):
    """Base of decoupled python models: `start(request, sender)` begins the work and
    must end in sender.finish/fail (now or later, from any thread)."""

    _stop_watch: threading.Thread | None = None
    _open_streams = 0  # requests whose final response has not gone out
    _streams_lock = threading.Lock()  # one model instance per stub process

    def start(self, request, sender: StreamSender) -> None:
        raise NotImplementedError

    def has_open_work(self) -> bool:
        """Whether requests of this model still wait for their final response."""
        return self._open_streams > 0

    def on_server_stop(self) -> None:
        """Override to end the open work (each request's final response sent) when the
        server is stopping and `has_open_work` still holds C.STREAM_STOP_GRACE_S later
        (watch_server_stop; called once, on a thread of its own). serve forwards the stop
        signal to Triton once no stub has open work (stub_threads.OpenWork), at most
        C.STOP_DRAIN_LIMIT_S later. Only the model that does the work ends it (csm_lm):
        its BLS callers then fail their own requests as they would on any callee error."""

    def _stream_opened(self) -> None:
        with self._streams_lock:
            self._open_streams += 1
        OPEN_WORK.opened()

    def _stream_closed(self) -> None:
        with self._streams_lock:
            self._open_streams -= 1
        OPEN_WORK.closed()

    def execute(self, requests):
        if self._stop_watch is None and type(self).on_server_stop is not DecoupledModel.on_server_stop:
            self._stop_watch = watch_server_stop(
                self.on_server_stop, busy=self.has_open_work, model_name=self.model_name
            )
        for request in requests:
            try:
                sender = StreamSender(request, self.model_name, on_close=self._stream_closed)
            except Exception as error:  # noqa: BLE001 - no sender: nothing can answer it; the rest still run
                log_error(f"{self.model_name}: a request without a response sender: {type(error).__name__}: {error}")
                continue
            self._stream_opened()
            try:
                if calls.server_stopping(0.0):  # a stream begun now would still run as Triton unloads
                    raise ModelUnavailable("the server is shutting down")
                self.start(request, sender)
            except Exception as error:  # noqa: BLE001 - a bad request fails only itself
                try:
                    sender.fail(error)
                except Exception as send_error:  # noqa: BLE001 - its client is gone; the batch goes on
                    log_error(f"{self.model_name}: could not answer a request: {send_error}")
        return None


# --- custom metrics (served on the metrics port beside Triton's own) -----------------
def Metrics(model_name: str, **labels: str) -> metrics.Metrics:
    """metrics.Metrics over Triton's MetricFamily."""
    return metrics.Metrics(pb_utils.MetricFamily, model_name, **labels)


# --- a stopping server: csm_lm ends its streams (see stub_threads) ------------------
def watch_server_stop(on_stop, **options):
    """stub_threads.watch_server_stop, its failure logged through Triton's logger."""
    return stub_threads.watch_server_stop(on_stop, **{"log_error": log_error, **options})
