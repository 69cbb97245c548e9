"""Asking clients whether they are gone costs an IPC round trip each in Triton: the
engine spreads the questions over frames and caps them per frame, and still notices a
vanished client within a bounded number of frames."""

from __future__ import annotations

import collections

import numpy as np

from csm_triton.engine.requests import CancellationPoller, GenerationRequest, RequestHandle


def handles(count: int, asked: collections.Counter, gone: set[int] = frozenset()) -> list[RequestHandle]:
    def question(index):
        def ask():
            asked[index] += 1
            return index in gone

        return ask

    return [
        RequestHandle(
            GenerationRequest(
                np.zeros(1, np.int64), np.zeros((0, 32), np.int64), max_frames=1, is_cancelled=question(i)
            ),
            None,
        )
        for i in range(count)
    ]


def test_at_256_slots_at_most_8_questions_a_frame_and_each_slot_asked_in_turn():
    asked = collections.Counter()
    running, poller = handles(256, asked), CancellationPoller()
    for _frame in range(32):
        before = poller.polls
        poller.poll(running)
        assert poller.polls - before <= 8
    assert set(asked.values()) == {1} and len(asked) == 256  # every slot once in 32 frames, none twice


def test_a_single_stream_is_asked_every_fourth_frame_and_four_streams_one_a_frame():
    asked = collections.Counter()
    poller = CancellationPoller()
    one = handles(1, asked)
    for _ in range(12):
        poller.poll(one)
    assert asked[0] == 3
    asked.clear()
    four, poller = handles(4, asked), CancellationPoller()
    for _ in range(8):
        poller.poll(four)
    assert poller.polls == 8 and set(asked.values()) == {2}


def test_a_vanished_client_is_noticed_within_slots_over_8_frames():
    asked = collections.Counter()
    running, poller = handles(128, asked, gone={77}), CancellationPoller()
    for frame in range(1, 17):  # noqa: B007 - the frame it stopped at is checked below
        poller.poll(running)
        if running[77].cancelled:
            break
    assert running[77].cancelled and frame <= 128 // 8
    assert sum(h.cancelled for h in running) == 1
