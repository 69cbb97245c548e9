"""Streamed decoding of codes against decoding the whole utterance at once, with the
real (tiny) Mimi decoder exported to ONNX."""

import numpy as np
import onnxruntime as ort
import pytest

from csm_triton import constants as C
from csm_triton.core.stream_decoder import StreamDecoder, snr_db


@pytest.fixture(scope="module")
def decode(tiny_checkpoint, tmp_path_factory):
    from export.mimi_onnx import export_mimi

    folder = tmp_path_factory.mktemp("mimi")
    export_mimi(tiny_checkpoint, folder / "encoder.onnx", folder / "decoder.onnx")
    session = ort.InferenceSession(str(folder / "decoder.onnx"), providers=["CPUExecutionProvider"])
    return lambda codes: session.run(None, {"audio_codes": codes.T[None].astype(np.int64)})[0][0, 0]


def stream(decode, codes, context, first=C.STREAM_FIRST_CHUNK_FRAMES, size=C.STREAM_CHUNK_FRAMES):
    decoder = StreamDecoder(decode, context)
    pieces, start = [], 0
    while start < len(codes):
        end = start + (first if start == 0 else size)
        pieces.append(decoder.push(codes[start:end]))
        start = end
    return np.concatenate(pieces)


def test_streamed_audio_matches_the_whole_decode(decode):
    codes = np.random.default_rng(0).integers(0, C.CODEBOOK_SIZE, (75, C.NUM_CODEBOOKS))  # 6 s
    whole = decode(codes)
    streamed = stream(decode, codes, C.STREAM_LEFT_CONTEXT_FRAMES)
    assert streamed.shape == whole.shape
    assert snr_db(whole, streamed) >= 30.0


def test_a_full_attention_window_of_context_reproduces_the_whole_decode(decode):
    codes = np.random.default_rng(1).integers(0, C.CODEBOOK_SIZE, (40, C.NUM_CODEBOOKS))
    streamed = stream(decode, codes, C.MIMI_ATTENTION_WINDOW_FRAMES)
    assert np.abs(streamed - decode(codes)).max() < 1e-4


def test_snr_of_identical_signals_is_infinite():
    signal = np.sin(np.arange(100.0))
    assert snr_db(signal, signal) == float("inf")
    assert 19 < snr_db(signal, signal * 1.1) < 21
