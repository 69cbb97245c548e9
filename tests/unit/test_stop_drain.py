"""A stop drains the streams before tritonserver hears of it. Triton 2.51 counts a
decoupled request as done when `execute` returns, so at SIGTERM it unloaded models whose
streams still sent, and crashed (SIGSEGV in TRITONBACKEND_ResponseSend, ~4 stops in 10
with a stream open); and an error response that a decoupled model sends after `execute`
returned never reaches a BLS caller, so csm_tts_stream waited for csm_lm's "shutting
down" until the deadline. Here, without Triton: the stubs' marks, serve's wait for them,
the forwarded signal, the refusal of new streams, and csm_lm's failures told on a final
response (tests/security/test_server_shutdown.py stops real servers)."""

from __future__ import annotations

import os
import signal
import threading
import time
import types

import numpy as np
import pytest

from csm_triton import constants as C
from csm_triton.serving import restart
from csm_triton.serving.teardown import announce_stop, wait_for_open_work
from csm_triton.triton import adapter, forward
from csm_triton.triton.calls import ModelCallError, ModelUnavailable, PendingCall
from csm_triton.triton.stub_threads import OpenWork


def marks(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if C.OPEN_WORK_MARKER_INFIX in path.name)


def test_a_stub_marks_its_open_work_from_the_first_open_to_the_last_close(tmp_path):
    """Synchronous, no polling: serve sees what is open the moment it looks."""
    work = OpenWork(str(tmp_path / "stopping"), label="csm_tts_stream")
    assert marks(tmp_path) == []
    work.opened()
    assert marks(tmp_path) == [f"stopping{C.OPEN_WORK_MARKER_INFIX}csm_tts_stream.{os.getpid()}"]
    work.opened()  # a BLS call of that stream
    work.closed()
    assert len(marks(tmp_path)) == 1, "unmarked while a stream is still open"
    work.closed()
    assert marks(tmp_path) == [] and work.count == 0


def test_the_mark_follows_the_count_when_threads_open_and_close_at_once(tmp_path):
    work = OpenWork(str(tmp_path / "stopping"))

    def churn():
        for _ in range(300):
            work.opened()
            work.closed()

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert work.count == 0 and marks(tmp_path) == []


def test_without_a_launcher_that_announces_stops_nothing_is_marked(tmp_path, monkeypatch):
    monkeypatch.delenv(C.STOP_FILE_ENV, raising=False)
    work = OpenWork()
    work.opened()
    assert work.count == 1 and list(tmp_path.iterdir()) == []
    work.closed()


def test_a_bls_call_is_open_work_until_its_callee_sent_its_last_response(tmp_path):
    """A response still travelling to a caller that Triton unloads aborted 2.51: the call
    counts until its pump has read the callee's last response, not until the caller gave up."""
    work, release = OpenWork(str(tmp_path / "stopping")), threading.Event()

    def responses():
        release.wait(10)
        yield "last"

    call = PendingCall("csm_lm", responses, 60.0, ready=lambda _: True, poll_s=0.01, open_work=work)
    assert work.count == 1 and len(marks(tmp_path)) == 1
    release.set()
    assert call.next() == "last"
    with pytest.raises(StopIteration):
        call.next()
    assert work.count == 0 and marks(tmp_path) == []


def test_serve_waits_for_the_marks_to_go(tmp_path):
    stop_file = tmp_path / "stopping"
    mark = tmp_path / f"stopping{C.OPEN_WORK_MARKER_INFIX}csm_tts_stream.12"
    mark.touch()
    threading.Timer(0.4, mark.unlink).start()
    waited = wait_for_open_work(stop_file, limit_s=5)
    assert 0.35 <= waited < 2


def test_serve_does_not_wait_when_nothing_is_open(tmp_path):
    assert wait_for_open_work(tmp_path / "stopping", limit_s=5) < 0.1


def test_serve_gives_up_at_the_limit_and_says_what_was_open(tmp_path):
    stop_file, lines = tmp_path / "stopping", []
    (tmp_path / f"stopping{C.OPEN_WORK_MARKER_INFIX}csm_lm.77").touch()
    waited = wait_for_open_work(stop_file, limit_s=0.2, log=lines.append)
    assert 0.2 <= waited < 1
    assert len(lines) == 1 and "csm_lm.77" in lines[0] and "anyway" in lines[0]


def test_a_second_signal_does_not_make_the_stop_look_younger(tmp_path):
    """calls.server_stopping measures the grace from the stop file's time."""
    stop_file = tmp_path / "stopping"
    announce_stop(stop_file)
    os.utime(stop_file, (1000.0, 1000.0))
    announce_stop(stop_file)
    assert stop_file.stat().st_mtime == 1000.0


class RunningProcess:
    pid = 4242

    def __init__(self):
        self.signals, self.exited = [], threading.Event()

    def poll(self):
        return 0 if self.exited.is_set() else None

    def send_signal(self, signum):
        self.signals.append((signum, time.monotonic()))
        self.exited.set()

    def wait(self):
        self.exited.wait(30)
        return 0


def runner_with(process, **options):
    runner = restart.ServerRunner(lambda: process, log=lambda line: None, **options)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    while runner.process is None:
        time.sleep(0.01)
    return runner, thread


def test_the_signal_is_forwarded_once_the_drain_returned():
    process, drained = RunningProcess(), threading.Event()
    runner, thread = runner_with(process)
    began = time.monotonic()
    runner.request_stop(signal.SIGTERM, drain=lambda: (time.sleep(0.3), drained.set()))
    assert process.signals == [], "forwarded before the streams were drained"
    thread.join(5)
    assert drained.is_set() and [s for s, _ in process.signals] == [signal.SIGTERM]
    assert process.signals[0][1] - began >= 0.3


def test_the_stop_deadline_counts_from_the_signal_not_from_the_end_of_the_drain():
    process, killed = RunningProcess(), []
    process.send_signal = lambda signum: process.signals.append(signum)  # it ignores SIGTERM
    runner, thread = runner_with(process, stop_timeout_s=0.2, kill=lambda p: (killed.append(1), p.exited.set()))
    runner.request_stop(signal.SIGTERM, drain=lambda: time.sleep(5))
    thread.join(3)
    assert killed == [1] and runner.killed_after_stop


def test_a_second_stop_signal_forwards_at_once():
    process, release = RunningProcess(), threading.Event()
    runner, thread = runner_with(process)
    runner.request_stop(signal.SIGTERM, drain=lambda: release.wait(10))
    runner.request_stop(signal.SIGINT, drain=lambda: release.wait(10))  # Ctrl-C again: no more waiting
    thread.join(2)
    release.set()
    assert process.signals and process.signals[0][0] == signal.SIGINT


# --- the stubs' side ---------------------------------------------------------------------------
class Sender:
    def __init__(self):
        self.sent = []

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))

    def is_cancelled(self):
        return False


class StreamRequest:
    def __init__(self):
        self.sender = Sender()

    def get_response_sender(self):
        return self.sender


@pytest.fixture()
def pb(monkeypatch):
    class TritonError:
        UNAVAILABLE, INTERNAL, INVALID_ARG = "UNAVAILABLE", "INTERNAL", "INVALID_ARG"

        def __init__(self, message, code="INTERNAL"):
            self.message, self.code = message, code

    fake = types.SimpleNamespace(
        TritonError=TritonError,
        InferenceResponse=lambda error: error,
        TRITONSERVER_RESPONSE_COMPLETE_FINAL=1,
    )
    monkeypatch.setattr(adapter, "pb_utils", fake)
    return fake


def test_a_decoupled_model_takes_no_new_stream_once_the_stop_is_announced(pb, monkeypatch, tmp_path):
    stop_file = tmp_path / "stopping"
    monkeypatch.setenv(C.STOP_FILE_ENV, str(stop_file))
    started = []

    class Streaming(adapter.DecoupledModel):
        model_name = "csm_tts_stream"

        def start(self, request, sender):
            started.append(sender)

    monkeypatch.setattr(adapter, "OPEN_WORK", OpenWork(str(stop_file), label="csm_tts_stream"))
    model, serving, refused = Streaming(), StreamRequest(), StreamRequest()
    model.execute([serving])
    assert len(started) == 1 and model.has_open_work() and len(marks(tmp_path)) == 1
    stop_file.touch()
    model.execute([refused])
    (error, flags), = refused.sender.sent  # fmt: skip
    assert flags == 1 and error.code == "UNAVAILABLE" and "shutting down" in error.message
    assert len(started) == 1, "a stream began after the stop was announced"
    assert model.has_open_work(), "the refused request is done; the open one is not"
    started[0].finish()
    assert not model.has_open_work() and marks(tmp_path) == []


def test_a_request_whose_answer_cannot_be_sent_fails_alone(pb, monkeypatch, tmp_path):
    monkeypatch.setattr(adapter, "OPEN_WORK", OpenWork(str(tmp_path / "stopping")))

    class Broken(StreamRequest):
        def get_response_sender(self):
            raise RuntimeError("no sender")

    class Failing(adapter.DecoupledModel):
        def start(self, request, sender):
            raise ValueError("bad request")

    model, gone, next_one = Failing(), Broken(), StreamRequest()
    model.execute([gone, next_one])
    ((error, flags),) = next_one.sender.sent
    assert flags == 1 and "bad request" in error.message
    assert not model.has_open_work() and marks(tmp_path) == []


def lm_finals(monkeypatch, final):
    monkeypatch.setattr(
        forward.triton, "stream_model", lambda *args, **kwargs: iter([{"codes": np.zeros((2, 32), np.int64)}, final])
    )
    chunks = forward.forward_lm({}, "stream-1")
    return next(chunks), chunks


def text(value: str) -> np.ndarray:
    return np.array([value.encode()], dtype=object)


@pytest.mark.parametrize(
    "reason, raised",
    [("shutdown", ModelUnavailable), ("device_failure", ModelUnavailable), ("error", ModelCallError)],
)
def test_csm_lm_failures_told_on_its_final_response_raise_for_its_caller(monkeypatch, reason, raised):
    first, chunks = lm_finals(
        monkeypatch, {"finish_reason": text(reason), "error": text("the server is shutting down")}
    )
    assert first.shape == (2, 32)  # the audio before the failure still went out
    with pytest.raises(raised, match="csm_lm: the server is shutting down"):
        next(chunks)


def test_a_generation_that_ended_well_returns_its_reason(monkeypatch):
    _, chunks = lm_finals(monkeypatch, {"finish_reason": text("end_of_speech")})
    with pytest.raises(StopIteration) as stop:
        next(chunks)
    assert stop.value.value == "end_of_speech"
