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
# Accepted temperatures are (0, MAX_TEMPERATURE]; below this floor a request is sampled
# at the floor. Logits / 1e-45 overflow float32, the softmax turns NaN and every code
# drawn is 0 (an all-zero frame: the end of speech at once). At 1e-3 a logit lead of
# 0.01 is already e^10 : 1, so the floor samples as good as greedily.
MIN_TEMPERATURE = 1e-3
DEFAULT_TOP_K = 50
VOICE_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# Longest codec request accepted by mimi_encoder / mimi_decoder directly.
MAX_CODEC_SECONDS = 120.0
MAX_CODEC_FRAMES = int(MAX_CODEC_SECONDS * FRAME_RATE_HZ)
MAX_CODEC_SAMPLES = int(MAX_CODEC_SECONDS * SAMPLE_RATE)

# --- Conversations and long texts (csm_triton.core.conversation, core.segments) ------
# Speaker ids are the numbers in CSM's "[speaker]text" turns; the model was trained on
# a handful of them, so anything far beyond is a client mistake, not a voice.
MAX_SPEAKER_ID = 255
MAX_CONTEXT_TURNS = 16
# All context audio of one request together (CONTEXT_AUDIO + stored CONTEXT_VOICE_IDs).
MAX_CONTEXT_AUDIO_SECONDS = 60.0
# Every token of a prompt (text, audio placeholders of the voice, the context turns and,
# for a long text, the previous segment): 1536 leaves 512 positions (41 s) of the
# engine's 2048 for the generated frames (the engine refuses prompt + frames > context).
MAX_PROMPT_TOKENS = 1_536
# TEXT of csm_tts / csm_tts_stream, up to MAX_LONG_TEXT_CHARS: longer than SEGMENT_MAX_CHARS
# is split into segments at sentence boundaries (sentencex), grouped up to SEGMENT_MAX_CHARS,
# one generation each.
MAX_LONG_TEXT_CHARS = 20_000
SEGMENT_MAX_CHARS = 300
# The sentence splitter sees the text in windows of this size, and falls back to a plain
# linear scan once it has spent the budget: a splitter that is slow on some input then
# costs at most the budget plus one window, never minutes (a backtracking splitter once
# froze csm_prepare on a 400-character text).
SENTENCE_WINDOW_CHARS = 2_000
SENTENCE_SPLIT_BUDGET_SECONDS = 0.25
# Frame budget of each segment of a multi-segment text: a documented bound on how slow
# speech can be (5 characters per second, a third of a normal rate), with a floor for
# short sentences; MAX_AUDIO_SECONDS still caps every segment.
SEGMENT_SECONDS_PER_CHAR = 0.2
SEGMENT_MIN_SECONDS = 3.0
# SENTENCE_SEGMENTS (a segment per sentence): at most this many sentences, so that the
# segments' minimum budgets (SEGMENT_MIN_SECONDS each) add up to no more than 25 minutes of
# audio, the order of a packed 20,000-character text's bound (0.2 s per character).
MAX_SENTENCE_SEGMENTS = 500
# Text normalization (csm_triton.core.normalize, on unless a request's NORMALIZE is false):
# wetext reads one sentence or segment at a time, never more than this (its cost grows
# with the input: 20,000 characters in one call took 8 s) ...
NORMALIZE_MAX_CHARS = SEGMENT_MAX_CHARS
# ... one request's sentences share this budget, past which the rest is spoken as written
# (loadtest/results/normalize_cpu.md: an ordinary 20,000-character text takes well under it) ...
NORMALIZE_BUDGET_SECONDS = 2.0
# ... and the normalized text may read at most this long (numbers, dates and money in
# nearly every word read 2.2x longer, a digit soup 5x): past it, the rest is spoken as written.
NORMALIZED_TEXT_MAX_CHARS = 3 * MAX_LONG_TEXT_CHARS

# --- Streaming -------------------------------------------------------------------------
# First chunk small for time to first audio, later chunks larger for throughput.
STREAM_FIRST_CHUNK_FRAMES = 4  # 320 ms of audio
STREAM_CHUNK_FRAMES = 12  # 960 ms
# Frames of already-streamed codes decoded again before each chunk so joins are
# inaudible (Mimi's decoder is causal; see docs/performance.md for the measurement).
STREAM_LEFT_CONTEXT_FRAMES = 25

# --- Memory budget ------------------------------------------------------------------
DEFAULT_GPU_MEMORY_FRACTION = 0.85
# CPU: the row buckets each weight gets a kernel for (engine/kernels.py times MKL and
# oneDNN packed for the bucket's rows, per shape, at load). oneDNN's packed layout is
# made for a row count: one row reads fastest from a layout packed for one, 2..8+
# from one packed for 8. An engine with one slot has one bucket, so one copy.
CPU_PACKED_BATCH_SIZES = (1, 8)
# CPU kernel choice at load (engine/kernels.py): each shape's candidates are timed on a
# cycle of weights holding at least this many bytes (more than the 480 MiB last-level
# cache of the Intel Xeon measured), best of this many repeats.
CPU_KERNEL_TIMING_BYTES = 768 << 20
CPU_KERNEL_TIMING_MAX_WEIGHTS = 32  # weights under 24 MiB cycle less (the tiny model's all do)
CPU_KERNEL_TIMING_REPEATS = 3
# Per shape and bucket: small shapes repeat until the first; past the second (a busy
# machine) the timing stops whatever the repeats, to keep load time bounded.
CPU_KERNEL_TIMING_SECONDS = (0.1, 0.5)
# Smaller weights are not timed ("mkl": F.linear): call overhead, not memory traffic.
# Every CSM-1B weight is larger (the smallest, depth o_proj, is 2 MiB in bf16).
CPU_KERNEL_MIN_TIMED_BYTES = 1 << 20

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
# HTTP, gRPC and metrics listen here unless opened deliberately (--listen-address, or this
# environment variable): Triton's own default is every interface.
DEFAULT_LISTEN_ADDRESS = "127.0.0.1"
LISTEN_ADDRESS_ENV = "CSM_TRITON_LISTEN_ADDRESS"
# Triton's administrative APIs answer only callers that send this header with the key:
# loading a model runs the model.py a request may carry; shared memory reaches into the
# stubs' regions; logging and trace settings write files anywhere the server may. Not
# x-csm-*: the key must never be forwarded into a model's request parameters.
MODEL_CONTROL_KEY_HEADER = "csm-model-control-key"
MODEL_CONTROL_KEY_ENV = "CSM_MODEL_CONTROL_KEY"  # unset: a random key per start
RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")
# On SIGTERM Triton spends at most this long on open HTTP connections (idle keep-alive
# ones included), in-flight requests and unloading the models, in that order: one budget.
DEFAULT_EXIT_TIMEOUT_S = 10
# After the exit timeout, how long `csm-triton-server serve` and `run` (docker/serve.sh) wait
# before they kill the server's process group (stubs included); their default stop timeout
# is the exit timeout + this + STOP_DRAIN_LIMIT_S: 30 + 5 + 5 s in the containers, inside
# compose's 60 s and the chart's 120 s grace periods.
STOP_KILL_MARGIN_S = 5
# At SIGTERM/SIGINT `serve` and `run` create the file named here (the python stubs inherit the
# variable) and forward the signal to tritonserver once no stub marks open work, or
# STOP_DRAIN_LIMIT_S later: Triton 2.51 does not wait for decoupled requests and crashed
# unloading models whose streams still sent. No new stream is taken once the file exists;
# csm_lm's streams still open STREAM_STOP_GRACE_S later end with UNAVAILABLE, their callers'
# with them. The limit is the grace, a BLS caller's last wait (triton.calls.STOP_DRAIN_S,
# 2 s) and slack for a loaded machine.
STOP_FILE_ENV = "CSM_TRITON_STOP_FILE"
STREAM_STOP_GRACE_S = 1.0
STOP_DRAIN_LIMIT_S = 5.0
OPEN_WORK_MARKER_INFIX = ".open."

# --- Watermark (resemble-perth 1.0.1; measured in tests/model/test_watermark.py) ----------
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
# The decision watermark_detect answers (core/watermark.py; `make watermark-eval` measures
# it on a corpus generated at run time, loadtest/results/watermark_eval.md): WATERMARKED
# is SCORE >= WATERMARK_THRESHOLD. SCORE is Perth's confidence after the clip's noise
# floor is removed, and 0 for clips Perth cannot judge: Perth alone scores steady tones,
# chords, mains hum and sustained music 0.9-1.0 (as marked speech), clean speech <= 0.2.
WATERMARK_THRESHOLD = 0.45
# (0.45: on the corpus the rule was tuned on, the lowest threshold with FPR <= 1 % under
# every transform was 0.34; 0.45 keeps a margin and still finds 99 % of marked speech
# under white noise at 20 dB SNR, the hardest transform.)
# Noise floor: each frequency bin's power minus twice its 10th percentile over the clip,
# kept >= 2 % of the original (-17 dB). Lifts marked speech under white noise at 20 dB
# SNR from 92 % to 97 % detected at 0.5; clean clips move by < 0.1.
WATERMARK_NOISE_FLOOR_PERCENTILE = 10.0
WATERMARK_NOISE_FLOOR_OVERSUBTRACTION = 2.0
WATERMARK_NOISE_FLOOR_KEEP = 0.02
# Which clips Perth can judge: speech-like ones (the 10 ms energy envelope, floored 40 dB
# below its peak, has a standard deviation >= 6 dB: syllables and pauses; and the
# spectral flatness of active frames varies by >= 0.04: voiced vs unvoiced sounds; and the
# envelope is not periodic) and noise-like ones (mean flatness >= 0.3: broadband, as the
# tiny random CSM's output).
# Measured on espeak-ng speech: envelope >= 8.2 dB, flatness spread >= 0.046; steady
# tones, chords, chirps and hum stay under 4.5 dB or 0.03. Speech is not periodic: the
# envelope's autocorrelation at 0.2-1.5 s lags (at most a third of the clip) peaks <= 0.55
# on 2-6 s of speech, a drum loop or a regular melody at 0.75-1.0 (Perth scores drums
# 0.3-0.65).
WATERMARK_SPEECH_MIN_ENVELOPE_DB = 6.0
WATERMARK_SPEECH_MIN_FLATNESS_SPREAD = 0.04
WATERMARK_SPEECH_MAX_RHYTHM = 0.7
WATERMARK_NOISE_MIN_FLATNESS = 0.3

# --- The KServe v2 front (csm_servers.gateway.kserve_front) --------------------------
# The models a client may call through it unless its operator lists others. The rest are
# stages of these (csm_prepare, csm_generate, csm_lm, mimi_encoder, mimi_decoder,
# watermark): chained by hand they give cloned speech without csm_tts's watermark.
PUBLIC_MODELS = ("csm_tts", "csm_tts_stream", "voice_register", "voice_list", "voice_delete", "watermark_detect")

# --- voice ownership and the store's size --------------------------------------------------
# Who a voice write is for: a gateway forwards its caller's key id (never the key) in this
# header, with the admin token. The voice is stored as that owner's, and a deletion that
# names an owner removes only that owner's voices. No header: the admin's own write.
VOICE_OWNER_HEADER = "x-csm-voice-owner"  # forwarded by HEADER_FORWARD_PATTERN
VOICE_OWNER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
# Every process that serves voices caches every voice's codes (up to MAX_REFERENCE_SECONDS
# x FRAME_RATE_HZ x NUM_CODEBOOKS int64, 96 KiB): 256 voices are at most 24 MiB each.
# voice_register's config parameter `max_stored_voices` may lower or raise it.
MAX_STORED_VOICES = 256

# --- LoRA adapters as voices (core/adapters.py) ---------------------------------------------
# The ranks the engine applies. CSM-1B's largest adapter the engine takes (rank 64 on all
# seven projections of both stacks) is 841,728 x 64 parameters: 205.5 MiB in fp32.
MAX_ADAPTER_RANK = 64
# adapter_model.safetensors, checked before a byte of it is parsed: that largest adapter
# with room to spare (a bf16 one is half of it). The other two files are small JSON.
MAX_ADAPTER_BYTES = 256 * 2**20
MAX_ADAPTER_CONFIG_BYTES = 64 * 2**10
MAX_ADAPTER_MANIFEST_BYTES = 1 * 2**20
# How many of the stored voices may be adapters (voice_register's `max_stored_adapters`):
# they cost disk (rank 32 in fp32 is 103 MiB each), not memory (the store caches only
# their metadata). They count against MAX_STORED_VOICES too.
MAX_STORED_ADAPTERS = 64

# LoRA adapter voices served per request (engine/lora.py; csm_lm's lora_slots, lora_max_rank):
# the most adapters resident on a device at once, and the largest rank the bank is laid out for.
MAX_LORA_SLOTS = 64
MAX_LORA_RANK = 64

# --- What clients check before sending (csm_clients/limits.py) ---------------------------------
# Published in csm_tts's config as the parameter `client_limits` (this dict as a JSON object,
# written by export/model_config.py), which clients read with get_model_config: they refuse a
# value the server would refuse (and one its wire type cannot hold) without mirroring a number.
CLIENT_LIMITS_MODEL = "csm_tts"
CLIENT_LIMITS_PARAMETER = "client_limits"
CLIENT_LIMITS = {
    "MAX_TEMPERATURE": MAX_TEMPERATURE,
    "MAX_TOP_K": CODEBOOK_SIZE,
    "MAX_SEED": 2**63 - 1,  # SEED is an INT64 >= 0
    "MAX_AUDIO_SECONDS": MAX_AUDIO_SECONDS_LIMIT,
    "MAX_SPEAKER_ID": MAX_SPEAKER_ID,
    "MAX_CONTEXT_TURNS": MAX_CONTEXT_TURNS,
    "MAX_CONTEXT_AUDIO_SECONDS": MAX_CONTEXT_AUDIO_SECONDS,
    "MIN_TURN_SECONDS": MIN_REFERENCE_SECONDS,  # a context clip follows the reference clip's rule
    "MAX_TURN_SECONDS": MAX_REFERENCE_SECONDS,
    "MAX_TURN_TEXT_CHARS": MAX_TEXT_CHARS,
    "MAX_LONG_TEXT_CHARS": MAX_LONG_TEXT_CHARS,
    "SEGMENT_MAX_CHARS": SEGMENT_MAX_CHARS,
    "MAX_REFERENCE_SECONDS": MAX_REFERENCE_SECONDS,
    "MIN_INPUT_SAMPLE_RATE": MIN_INPUT_SAMPLE_RATE,
    "MAX_INPUT_SAMPLE_RATE": MAX_INPUT_SAMPLE_RATE,
    "MAX_ADAPTER_BYTES": MAX_ADAPTER_BYTES,
    "MAX_ADAPTER_CONFIG_BYTES": MAX_ADAPTER_CONFIG_BYTES,
    "MAX_ADAPTER_MANIFEST_BYTES": MAX_ADAPTER_MANIFEST_BYTES,
}
