"""The engine on a CUDA device (`pytest -m gpu`; skipped without CUDA): the frame step
replayed as a CUDA graph computes what the eager step computes, the rotary tables built
on the device are fp32's rounded once, bf16 draws fp32's first greedy codes, and the KV
slots follow gpu_memory_fraction. (The instance on another GPU, a real device error and
seeds: test_engine_gpu_instance.py.)

`loadtest.gpu_check` runs this file with CSM_GPU_TEST_MODEL=full (the bf16/fp32
comparison on CSM-1B's full shape; default: the tiny checkpoint) and
CSM_GPU_TEST_REPORT=<file>, where the figures are written as JSON for its summary
(the gpu_report fixture, tests/model/conftest.py).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from csm_triton import constants as C
from csm_triton.engine import CsmLM, EngineConfig, GenerationEngine, GenerationRequest
from csm_triton.engine.capacity import WARM_UP_SHARE_OF_SLOT, DeviceMemory, plan_slots
from csm_triton.engine.frame_step import TOP_K_BOUNDS, FrameStep
from csm_triton.engine.layers import KVCache
from csm_triton.engine.sampling import SamplerState

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]

# (batch bucket, attention length): a single stream, small and large batches, every
# attention bucket up to the tiny model's 2048 positions.
BUCKETS = [(1, 256), (2, 256), (4, 512), (8, 1024), (16, 2048)]
PRECISION_FRAMES = 64
# 16 requests, 40..100 prompt tokens: the bf16/fp32 bound below counts their first codes.
PRECISION_PROMPT_LENGTHS = list(range(40, 101, 4))


@pytest.fixture(scope="module")
def tiny_lm(tiny_checkpoint):
    return CsmLM.from_checkpoint(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)


# --- CUDA graph replay vs the eager step ---------------------------------------------------
@dataclass
class StepState:
    cache: KVCache
    depth_cache: KVCache
    hidden: torch.Tensor

    def clone(self) -> StepState:
        return StepState(
            KVCache(self.cache.k.clone(), self.cache.v.clone()),
            KVCache(self.depth_cache.k.clone(), self.depth_cache.v.clone()),
            self.hidden.clone(),
        )


def random_state(lm: CsmLM, batch: int, attend_len: int, seed: int) -> StepState:
    """A KV cache full of earlier context and hidden states, as the engine holds them
    mid-generation for `batch` slots (rows 0..batch-1)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    cache = lm.new_backbone_cache(batch, attend_len)
    for tensor in (cache.k, cache.v):
        tensor.copy_(torch.randn(tensor.shape, device="cuda", generator=generator))
    hidden = torch.randn(batch, lm.backbone_hidden_size, device="cuda", generator=generator).to(lm.dtype)
    return StepState(cache, lm.new_depth_cache(batch), hidden)


def new_frame_step(lm: CsmLM, state: StepState, batch: int, attend_len: int, capture: bool) -> FrameStep:
    return FrameStep(
        lm,
        state.cache,
        state.depth_cache,
        state.hidden,
        batch=batch,
        attend_len=attend_len,
        top_k_bound=TOP_K_BOUNDS[0],
        capture=capture,
    )


def set_rows(step: FrameStep, count: int, positions: torch.Tensor, frame: int) -> None:
    """`count` active rows (half greedy, half sampled at top-k 50, each its own seed), as
    the engine loads them (FrameStep.load_rows; the free rows after them too)."""
    samplers = [
        SamplerState.create(temperature=0.9, top_k=C.DEFAULT_TOP_K, greedy=row % 2 == 0, seed=1000 + row)
        for row in range(count)
    ]
    step.load_rows(
        [
            sampler.row(int(position), frame, step.top_k_bound)
            for sampler, position in zip(samplers, positions.tolist())
        ],
        [sampler.temperature for sampler in samplers],
    )


@pytest.mark.parametrize("batch,attend_len", BUCKETS)
def test_cuda_graph_replay_equals_the_eager_frame_step(tiny_lm, gpu_report, batch, attend_len):
    graph_state = random_state(tiny_lm, batch, attend_len, seed=batch)
    eager_state = graph_state.clone()
    graphed = new_frame_step(tiny_lm, graph_state, batch, attend_len, capture=True)
    eager = new_frame_step(tiny_lm, eager_state, batch, attend_len, capture=False)
    assert graphed.graph is not None and eager.graph is None
    # Capturing (its warm-up runs) must leave the state as it found it.
    assert torch.equal(graph_state.hidden, eager_state.hidden)
    assert torch.equal(graph_state.cache.k, eager_state.cache.k)

    count = max(1, batch - 1)  # a partly filled bucket: one free row when there is room
    # Rows at different depths, the deepest attending the whole bucket by the second frame.
    positions = (attend_len - 2 - 5 * torch.arange(count, device="cuda")).clamp(min=0)
    hidden_difference = 0.0
    for frame in range(2):  # the second replay reads what the first one wrote
        for step in (graphed, eager):
            set_rows(step, count, positions + frame, frame)
            step.run()
        torch.cuda.synchronize()
        assert torch.equal(graphed.codes[:count], eager.codes[:count]), f"frame {frame}: codes differ"
        hidden_difference = max(
            hidden_difference,
            float((graph_state.hidden[:count].float() - eager_state.hidden[:count].float()).abs().max()),
        )
    assert torch.equal(graph_state.cache.k[:, :count], eager_state.cache.k[:, :count])
    assert hidden_difference == 0.0
    gpu_report.setdefault("cuda_graph_vs_eager", []).append(
        {
            "batch": batch,
            "attend_len": attend_len,
            "active_rows": count,
            "dtype": "bfloat16",
            "codes_equal": True,
            "hidden_max_abs_difference": hidden_difference,
        }
    )


# --- the fused Triton kernels vs their eager forms ----------------------------------------
def test_fused_kernels_on_cuda_draw_the_eager_forms_codes_in_fp32(tiny_checkpoint, gpu_report):
    """On CUDA the frame step runs the Triton kernels (engine/fused.py); the eager forms are
    what the CPU runs and what was held to transformers. In fp32, two frames of 8 rows
    (half sampled) from the same state: the same codes, hidden states within fp32 noise."""
    from csm_triton.engine import fused

    lm = CsmLM.from_checkpoint(tiny_checkpoint, device="cuda", dtype=torch.float32)
    fused_state = random_state(lm, 8, 256, seed=7)
    eager_state = fused_state.clone()
    steps = {
        "fused": new_frame_step(lm, fused_state, 8, 256, capture=False),
        "eager": new_frame_step(lm, eager_state, 8, 256, capture=False),
    }
    positions = 200 - 7 * torch.arange(8, device="cuda")
    for frame in range(2):
        for name, step in steps.items():
            set_rows(step, 8, positions + frame, frame)
            if name == "eager":
                with fused.eager_forms_only():
                    step.run()
            else:
                step.run()
        torch.cuda.synchronize()
        assert torch.equal(steps["fused"].codes, steps["eager"].codes), f"frame {frame}: codes differ"
    difference = float((fused_state.hidden - eager_state.hidden).abs().max())
    assert difference < 1e-3
    gpu_report["fused_vs_eager_fp32"] = {"codes_equal": True, "hidden_max_abs_difference": difference}


# --- bf16 vs fp32 --------------------------------------------------------------------------
def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    # Ids from 4 up: the tiny tokenizer's specials (bos, eos, audio, audio_eos) are 0..3.
    rng = np.random.default_rng(seed)
    return [np.concatenate([[0], rng.integers(4, vocab, length - 1)]) for length in lengths]


def greedy_codes(lm: CsmLM, prompts: list[np.ndarray], frames: int) -> list[np.ndarray]:
    engine = GenerationEngine(lm, EngineConfig(max_slots=len(prompts), max_context=256))
    handles = [
        engine.submit(GenerationRequest(p, np.zeros((0, C.NUM_CODEBOOKS), np.int64), max_frames=frames, greedy=True))
        for p in prompts
    ]
    engine.run_until_idle()
    return [handle.result().codes for handle in handles]


def precision_model(tiny_checkpoint):
    """CSM-1B's full shape with random weights (CSM_GPU_TEST_MODEL=full), else the tiny checkpoint."""
    if os.environ.get("CSM_GPU_TEST_MODEL", "tiny") == "full":
        from export.tiny_checkpoint import build_tokenizer
        from loadtest.gpu_steps import full_size_config, random_language_model

        return "CSM-1B shape, random weights", random_language_model(full_size_config(build_tokenizer()), device="cuda")
    from transformers import CsmForConditionalGeneration

    model = CsmForConditionalGeneration.from_pretrained(str(tiny_checkpoint))
    model.codec_model = None
    return "tiny checkpoint", model.to("cuda").eval()


def transformers_bf16(model, tiny_checkpoint):
    """The bf16 model as transformers itself loads it (`from_pretrained(dtype=bfloat16)`:
    bf16 weights, fp32 rotary frequencies), not `model.to(bfloat16)`, which also rounds
    the rotary frequencies. The random full-size model has no folder: converted the same
    way by the engine's helper (test_engine_precision checks it against from_pretrained)."""
    if os.environ.get("CSM_GPU_TEST_MODEL", "tiny") == "full":
        from csm_triton.engine.lm import to_compute_dtype

        return to_compute_dtype(copy.deepcopy(model), torch.device("cuda"), torch.bfloat16)
    from transformers import CsmForConditionalGeneration

    bf16 = CsmForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.bfloat16)
    bf16.codec_model = None
    assert bf16.backbone_model.rotary_emb.inv_freq.dtype == torch.float32
    return bf16.to("cuda").eval()


# The first code each request draws (codebook 0 of frame 0) follows the same prompt in both
# precisions; every later code follows codes that may already differ, and random weights
# give near-flat logits, so a correct bf16 path still flips a near-tie early. Measured on
# the CPU (bf16 vs fp32 engines, these 16 prompts): the tiny checkpoint drew all 16 first
# codes alike and diverged at frames 0-4 (4 requests in frame 0); CSM-1B's shape with
# random weights drew all 16 alike too, but 13 of the 16 differed within frame 0 (after 2
# to 31 equal codes). So neither "no divergence in frame 0" nor a bound on the identical
# fraction holds for both. A broken bf16 path (wrong weights, scrambled positions or
# cache rows, a graph that replays the wrong buffers) matches fp32's first code by chance
# only, 1 in 2,048 per request. At least a quarter of the 16 first codes equal: chance
# reaches that with probability ~1e-10, and a correct path that matched only 60 % of first
# codes (CPU: 100 %) would miss it with ~1e-3. Subtler precision loss (the rotary tables)
# is checked where it can be measured: in the tables themselves (the test below).
MIN_FIRST_CODES_EQUAL = len(PRECISION_PROMPT_LENGTHS) // 4


def test_bf16_engine_draws_the_fp32_engines_first_greedy_codes_far_above_chance(tiny_checkpoint, gpu_report):
    name, model = precision_model(tiny_checkpoint)
    bf16_model = transformers_bf16(model, tiny_checkpoint)  # a separate model: CsmLM converts its own in place
    prompts = random_prompts(min(model.config.text_vocab_size, 128_000), PRECISION_PROMPT_LENGTHS)
    batch = len(prompts)
    fp32 = greedy_codes(CsmLM(model, device="cuda", dtype=torch.float32, max_batch=batch), prompts, PRECISION_FRAMES)
    bf16 = greedy_codes(
        CsmLM(bf16_model, device="cuda", dtype=torch.bfloat16, max_batch=batch), prompts, PRECISION_FRAMES
    )
    del model, bf16_model
    torch.cuda.empty_cache()

    same, compared, first_divergence, leading_equal = 0, 0, [], []
    for a, b in zip(fp32, bf16):
        assert len(a) and len(b), "a request produced no frame"
        assert a.min() >= 0 and max(a.max(), b.max()) < C.CODEBOOK_SIZE
        frames = min(len(a), len(b))
        equal = a[:frames] == b[:frames]
        same, compared = same + int(equal.sum()), compared + equal.size
        flat = equal.reshape(-1)  # in the order the codes are drawn: frame by frame, codebook 0..31
        leading_equal.append(int(np.argmin(flat)) if not flat.all() else flat.size)
        first_divergence.append(leading_equal[-1] // C.NUM_CODEBOOKS)
    fraction = same / compared
    first_codes_equal = sum(int(a[0, 0] == b[0, 0]) for a, b in zip(fp32, bf16))
    gpu_report["bf16_vs_fp32"] = {
        "model": name,
        "frames": PRECISION_FRAMES,
        "requests": batch,
        "identical_fraction": round(fraction, 4),
        "first_codes_equal": first_codes_equal,
        "first_codes_equal_at_least": MIN_FIRST_CODES_EQUAL,
        "first_divergent_frame": min(first_divergence),
        "first_divergent_frame_per_request": first_divergence,
        "codes_equal_before_the_first_difference": leading_equal,
    }
    print(
        f"bf16 vs fp32 ({name}): first codes equal for {first_codes_equal} of {batch} requests, {fraction:.1%} of "
        f"tokens identical, first divergence at frames {first_divergence}"
    )
    assert first_codes_equal >= MIN_FIRST_CODES_EQUAL, (
        f"bf16 drew fp32's first code for {first_codes_equal} of {batch} requests (chance: 1 in {C.CODEBOOK_SIZE})"
    )


# --- rotary tables built on the device ------------------------------------------------------
def test_bf16_rotary_tables_on_cuda_are_the_fp32_tables_rounded_once():
    """test_engine_precision's check of the tables (CSM-1B's head dim 64 and llama3 rope
    scaling, positions 0..2047) where they are built for serving: on the device."""
    from tests.model.test_engine_precision import (
        BF16_STORAGE_ERROR,
        ROPE_POSITIONS,
        build_csm1b_rope_model,
        rotary_table_errors,
    )

    model = build_csm1b_rope_model()
    lm = CsmLM(copy.deepcopy(model), device="cuda", dtype=torch.bfloat16, max_batch=1)
    assert lm.backbone.cos.device.type == "cuda" and lm.backbone.cos.dtype == torch.bfloat16
    assert lm.backbone.head_dim == 64 and lm.backbone.cos.shape == (ROPE_POSITIONS, 64)
    errors = rotary_table_errors(lm, model)
    assert all(error <= BF16_STORAGE_ERROR for error in errors.values()), (
        f"{errors} (bf16 storage: {BF16_STORAGE_ERROR})"
    )


# --- KV slot sizing --------------------------------------------------------------------------
def test_kv_slots_follow_gpu_memory_fraction(tiny_lm, gpu_report):
    max_context, wanted = 256, 48
    per_slot = tiny_lm.slot_bytes(max_context) * (1 + WARM_UP_SHARE_OF_SLOT)
    memory = DeviceMemory(torch.device("cuda"))
    memory.release_cached()  # as the engine does before it reads: nothing of an earlier test counts
    before = memory.reading()
    # A fraction whose budget, after what is in use already, holds `wanted` slots and a half.
    fraction = (before.in_use + (wanted + 0.5) * per_slot) / before.total
    config = EngineConfig(max_context=max_context, gpu_memory_fraction=fraction, prefix_cache_bytes=0)
    engine = GenerationEngine(tiny_lm, config)
    got = engine.max_slots
    assert wanted - 1 <= got <= wanted
    assert engine.cache.k.shape[1] == got and engine.cache.k.shape[3] == max_context
    engine.warm_up()  # the refit: the tiny model's graphs may take more than assumed, never over the budget
    after = memory.reading()
    assert after.in_use <= fraction * after.total + 64 * 2**20, engine.slot_budget.describe(engine.max_slots, after)
    refit = engine.max_slots
    del engine
    capped = GenerationEngine(
        tiny_lm, EngineConfig(max_slots=8, max_context=max_context, gpu_memory_fraction=fraction, prefix_cache_bytes=0)
    )
    assert capped.max_slots == 8  # the profile's cap wins when more would fit
    del capped

    memory.release_cached()
    before = memory.reading()
    with pytest.raises(RuntimeError, match="no KV slot fits"):
        GenerationEngine(
            tiny_lm, EngineConfig(max_context=max_context, gpu_memory_fraction=before.in_use / before.total / 2)
        )

    # What 0.85 of this GPU holds for CSM-1B in bf16 at 2048 positions, before any cap:
    # 2 (K and V) x 16 layers x 8 KV heads x 64 x 2 bytes per position.
    production_slot = 2 * 16 * 8 * 64 * 2 * 2048
    gpu_report["kv_slots"] = {
        "tiny_wanted": wanted,
        "tiny_got": got,
        "tiny_after_warm_up": refit,
        "production_slots": plan_slots(before, C.DEFAULT_GPU_MEMORY_FRACTION, production_slot).slots,
        "production_slot_mib": production_slot / 2**20,
        "gpu_memory_gib": before.total / 2**30,
    }
