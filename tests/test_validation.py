import numpy as np
import pytest

from csm_triton import constants as C
from csm_triton.core import validation
from csm_triton.errors import InvalidInput


def test_single_text_accepts_unicode():
    assert validation.single_text(["Grüße, Zoë!"], "TEXT") == "Grüße, Zoë!"


@pytest.mark.parametrize(
    "texts, message",
    [
        (None, "missing required input 'TEXT'"),
        ([], "exactly one string"),
        (["a", "b"], "exactly one string"),
        (["   "], "'TEXT' is empty"),
        (["x" * (C.MAX_TEXT_CHARS + 1)], f"the limit is {C.MAX_TEXT_CHARS}"),
        (["a\x00b"], "NUL"),
    ],
)
def test_single_text_names_the_problem(texts, message):
    with pytest.raises(InvalidInput, match=message):
        validation.single_text(texts, "TEXT")


def test_optional_text_may_be_absent():
    assert validation.single_text(None, "REFERENCE_TEXT", required=False) is None


def test_single_string_leaves_the_content_to_whoever_checks_it():
    assert validation.single_string(["  "], "REFERENCE_TEXT") == "  "
    with pytest.raises(InvalidInput, match="exactly one string"):
        validation.single_string(["a", "b"], "REFERENCE_TEXT")
    with pytest.raises(InvalidInput, match="'REFERENCE_TEXT' is empty"):
        validation.text("  ", "REFERENCE_TEXT")


def test_audio_codes_checks_shape_range_and_dtype():
    good = np.zeros((3, C.NUM_CODEBOOKS), np.int32)
    assert validation.audio_codes(good, "c").dtype == np.int64
    with pytest.raises(InvalidInput, match=r"shape \[frames, 32\]"):
        validation.audio_codes(np.zeros((3, 31), np.int64), "c")
    with pytest.raises(InvalidInput, match="outside"):
        validation.audio_codes(np.full((1, C.NUM_CODEBOOKS), C.CODEBOOK_SIZE), "c")
    with pytest.raises(InvalidInput, match="integer"):
        validation.audio_codes(np.zeros((1, C.NUM_CODEBOOKS), np.float32), "c")
    with pytest.raises(InvalidInput, match="limit"):
        validation.audio_codes(np.zeros((5, C.NUM_CODEBOOKS), np.int64), "c", max_frames=4)


def test_max_frames_round_up_whole_frames_despite_fp32():
    assert validation.sampling_parameters(max_audio_seconds=np.array([1.0], np.float32)).max_frames == 13
    assert validation.sampling_parameters(max_audio_seconds=np.array([1.36], np.float32)).max_frames == 17
    assert validation.SamplingParameters(max_audio_seconds=0.08).max_frames == 1
