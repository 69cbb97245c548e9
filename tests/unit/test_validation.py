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


def test_a_temperature_below_the_floor_is_sampled_at_the_floor():
    # 1e-45 is inside (0, 5]: logits / 1e-45 overflow float32 and every code drawn was 0.
    assert validation.sampling_parameters(np.array([1e-45], np.float32)).temperature == C.MIN_TEMPERATURE
    assert validation.sampling_parameters(np.array([0.5], np.float32)).temperature == 0.5
    with pytest.raises(InvalidInput, match=r"input 'TEMPERATURE' must be in \(0, 5\]"):
        validation.sampling_parameters(np.array([0.0], np.float32))


def test_codec_rules_name_the_input_and_the_range():
    codes = np.zeros((1, C.NUM_CODEBOOKS, 2), np.int64)
    assert validation.mimi_codes(codes, "audio_codes") is codes
    cases = [
        (np.full_like(codes, C.CODEBOOK_SIZE), r"holds codes outside \[0, 2048\) \(from 2048 to 2048\)"),
        (np.full_like(codes, -1), r"holds codes outside \[0, 2048\) \(from -1 to -1\)"),
        (np.zeros((1, C.NUM_CODEBOOKS, 0), np.int64), "has 0 frames; at least 1 is needed"),
        (
            np.zeros((1, C.NUM_CODEBOOKS, C.MAX_CODEC_FRAMES + 1), np.int64),
            r"has 1501 frames \(120.08 s\); the limit is 1500 frames \(120 s\)",
        ),
    ]
    for bad, message in cases:
        with pytest.raises(InvalidInput, match=f"input 'audio_codes' {message}"):
            validation.mimi_codes(bad, "audio_codes")
    assert (
        validation.mimi_audio(np.zeros((2, 1, C.MAX_CODEC_SAMPLES), np.float32), "input_values").shape[-1]
        == C.MAX_CODEC_SAMPLES
    )
    with pytest.raises(InvalidInput, match=r"has 2880001 samples \(120.0 s at 24000 Hz\); the limit is 120 s"):
        validation.mimi_audio(np.zeros((1, 1, C.MAX_CODEC_SAMPLES + 1), np.float32), "input_values")
    with pytest.raises(InvalidInput, match="holds no samples"):
        validation.mimi_audio(np.zeros((1, 1, 0), np.float32), "input_values")


# --- token ids and counts of the internal models (security review: finding B) -------------
@pytest.mark.parametrize(
    "ids, message",
    [
        (np.array([1, 2, 3, 4_000_000_000]), r"must lie in \[0, 128256\), got 4000000000 at position 3"),
        (np.array([5, -1, 7]), r"must lie in \[0, 128256\), got -1 at position 1"),
        (np.array([128_256]), r"must lie in \[0, 128256\), got 128256 at position 0"),
        (np.array([2**64 - 1], np.uint64), r"got 18446744073709551615 at position 0"),
        (np.array([1.0, 2.0]), "must be an integer tensor"),
        (np.zeros(0, np.int64), "must be a non-empty 1-D tensor"),
        (np.zeros((2, 2), np.int64), "must be a non-empty 1-D tensor"),
    ],
)
def test_token_ids_outside_the_vocabulary_are_refused_naming_the_range(ids, message):
    with pytest.raises(InvalidInput, match=message):
        validation.token_ids(ids, "input_ids", 128_256)


def test_token_ids_inside_the_vocabulary_pass_as_int64():
    ids = validation.token_ids(np.array([0, 128_255], np.int32), "input_ids", 128_256)
    assert ids.dtype == np.int64 and ids.tolist() == [0, 128_255]


def test_a_value_outside_a_2d_range_is_named_by_its_index():
    codes = np.zeros((4, C.NUM_CODEBOOKS), np.int64)
    codes[2, 5] = -3
    with pytest.raises(InvalidInput, match=r"must lie in \[0, 2048\), got -3 at position \[2, 5\]"):
        validation.integers_in_range(codes, "prompt_codes", 0, C.CODEBOOK_SIZE)


@pytest.mark.parametrize("value, expected", [(None, None), (np.array([0], np.int32), 0), (np.array([12]), 12)])
def test_counts_are_one_integer_of_at_least_zero(value, expected):
    assert validation.count(value, "chunk_frames") == expected


@pytest.mark.parametrize("value", [np.array([-1], np.int32), np.array([1, 2], np.int32), np.array([1.5])])
def test_other_counts_are_refused(value):
    with pytest.raises(InvalidInput, match="input 'chunk_frames' must be one integer of at least 0"):
        validation.count(value, "chunk_frames")
