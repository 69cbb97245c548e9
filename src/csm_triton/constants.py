"""Every number the project relies on, in one place.

The codec geometry comes from Mimi (the codec CSM-1B speaks); the limits are the
service's own and are checked in one place (`csm_triton.core.validation`).
"""

from __future__ import annotations

import re

# --- Mimi codec geometry (fixed by the model, not tunable) -----------------------
SAMPLE_RATE = 24_000
FRAME_RATE_HZ = 12.5
SAMPLES_PER_FRAME = 1_920  # SAMPLE_RATE / FRAME_RATE_HZ
NUM_CODEBOOKS = 32
CODEBOOK_SIZE = 2_048
# The LM's per-codebook vocabulary has 3 specials after the 2048 codes; they must
# never be sampled (Mimi's decoder would index out of range).
LM_AUDIO_VOCAB_SIZE = 2_051
END_OF_SPEECH_CODE = 0  # an all-zero frame ends the utterance
AUDIO_PAD_CODE = 2_050
# Mimi's decoder transformer attends 250 steps at 25 Hz = 10 s = 125 frames.
MIMI_ATTENTION_WINDOW_FRAMES = 125

# --- Prompt layout ----------------------------------------------------------------
DEFAULT_SPEAKER_ID = 0
AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_EOS_TOKEN = "<|audio_eos|>"

# --- Service limits (checked in csm_triton.core.validation) ---------------------------
MAX_TEXT_CHARS = 2_000
MAX_TEXT_TOKENS = 1_024
MAX_REFERENCE_SECONDS = 30.0
MIN_REFERENCE_SECONDS = 0.5
MIN_INPUT_SAMPLE_RATE = 8_000
MAX_INPUT_SAMPLE_RATE = 192_000
DEFAULT_MAX_AUDIO_SECONDS = 30.0
MAX_AUDIO_SECONDS_LIMIT = 90.0  # Sesame's own cap
DEFAULT_TEMPERATURE = 0.9
MAX_TEMPERATURE = 5.0
DEFAULT_TOP_K = 50
VOICE_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# Longest codec request accepted by mimi_encoder / mimi_decoder directly.
MAX_CODEC_SECONDS = 120.0
MAX_CODEC_FRAMES = int(MAX_CODEC_SECONDS * FRAME_RATE_HZ)

# --- Streaming -------------------------------------------------------------------------
# First chunk small for time to first audio, later chunks larger for throughput.
STREAM_FIRST_CHUNK_FRAMES = 4  # 320 ms of audio
STREAM_CHUNK_FRAMES = 12  # 960 ms
# Frames of already-streamed codes decoded again before each chunk so joins are
# inaudible (Mimi's decoder is causal; see docs/performance.md for the measurement).
STREAM_LEFT_CONTEXT_FRAMES = 25

# --- Memory budget ------------------------------------------------------------------
DEFAULT_GPU_MEMORY_FRACTION = 0.85
# CPU fp32: the batch sizes oneDNN weights are packed for (one copy each). One row
# reads fastest from a layout packed for one; 2..8+ rows from a layout packed for 8
# (loadtest/results/engine_full_cpu_float32.md). An engine with one slot keeps only
# the first copy.
CPU_PACKED_BATCH_SIZES = (1, 8)

# --- Export / parity thresholds ----------------------------------------------------
ONNX_OPSET = 20
PARITY_CLIP_SECONDS = (1.0, 5.0, 15.0)  # 15 s is past Mimi's 10 s attention window
PARITY_BATCH_SIZES = (1, 3)
DECODER_MAX_ABS_DIFF = 1e-3
ENCODER_MIN_CODE_AGREEMENT = 0.999

# --- Serving defaults -------------------------------------------------------------
DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
ADMIN_TOKEN_HEADER = "x-csm-admin-token"
HEADER_FORWARD_PATTERN = "x-csm-.*"

# --- Watermark (resemble-perth 1.0.1; measured in tests/test_watermark.py) ----------
# Shorter clips cannot be judged: on espeak-ng speech, 0.1-0.3 s windows of clean audio
# scored up to 0.95 (0.1 s) and 0.15 (0.3 s), watermarked ones as low as 0.01 and
# 0.89; 0.5 s windows separated cleanly (clean <= 0.01, watermarked >= 0.99).
MIN_WATERMARK_DETECT_SECONDS = 0.5
MIN_WATERMARK_DETECT_SAMPLES = int(MIN_WATERMARK_DETECT_SECONDS * SAMPLE_RATE)
# RMS below which a clip counts as silence (-80 dBFS, about three steps of 16-bit
# audio): nothing to detect. Perth's detector returns NaN on digital silence and
# scores clean audio this quiet at random (0.36 at -140 dBFS).
WATERMARK_SILENCE_RMS = 1e-4
# Anything the codec models can produce can be watermarked and checked.
MAX_WATERMARK_SECONDS = MAX_CODEC_SECONDS
