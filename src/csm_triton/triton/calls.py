"""A BLS call awaited with a deadline, and what Triton's refusals mean (no Triton import).

A BLS request sent to a python stub that then dies is never answered in Triton 2.51
(nor released: the dead model stays UNLOADING), and pb_utils.InferenceRequest's
`timeout` does not help: Triton enforces it only while a request waits in a dynamic
batcher's queue whose policy allows overrides, never during execution. So the caller
waits itself, in slices of BLS_POLL_S: between them it asks whether the called model
is still ready (the model supervisor unloads a model whose stub died, see
csm_triton.serving.supervisor) and gives up after BLS_TIMEOUT_S without a response.
A called model's error becomes the caller's exception in `callee_error`.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable

from csm_triton import constants as C
from csm_triton.errors import InvalidInput
from csm_triton.triton.stub_threads import OPEN_WORK, OpenWork

__all__ = [
    "BLS_POLL_S",
    "BLS_TIMEOUT_S",
    "STOP_DRAIN_S",
    "INTERNAL_ERROR_MARK",
    "UNAVAILABLE_MARK",
    "ModelCallError",
    "ModelUnavailable",
    "PendingCall",
    "callee_error",
    "says_unavailable",
    "server_stopping",
]

BLS_TIMEOUT_S = 300.0  # a backstop for an unsupervised server; far above any real wait
BLS_POLL_S = 0.5  # a question to the server per waiting call and slice
# How long a call given up on a stop waits for its callee's last response. A caller
# gives up STREAM_STOP_GRACE_S after the stop, as csm_lm ends its streams (plus a 0.2 s
# poll): the answer follows within a few tenths; a callee that never answers costs this.
STOP_DRAIN_S = 2.0
# What Triton 2.51 answers a BLS call for a model that cannot take it (a dead or
# stuck stub, a model unloaded or reloading, a full queue); Triton hands BLS callers
# every error as INTERNAL, so the message is all there is to go by.
UNAVAILABLE_MESSAGES = (
    "is not healthy",  # Stub process '<instance>' is not healthy.
    "Failed to obtain the health mutex",  # a stub stopped or died holding it
    "Request for unknown model",  # unloaded, reloading, never loaded
    "' is not ready",  # Model '<name>' is not ready. (exec raising)
    "Exceeds maximum queue size",
    "Request timeout expired",  # the dynamic batcher's queue timeout
)


# Every unexpected failure's message carries this (adapter.error_response)...
INTERNAL_ERROR_MARK = ": internal error ("
# ...and every "a model this one calls cannot answer now" (ModelUnavailable) this.
UNAVAILABLE_MARK = ": unavailable ("


class ModelCallError(RuntimeError):
    """A model called through BLS answered an error."""


class ModelUnavailable(RuntimeError):
    """A model called through BLS cannot answer now (its stub died, it is unloaded or
    reloading, it did not answer in time): UNAVAILABLE for the caller's client."""


def says_unavailable(message: str) -> bool:
    return any(words in message for words in UNAVAILABLE_MESSAGES)


def callee_error(model_name: str, message: str, *, unavailable: bool, invalid_arg: bool) -> Exception:
    """The exception a BLS caller raises for its callee's error response (`unavailable`,
    `invalid_arg`: the response's code is UNAVAILABLE, INVALID_ARG). A client error of the
    called model stays a client error of the caller. Triton 2.51 hands BLS callers every
    error as INTERNAL (the code is lost on the way), so our own models' failures are told
    apart by the marks error_response puts on them, and Triton's own "cannot take it
    now" errors by their words."""
    if UNAVAILABLE_MARK in message:  # already names the model that failed
        return ModelUnavailable(message)
    if unavailable:
        return ModelUnavailable(f"{model_name}: {message}")
    if INTERNAL_ERROR_MARK in message and not invalid_arg:
        return ModelCallError(f"{model_name}: {message}")
    if not invalid_arg and says_unavailable(message):
        return ModelUnavailable(f"{model_name}: {message}")
    return InvalidInput(message)


def server_stopping(grace_s: float = C.STREAM_STOP_GRACE_S) -> bool:
    """True once `csm-triton-server serve` or `run` announced a stop ($CSM_TRITON_STOP_FILE)
    at least grace_s ago. A call still waiting then will not be answered: its callee is
    being unloaded, and asking Triton whether it is ready (the usual check) can hang or
    crash the stub while the server shuts down, so the file is all that is looked at."""
    path = os.environ.get(C.STOP_FILE_ENV)
    if not path:
        return False
    try:
        return time.time() - os.stat(path).st_mtime >= grace_s
    except OSError:
        return False


class PendingCall:
    """The responses of one BLS call (`responses()` runs exec and iterates them), read on
    a thread of their own so that the caller can stop waiting: an unanswered exec()
    cannot be interrupted. After the caller stopped (close), later responses are read
    and dropped so that Triton can release the request."""

    _END = object()

    def __init__(
        self,
        model_name: str,
        responses: Callable[[], Iterable],
        timeout_s: float = BLS_TIMEOUT_S,
        *,
        ready: Callable[[str], bool],
        poll_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        stopping: Callable[..., bool] = server_stopping,  # (grace_s) -> whether a stop was announced
        stop_drain_s: float = STOP_DRAIN_S,
        open_work: OpenWork = OPEN_WORK,
    ):
        self.model_name = model_name
        self.timeout_s = timeout_s
        self._ready = ready
        self._stopping = stopping
        self._poll_s = BLS_POLL_S if poll_s is None else poll_s
        self._clock = clock
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = threading.Event()
        self._drained = threading.Event()  # the callee sent its last response (or exec failed)
        self._stop_drain_s = stop_drain_s
        # Open work of this stub until the callee's last response came: a stop waits for it.
        self._open_work = open_work
        open_work.opened()
        threading.Thread(target=self._pump, args=(responses,), name=f"bls-{model_name}", daemon=True).start()

    def _pump(self, responses) -> None:
        try:
            for response in responses():
                if not self._closed.is_set():
                    self._queue.put(response)
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            self._queue.put(error)
        else:
            self._queue.put(self._END)
        finally:
            self._drained.set()
            self._open_work.closed()

    def next(self):
        """The next response, StopIteration after the last; ModelUnavailable when the
        called model went away (not ready) or stayed silent for timeout_s."""
        deadline = self._clock() + self.timeout_s
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, min(self._poll_s, deadline - self._clock())))
            except queue.Empty:
                if self._stopping():  # checked first: no question to a stopping server
                    # The callee ends its own work on a stop (csm_lm's on_server_stop):
                    # close() waits for its last response.
                    self.close()
                    raise ModelUnavailable(f"{self.model_name} did not answer: the server is shutting down") from None
                if not self._ready(self.model_name):
                    self.close()
                    raise ModelUnavailable(
                        f"{self.model_name} is not ready: unloaded, or reloading after a failure"
                    ) from None
                if self._clock() >= deadline:
                    self.close()
                    raise ModelUnavailable(f"{self.model_name} did not answer within {self.timeout_s:g} s") from None
                continue
            if item is self._END:
                raise StopIteration
            if isinstance(item, Exception) and says_unavailable(str(item)):  # exec() itself refused
                raise ModelUnavailable(f"{self.model_name}: {item}") from item
            if isinstance(item, BaseException):
                raise item
            return item

    def close(self) -> None:
        """Stops handing responses over (later ones are read and dropped). On a stop, first
        waits (at most stop_drain_s) for the callee's last response, whatever made the
        caller give up (another model's refusal, its own client leaving): once the caller's
        request ends, Triton unloads the caller, and a BLS response reaching an unloaded
        model aborts 2.51 (boost lock_exception, SIGABRT)."""
        if self._closed.is_set():  # waited already (the caller's give-up, then its finally)
            return
        self._closed.set()
        if not self._drained.is_set() and self._stopping(0.0):
            self._drained.wait(self._stop_drain_s)
