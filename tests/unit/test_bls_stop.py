"""A BLS call given up because the server is stopping waits for its callee's last
response before it raises: once the caller's request ends, Triton 2.51 unloads the
caller, and a response that then reaches it aborts the whole server (SIGABRT,
boost::interprocess::lock_exception; seen in CI's SIGTERM test). PendingCall is driven
here with plain iterators, no Triton."""

from __future__ import annotations

import threading
import time

import pytest

from csm_triton.triton.calls import ModelUnavailable, PendingCall


def callee_that_ends_on_stop(ended: threading.Event, stop: threading.Event):
    """csm_lm on a stop: silent while generating, its error response a little after."""

    def responses():
        stop.wait(10)
        time.sleep(0.3)
        ended.set()
        yield "final error response"

    return responses


def pending(responses, stopping: bool | threading.Event, stop_drain_s: float = 5.0) -> PendingCall:
    """A call to csm_lm over `responses`, polled every 50 ms; `stopping`: whether (or the
    event that says whether) the server announced a stop."""
    stopped = stopping.is_set if isinstance(stopping, threading.Event) else lambda: stopping
    return PendingCall(
        "csm_lm",
        responses,
        60.0,
        ready=lambda _: True,
        poll_s=0.05,
        stopping=lambda grace_s=1.0: stopped(),
        stop_drain_s=stop_drain_s,
    )


def silent_callee(release: threading.Event):
    """A callee that answers only once `release` is set (at most 30 s)."""

    def responses():
        release.wait(30)
        yield "too late"

    return responses


def test_a_call_given_up_on_a_stop_raises_only_after_its_callee_answered_last():
    ended, stop = threading.Event(), threading.Event()
    call = pending(callee_that_ends_on_stop(ended, stop), stop)
    threading.Timer(0.1, stop.set).start()
    with pytest.raises(ModelUnavailable, match="shutting down"):
        call.next()
    assert ended.is_set(), "the caller gave up while its callee could still answer it"


def test_a_callee_that_never_answers_holds_a_stopping_caller_only_for_the_drain_bound():
    never = threading.Event()
    call = pending(silent_callee(never), True, stop_drain_s=0.3)
    began = time.monotonic()
    with pytest.raises(ModelUnavailable, match="shutting down"):
        call.next()
    assert 0.3 <= time.monotonic() - began < 2
    never.set()


def test_without_a_stop_a_response_is_handed_over_at_once():
    call = pending(lambda: iter(["chunk"]), False)
    assert call.next() == "chunk"
    with pytest.raises(StopIteration):
        call.next()


def test_a_call_closed_for_another_reason_during_a_stop_still_waits_for_its_callee():
    """A caller that gives up because another model refused it, or its client left, while
    the server stops: close() holds its request until the callee's last response came."""
    ended, stop = threading.Event(), threading.Event()
    call = pending(callee_that_ends_on_stop(ended, stop), stop)
    stop.set()
    call.close()
    assert ended.is_set(), "closed while the callee could still answer"


def test_a_call_closed_while_the_server_runs_does_not_wait():
    never = threading.Event()
    call = pending(silent_callee(never), False)
    began = time.monotonic()
    call.close()
    assert time.monotonic() - began < 0.5
    never.set()


def test_a_call_closed_twice_on_a_stop_waits_once():
    """The caller gives up (close) and its generator's `finally` closes again: a silent
    callee once cost the drain bound twice, 2 + 2 s of a stopping server's time."""
    release = threading.Event()
    call = pending(silent_callee(release), stopping=True, stop_drain_s=0.5)
    began = time.monotonic()
    call.close()
    call.close()
    assert 0.5 <= time.monotonic() - began < 0.9  # twice would be 1.0
    release.set()
