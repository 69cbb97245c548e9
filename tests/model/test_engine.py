"""The engine against transformers' own `generate` on the tiny checkpoint: the
correctness anchor for every optimisation in the engine."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, CsmForConditionalGeneration

from csm_triton import constants as C
from csm_triton.engine import CsmLM, EngineConfig, FinishReason, GenerationEngine, GenerationRequest
from csm_triton.engine.faults import DeviceFailure, is_fatal_device_error
from csm_triton.engine.frame_step import BucketPlan, StepBucket
from csm_triton.engine.layers import Linear
from csm_triton.errors import InvalidInput

SUPPRESSED = list(range(C.CODEBOOK_SIZE, C.LM_AUDIO_VOCAB_SIZE))
TARGETS = [
    "Hello there.",
    "How are you doing today, my friend?",
    "Five boxing wizards.",
    "The library opens at nine o'clock and closes at six in the evening on weekdays.",
]
REFERENCE_TEXT = "She sells sea shells by the sea shore."


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    return CsmForConditionalGeneration.from_pretrained(str(tiny_checkpoint)).eval()


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return AutoProcessor.from_pretrained(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def reference_audio():
    t = np.arange(int(1.0 * C.SAMPLE_RATE)) / C.SAMPLE_RATE
    return (
        0.3 * np.sin(2 * np.pi * 220 * t * (1 + t)) + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    ).astype(np.float32)


@pytest.fixture(scope="module")
def reference_codes(hf_model, reference_audio):
    with torch.no_grad():
        codes = hf_model.codec_model.encode(torch.from_numpy(reference_audio)[None, None]).audio_codes
    return codes[0].T.numpy()  # [frames, 32]


def conversation(target, reference_audio=None):
    turns = []
    if reference_audio is not None:
        turns.append(
            {
                "role": "0",
                "content": [{"type": "text", "text": REFERENCE_TEXT}, {"type": "audio", "path": reference_audio}],
            }
        )
    turns.append({"role": "0", "content": [{"type": "text", "text": target}]})
    return turns


def hf_generate(hf_model, processor, target, frames, *, reference_audio=None, seed=None):
    inputs = processor.apply_chat_template(conversation(target, reference_audio), tokenize=True, return_dict=True)
    sampling = {"do_sample": seed is not None, "depth_decoder_do_sample": seed is not None}
    if seed is not None:
        torch.manual_seed(seed)
    output = hf_model.generate(
        **inputs,
        max_new_tokens=frames,
        suppress_tokens=SUPPRESSED,
        depth_decoder_suppress_tokens=SUPPRESSED,
        **sampling,
    )
    return output[0].numpy()


def request(builder, target, frames, reference_codes=None, **options):
    prompt = builder.prepare(target, REFERENCE_TEXT if reference_codes is not None else None, reference_codes)
    options.setdefault("greedy", "seed" not in options)
    return GenerationRequest(prompt.input_ids, prompt.audio_codes, max_frames=frames, **options)


def test_prompt_layout_equals_csm_processor(builder, processor, reference_audio, reference_codes):
    inputs = processor.apply_chat_template(conversation(TARGETS[1], reference_audio), tokenize=True, return_dict=True)
    prompt = builder.prepare(TARGETS[1], REFERENCE_TEXT, reference_codes)
    assert prompt.input_ids.tolist() == inputs["input_ids"][0].tolist()
    assert len(prompt.audio_codes) == len(reference_codes) == 13  # 1 s of audio


def test_greedy_single_request_equals_generate(hf_model, processor, lm, builder, reference_audio, reference_codes):
    expected = hf_generate(hf_model, processor, TARGETS[0], 10, reference_audio=reference_audio)
    engine = GenerationEngine(lm, EngineConfig(max_slots=2))
    handle = engine.submit(request(builder, TARGETS[0], 10, reference_codes))
    engine.run_until_idle()
    result = handle.result()
    assert result.reason == FinishReason.MAX_FRAMES
    np.testing.assert_array_equal(result.codes, expected)


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
def test_four_requests_joining_at_different_frames_each_equal_generate(hf_model, processor, lm, builder, overlap):
    engine = GenerationEngine(lm, EngineConfig(max_slots=3, overlap_steps=overlap))  # the 4th waits for a free slot
    handles = []
    for index, target in enumerate(TARGETS):
        handles.append(engine.submit(request(builder, target, 6 + index, stream_every=4)))
        engine.step()
        engine.step()
    engine.run_until_idle()
    for index, (target, handle) in enumerate(zip(TARGETS, handles)):
        codes = handle.result().codes
        assert len(codes) == 6 + index
        np.testing.assert_array_equal(codes, hf_generate(hf_model, processor, target, len(codes)))


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
def test_requests_leaving_out_of_order_leave_the_others_token_identical(hf_model, processor, lm, builder, overlap):
    # Five requests of different lengths: they end (and one is cancelled) in the middle of
    # the others, so the slot in the last row keeps moving into the freed rows; a sixth
    # joins a freed row later. Every one must still equal generate frame for frame.
    engine = GenerationEngine(lm, EngineConfig(max_slots=5, max_prefills_per_step=5, overlap_steps=overlap))
    targets = TARGETS + [REFERENCE_TEXT]
    frames = [9, 3, 12, 5, 7]
    handles = [engine.submit(request(builder, target, count)) for target, count in zip(targets, frames)]
    for step in range(6):
        engine.step()
        if step == 3:
            handles[2].cancel()  # cancelled mid-generation, in the middle of the rows
    late = engine.submit(request(builder, TARGETS[1], 6))
    engine.run_until_idle()
    assert engine.slot_moves >= 2, "rows freed below the last one: the last slot moved"
    results = [handle.result(timeout=1) for handle in handles + [late]]
    assert results[2].reason == FinishReason.CANCELLED and 0 < len(results[2].codes) < 12
    assert [len(r.codes) for i, r in enumerate(results) if i != 2] == [9, 3, 5, 7, 6]
    for target, result in zip(targets + [TARGETS[1]], results):
        np.testing.assert_array_equal(result.codes, hf_generate(hf_model, processor, target, len(result.codes)))


def test_batch_buckets_never_exceed_the_slot_count_and_cover_every_step():
    # Above 32 rows, 1.5x steps: 129 rows run as 192, not 256.
    assert BucketPlan(256, 2048).batch_sizes == (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
    assert BucketPlan(256, 2048).bucket_for(129, 1, 1).batch == 192
    assert BucketPlan(512, 2048).batch_sizes[-3:] == (256, 384, 512)
    for slots in (40, 100, 300):
        ladder = BucketPlan(slots, 2048).batch_sizes
        assert ladder[-1] == slots and all(b / a <= 2 for a, b in zip(ladder, ladder[1:]))
        assert all(b / a <= 1.5 for a, b in zip(ladder, ladder[1:]) if a >= 32 and b < slots)
    assert BucketPlan(256, 2048).attention_lengths == (256, 512, 1024, 2048)
    assert BucketPlan(256, 2048, per_row_attention=True).attention_lengths == (2048,)  # the decode kernel's
    plan = BucketPlan(6, 600)
    assert plan.batch_sizes == (1, 2, 4, 6) and plan.attention_lengths == (256, 512, 600)
    assert len(plan.buckets()) == 4 * 3 * len(plan.top_k_bounds)
    buckets = set(plan.buckets())
    for count in range(1, 7):
        for length in (1, 255, 256, 257, 599, 600):
            for top_k in (1, 50, 64, 65, C.CODEBOOK_SIZE):
                bucket = plan.bucket_for(count, length, top_k)
                assert bucket in buckets, "a step outside the warmed-up buckets would pay a capture"
                assert count <= bucket.batch <= 6 and length <= bucket.attend_len and top_k <= bucket.top_k_bound
    with pytest.raises(ValueError):
        plan.bucket_for(7, 1, 1)


def test_warm_up_visits_exactly_the_configured_buckets(lm, builder):
    engine = GenerationEngine(lm, EngineConfig(max_slots=3, max_context=300))
    visited = []
    engine._prepare = visited.append  # on CUDA: a graph capture per bucket
    report = engine.warm_up()
    expected = [
        StepBucket(batch, length, bound)
        for batch in (1, 2, 3)
        for length in (256, 300)
        for bound in (64, C.CODEBOOK_SIZE)
    ]
    assert visited == report.buckets == expected
    assert not report.captured and "12 buckets" in report.summary()
    # start() warms up before serving; on the CPU that computes nothing.
    served = GenerationEngine(lm, EngineConfig(max_slots=3, max_context=300))
    served.start()
    try:
        assert served.warm_up_report.buckets == expected and served.steps == 0
        assert served.submit(request(builder, TARGETS[0], 2)).result(timeout=60).reason == FinishReason.MAX_FRAMES
    finally:
        served.stop()


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
def test_seeded_sampling_is_reproducible_and_ignores_batch_mates(lm, builder, overlap):
    def run(batch_mates, seed=1234):
        engine = GenerationEngine(lm, EngineConfig(max_slots=4, overlap_steps=overlap))
        handle = engine.submit(request(builder, TARGETS[1], 6, seed=seed))
        for index in range(batch_mates):
            engine.submit(request(builder, TARGETS[index], 6, seed=index))
        engine.run_until_idle()
        return handle.result().codes

    alone = run(0)
    np.testing.assert_array_equal(run(0), alone)
    np.testing.assert_array_equal(run(3), alone)
    assert not np.array_equal(run(0, seed=99), alone), "another seed draws other codes"


def test_sampled_codes_stay_within_each_requests_top_k(hf_model, lm, builder):
    """With top_k=1 sampling must reproduce greedy decoding exactly."""
    engine = GenerationEngine(lm, EngineConfig(max_slots=2))
    top1 = engine.submit(request(builder, TARGETS[0], 5, seed=5, top_k=1))
    greedy = engine.submit(request(builder, TARGETS[0], 5))
    engine.run_until_idle()
    np.testing.assert_array_equal(top1.result().codes, greedy.result().codes)


def test_cancelling_frees_the_slot_and_returns_the_frames_so_far(lm, builder):
    engine = GenerationEngine(lm, EngineConfig(max_slots=1))
    handle = engine.submit(request(builder, TARGETS[0], 50))
    waiting = engine.submit(request(builder, TARGETS[1], 3))
    engine.step()
    engine.step()
    assert engine.stats()["slots_in_use"] == 1 and engine.stats()["waiting"] == 1
    handle.cancel()
    engine.step()  # the cancelled request leaves, the waiting one takes its slot
    result = handle.result(timeout=1)
    assert result.reason == FinishReason.CANCELLED and len(result.codes) == 2
    engine.run_until_idle()
    assert waiting.result(timeout=1).reason == FinishReason.MAX_FRAMES
    assert engine.stats()["slots_in_use"] == 0


def test_prefix_cache_hit_yields_the_same_codes_as_a_miss(lm, builder, reference_codes):
    engine = GenerationEngine(lm, EngineConfig(max_slots=2))
    first = engine.submit(request(builder, TARGETS[2], 8, reference_codes))
    engine.run_until_idle()
    second = engine.submit(request(builder, TARGETS[2], 8, reference_codes))
    engine.run_until_idle()
    assert engine.stats()["prefix_cache_misses"] == 1 and engine.stats()["prefix_cache_hits"] == 1
    np.testing.assert_array_equal(first.result().codes, second.result().codes)


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
def test_streaming_chunks_concatenate_to_the_whole_result(lm, builder, overlap):
    engine = GenerationEngine(lm, EngineConfig(max_slots=1, overlap_steps=overlap))
    chunks = []
    engine.submit(request(builder, TARGETS[0], 7, stream_every=3), callback=chunks.append)
    engine.run_until_idle()
    assert [len(c.codes) for c in chunks] == [3, 3, 1]
    assert [c.finished for c in chunks] == [False, False, True]
    whole = GenerationEngine(lm, EngineConfig(max_slots=1))
    handle = whole.submit(request(builder, TARGETS[0], 7))
    whole.run_until_idle()
    np.testing.assert_array_equal(np.concatenate([c.codes for c in chunks]), handle.result().codes)


def test_first_chunk_is_small_then_chunks_are_larger(lm, builder):
    engine = GenerationEngine(lm, EngineConfig(max_slots=1))
    chunks = []
    engine.submit(request(builder, TARGETS[0], 12, first_chunk_frames=2, stream_every=4), callback=chunks.append)
    engine.run_until_idle()
    assert [len(c.codes) for c in chunks] == [2, 4, 4, 2]


def test_chunks_report_the_time_to_first_frame_queueing_included(lm, builder):
    engine = GenerationEngine(lm, EngineConfig(max_slots=1))
    first, queued = [], []
    engine.submit(request(builder, TARGETS[0], 4, stream_every=2), callback=first.append)
    engine.submit(request(builder, TARGETS[1], 4, stream_every=2), callback=queued.append)
    engine.run_until_idle()
    for chunks in (first, queued):
        assert len({c.time_to_first_frame for c in chunks}) == 1 and chunks[0].time_to_first_frame > 0
    # The second request waited for the only slot: its wait counts.
    assert queued[0].time_to_first_frame > first[-1].time_to_first_frame
    cancelled = engine.submit(request(builder, TARGETS[0], 4))
    cancelled.cancel()
    engine.run_until_idle()
    assert next(cancelled.chunks(timeout=1)).time_to_first_frame is None  # no frame, no time


def test_a_polled_client_disconnect_cancels_the_request(lm, builder):
    engine = GenerationEngine(lm, EngineConfig(max_slots=1))
    gone = threading.Event()
    handle = engine.submit(request(builder, TARGETS[0], 100, is_cancelled=gone.is_set))
    for _ in range(3):
        engine.step()
    gone.set()
    engine.run_until_idle()
    result = handle.result(timeout=1)
    assert result.reason == FinishReason.CANCELLED and len(result.codes) < 100
    assert engine.stats()["slots_in_use"] == 0


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
def test_all_zero_frame_ends_the_utterance(tiny_checkpoint, builder, overlap):
    model = CsmForConditionalGeneration.from_pretrained(str(tiny_checkpoint)).eval()
    with torch.no_grad():  # zero heads: every logit ties, greedy picks code 0 = end of speech
        model.lm_head.weight.zero_()
        model.depth_decoder.codebooks_head.weight.zero_()
    engine = GenerationEngine(CsmLM(model, device="cpu"), EngineConfig(max_slots=1, overlap_steps=overlap))
    handle = engine.submit(request(builder, TARGETS[0], 20))
    engine.run_until_idle()
    result = handle.result()
    assert result.reason == FinishReason.END_OF_SPEECH and len(result.codes) == 0


def test_background_thread_serves_concurrent_submitters_and_stops_cleanly(lm, builder):
    engine = GenerationEngine(lm, EngineConfig(max_slots=2))
    engine.start()
    results = {}

    def client(index):
        results[index] = engine.submit(request(builder, TARGETS[index], 4, seed=index)).result(timeout=60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    never_served = engine.submit(request(builder, TARGETS[0], 10_000 // 20))
    engine.stop()
    assert all(results[i].reason == FinishReason.MAX_FRAMES and len(results[i].codes) == 4 for i in range(4))
    assert never_served.result(timeout=5).reason in (FinishReason.SHUTDOWN, FinishReason.MAX_FRAMES)
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit(request(builder, TARGETS[0], 2))


def test_requests_beyond_the_context_are_refused_with_a_reason(lm, builder):
    engine = GenerationEngine(lm, EngineConfig(max_slots=1, max_context=64))
    with pytest.raises(InvalidInput, match="exceeds the context of 64 positions"):
        engine.submit(request(builder, TARGETS[3], 60))
    with pytest.raises(InvalidInput, match="max_frames"):
        engine.submit(request(builder, TARGETS[0], 0))


@pytest.mark.parametrize("rows", [1, 2, 8, 40])
def test_packed_linear_equals_f_linear_for_every_row_count(rows):
    # The frame step picks a oneDNN packing by row count; every choice must compute
    # the same product (fp32 rounding aside) as the unpacked weight.
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64), torch.randn(96)
    x = torch.randn(rows, 64)
    packed = Linear(weight, bias)
    packed.use({size: "onednn" for size in C.CPU_PACKED_BATCH_SIZES})
    assert packed.weight is None and [size for size, _ in packed.packings] == sorted(C.CPU_PACKED_BATCH_SIZES)
    torch.testing.assert_close(packed(x), torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_a_one_slot_engine_keeps_one_packing_per_weight(tiny_checkpoint):
    lm = CsmLM.from_checkpoint(tiny_checkpoint, device="cpu", max_batch=1, cpu_kernels="onednn")
    assert [size for size, _ in lm.backbone.layers[0].gate_up.packings] == [1]
    assert [size for size, _ in lm.depth_heads[0].packings] == [1]


# --- bad ids and a broken device (security review: findings B and C) -------------------
def test_ids_and_codes_outside_their_ranges_are_refused_before_any_work(lm, builder):
    engine = GenerationEngine(lm, EngineConfig(max_slots=1))
    good = request(builder, TARGETS[0], 2)
    for bad_id, position in ((4_000_000_000, 3), (-1, 0), (lm.text_vocab_size, 5)):
        ids = np.array(good.input_ids, np.int64)
        ids[position] = bad_id
        expected = rf"input 'input_ids' must lie in \[0, {lm.text_vocab_size}\), got {bad_id} at position {position}"
        with pytest.raises(InvalidInput, match=expected):
            engine.submit(GenerationRequest(ids, good.audio_codes, max_frames=2))
    placeholders = int(np.count_nonzero(np.asarray(good.input_ids) == lm.audio_token_id))
    voiced = request(builder, TARGETS[0], 2, np.zeros((3, C.NUM_CODEBOOKS), np.int64))
    codes = np.array(voiced.audio_codes)
    codes[1, 7] = C.CODEBOOK_SIZE
    with pytest.raises(InvalidInput, match=r"prompt_codes' holds codes outside \[0, 2048\)"):
        engine.submit(GenerationRequest(voiced.input_ids, codes, max_frames=2))
    assert placeholders == 0 and not engine.has_work(), "nothing refused was queued"
    handle = engine.submit(good)  # and the engine serves on
    engine.run_until_idle()
    assert handle.result(timeout=1).reason == FinishReason.MAX_FRAMES


CUDA_ERRORS = {
    "device-side assert": lambda: RuntimeError(
        "CUDA error: device-side assert triggered\nCUDA kernel errors "
        "might be asynchronously reported at some other API call"
    ),
    "AcceleratorError": lambda: torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    "raised from one": lambda: _chained(ValueError("copy failed"), RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED")),
}


def _chained(outer: Exception, cause: Exception) -> Exception:
    outer.__cause__ = cause
    return outer


def failing_after(method, calls: int, make_error):
    """`method`, raising make_error() from its call number `calls` on."""
    count = [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] >= calls:
            raise make_error()
        return method(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("error", CUDA_ERRORS, ids=list(CUDA_ERRORS))
def test_a_cuda_error_in_a_frame_step_answers_everyone_then_calls_the_exit_hook(lm, builder, error):
    engine = GenerationEngine(lm, EngineConfig(max_slots=2, warm_up=False))
    engine._launch_frame_step = failing_after(engine._launch_frame_step, 3, CUDA_ERRORS[error])
    finals, exited = {}, []
    engine.on_fatal = lambda failure: exited.append(dict(finals))
    for i in range(3):  # 2 running, 1 waiting
        engine.submit(request(builder, TARGETS[i], 40), callback=lambda chunk, i=i: finals.setdefault(i, chunk))
    engine.start()
    engine._thread.join(60)
    assert not engine._thread.is_alive(), "the engine thread ends: no later step may touch the device"
    assert len(exited) == 1 and len(exited[0]) == 3, "the exit hook runs once, after every request was answered"
    assert [finals[i].reason for i in range(3)] == [FinishReason.DEVICE_FAILURE] * 3
    assert all("device failed" in chunk.error and "retry" in chunk.error for chunk in finals.values())
    assert len(finals[0].codes) == 2, "the frames made before the failure still reach the client"
    with pytest.raises(DeviceFailure, match="device failed"):
        engine.submit(request(builder, TARGETS[0], 2))
    engine.stop()


def test_a_cuda_error_in_a_prefill_is_fatal_too(lm, builder):
    # One prompt per step, so the second request's prefill is a call of its own.
    engine = GenerationEngine(lm, EngineConfig(max_slots=2, warm_up=False, max_prefills_per_step=1))
    engine._prefill_together = failing_after(engine._prefill_together, 2, CUDA_ERRORS["device-side assert"])
    exited = []
    engine.on_fatal = exited.append
    handles = [engine.submit(request(builder, TARGETS[i], 40)) for i in range(2)]
    engine.start()
    assert [h.result(timeout=60).reason for h in handles] == [FinishReason.DEVICE_FAILURE] * 2, (
        "the request whose prefill failed is answered too, not lost"
    )
    engine._thread.join(60)  # answered first (delivered), then the exit hook, then the thread ends
    assert len(exited) == 1
    engine.stop()


def test_an_ordinary_error_fails_only_its_batch_and_the_engine_serves_on(lm, builder):
    engine = GenerationEngine(lm, EngineConfig(max_slots=2, warm_up=False))
    step = engine._launch_frame_step
    calls = [0]

    def once_broken(slots):
        calls[0] += 1
        if calls[0] == 2:
            raise IndexError("index 7 is out of bounds for dimension 0 with size 2")
        return step(slots)

    engine._launch_frame_step = once_broken
    exited = []
    engine.on_fatal = exited.append
    engine.start()
    failed = engine.submit(request(builder, TARGETS[0], 5)).result(timeout=60)
    served = engine.submit(request(builder, TARGETS[1], 3)).result(timeout=60)
    engine.stop()
    assert failed.reason == FinishReason.ERROR and "IndexError" in failed.error
    assert served.reason == FinishReason.MAX_FRAMES and len(served.codes) == 3
    assert exited == [] and engine.device_failure is None


@pytest.mark.parametrize(
    "error, fatal",
    [
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), True),
        (torch.AcceleratorError("CUDA error: unspecified launch failure"), True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("The size of tensor a (3) must match the size of tensor b (4)"), False),
        (IndexError("index 4000000000 is out of bounds for dimension 0 with size 10"), False),
        (ValueError("CUDA error: but not a RuntimeError, so not the runtime's"), False),
    ],
)
def test_which_errors_end_the_process(error, fatal):
    assert is_fatal_device_error(error) is fatal
