"""Captions from SEGMENT_TIMES and NORMALIZED_TEXT: SubRip and WebVTT as players read them."""

import pytest

from csm_clients.captions import captions

TIMES = [(0.0, 3.2), (3.2, 3.52), (3.52, 3.52)]
TEXTS = ["The first segment,\nas spoken.", "The second.", "Never started."]


def test_srt_numbers_cues_with_comma_milliseconds_and_skips_an_empty_segment():
    assert captions(TIMES, TEXTS, "srt") == (
        "1\n00:00:00,000 --> 00:00:03,200\nThe first segment, as spoken.\n\n"
        "2\n00:00:03,200 --> 00:00:03,520\nThe second.\n"
    )


def test_vtt_has_its_header_and_dot_milliseconds_and_speed_divides_every_time():
    assert captions(TIMES, TEXTS, "vtt", speed=2.0) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.600\nThe first segment, as spoken.\n\n"
        "00:00:01.600 --> 00:00:01.760\nThe second.\n"
    )
    assert captions([(3725.5, 3726.0)], ["Late."], "srt").startswith("1\n01:02:05,500 --> 01:02:06,000")


def test_mismatched_inputs_and_unknown_formats_are_refused():
    with pytest.raises(ValueError, match="2 segment times for 1 segment texts"):
        captions(TIMES[:2], TEXTS[:1], "srt")
    with pytest.raises(ValueError, match="srt, vtt"):
        captions(TIMES, TEXTS, "ass")
