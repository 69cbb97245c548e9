"""The frame step's Triton kernels (engine/triton_kernels.py) against their eager form
(engine/fused.py, what the CPU runs and what was tested against transformers), run on
the CPU under Triton's interpreter: each kernel alone on odd shapes, then a whole frame
step of a small CSM fused and unfused, token for token in fp32.

bf16: the interpreter rounds fp32 to bf16 by truncation where a GPU rounds to nearest, so
bf16 results are held to 2 bf16 ulps of the fp32 arithmetic rather than to equality."""

from __future__ import annotations

import os

import pytest
import torch

from csm_triton.engine import fused
from csm_triton.engine.sampling import top_k_index

if torch.cuda.is_available():  # the interpreter would be set for the whole process, the GPU tests too
    pytest.skip(
        "CPU interpreter tests; on a GPU, test_engine_gpu.py runs the compiled kernels", allow_module_level=True
    )
os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported (by the first kernels_on_cpu)

BF16_ULP = 2.0**-7  # relative spacing of bf16 values


def _both(function, *args):
    """(eager, fused) results of `function(*args)`, each on its own clone of the arguments."""
    eager_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    fused_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    eager = function(*eager_args)
    with fused.kernels_on_cpu():
        result = function(*fused_args)
    return (eager, eager_args), (result, fused_args)


def test_the_kernels_run_under_the_interpreter():
    with fused.kernels_on_cpu():
        from csm_triton.engine import triton_kernels

        assert triton_kernels.interpreted()


@pytest.mark.parametrize("shape", [(3, 1, 40), (2, 5, 64), (1, 1, 2048)])
def test_add_rms_norm_fp32_equals_eager(shape):
    torch.manual_seed(0)
    x, residual, weight = torch.randn(shape), torch.randn(shape) * 3, torch.randn(shape[-1])
    ((normed, summed), _), ((fused_normed, fused_summed), _) = _both(fused.add_rms_norm, x, residual, weight, 1e-5)
    assert torch.equal(fused_summed, summed)
    torch.testing.assert_close(fused_normed, normed, rtol=1e-6, atol=1e-6)


def test_add_rms_norm_bf16_is_the_fp32_arithmetic_rounded():
    torch.manual_seed(1)
    x, residual, weight = (torch.randn(4, 1, 1024) for _ in range(3))
    x, residual, weight = x.bfloat16(), residual.bfloat16(), weight[0, 0].bfloat16()
    with fused.kernels_on_cpu():
        normed, summed = fused.add_rms_norm(x, residual, weight, 1e-5)
    exact_sum = x.float() + residual.float()
    torch.testing.assert_close(summed.float(), exact_sum, rtol=2 * BF16_ULP, atol=1e-6)
    reference = fused.rms_norm(summed.float(), weight.float(), 1e-5)
    torch.testing.assert_close(normed.float(), reference, rtol=2 * BF16_ULP, atol=1e-3)


class _Geometry:
    """What rotary_write_kv reads of layers.Geometry."""

    def __init__(self, positions: torch.Tensor, head_dim: int):
        batch, tokens = positions.shape
        angles = positions[..., None].float() * torch.linspace(0.1, 1.0, head_dim)
        half = head_dim // 2
        self.cos = angles.cos()[:, :, None]
        sin = angles.sin()
        self.sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)[:, :, None]
        self.positions = positions
        self.item = torch.arange(batch)[:, None].expand(batch, tokens)


@pytest.mark.parametrize("tokens", [1, 3])
def test_rotary_write_kv_fp32_equals_eager(tokens):
    torch.manual_seed(2)
    batch, heads, kv_heads, head_dim, max_len, first_row = 3, 4, 2, 8, 12, 1
    qkv = torch.randn(batch, tokens, heads + 2 * kv_heads, head_dim)
    # A strided view, as the frame step's positions are (a column of its row buffer).
    positions = torch.tensor([[2, 3, 4, 0], [7, 8, 9, 0], [0, 1, 2, 0]])[:, :tokens]
    assert not positions.is_contiguous()
    geometry = _Geometry(positions, head_dim)
    cache = torch.randn(2, 2, 5, kv_heads, max_len, head_dim)  # [k/v, layers, rows, ...]

    def run(qkv, cache):
        rows = slice(first_row, first_row + batch)
        query = fused.rotary_write_kv(qkv, geometry, cache[0, 1, rows], cache[1, 1, rows], heads, kv_heads)
        return query

    (query, (_, cache_eager)), (fused_query, (_, cache_fused)) = _both(run, qkv, cache)
    torch.testing.assert_close(fused_query, query, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache_fused, cache_eager, rtol=1e-6, atol=1e-6)
    assert not torch.equal(cache_eager, cache)  # the writes happened


@pytest.mark.parametrize("width", [40, 1500])
def test_silu_mul_fp32_equals_eager(width):
    torch.manual_seed(3)
    gate_up = torch.randn(3, 1, 2 * width) * 4
    (out, _), (fused_out, _) = _both(fused.silu_mul, gate_up)
    torch.testing.assert_close(fused_out, out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bound", [64, 2048])
def test_sample_draws_the_eager_codes(bound):
    torch.manual_seed(4)
    rows = 6
    logits = torch.randn(rows, 2048) * 3
    logits[1] = torch.round(logits[1])  # ties at the k-th score: all tied codes stay in
    top_k = torch.tensor([1, 5, 50, 64, bound, 17]).clamp(max=bound)
    temperature = torch.tensor([1.0, 0.7, 0.9, 1.3, 0.5, 1.0])
    log_draws = torch.log(torch.empty(rows, 3, 2048).exponential_())[:, 1]  # strided rows, like log_e[:, c]
    log_draws[0] = 0.0  # a greedy row
    kth = top_k_index(top_k, bound)
    for _ in range(3):
        (codes, _), (fused_codes, _) = _both(fused.sample_codes, logits, temperature, kth, log_draws, bound)
        assert torch.equal(fused_codes, codes)
        logits = logits.roll(1, dims=-1)
    assert fused_codes[0] == logits.roll(-1, dims=-1)[0].argmax()  # greedy: the argmax


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import CsmForConditionalGeneration

    from csm_triton.engine.lm import CsmLM
    from export.tiny_checkpoint import build_tokenizer, tiny_config

    torch.manual_seed(5)
    model = CsmForConditionalGeneration(tiny_config(build_tokenizer())).eval()
    model.codec_model = None
    return CsmLM(model, device=torch.device("cpu"), dtype=torch.float32, max_batch=4, cpu_kernels="mkl")


@pytest.mark.parametrize("groups, head_dim", [(4, 8), (3, 64), (1, 16)])
def test_decode_attention_fp32_equals_masked_sdpa(groups, head_dim):
    """Each row over its own keys 0..position (0, inside the first block of 32, past two
    blocks), read through the strided views the frame step passes."""
    torch.manual_seed(3)
    cache = torch.randn(2, 4, 2, 80, head_dim)  # (k, v), rows, kv heads, positions, dim; rows 1..3 used
    keys, values = cache[0, 1:], cache[1, 1:]
    query = torch.randn(3, 2, groups, head_dim)
    positions = torch.tensor([[0, 9], [17, 9], [75, 9]])[:, :1]  # a column of a wider buffer
    expected = fused._decode_attention_eager(query, keys, values, positions)
    with fused.kernels_on_cpu():
        from csm_triton.engine import triton_kernels

        ours = triton_kernels.decode_attention(query, keys, values, positions)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    # Row 0 at position 0 attends its one key: the output is that key's value.
    torch.testing.assert_close(ours[0], values[0, :, :1].expand(2, groups, head_dim), rtol=1e-6, atol=1e-6)


def test_decode_attention_bf16_is_the_fp32_arithmetic_rounded():
    torch.manual_seed(4)
    cache = torch.randn(2, 2, 2, 50, 64).bfloat16()
    query = torch.randn(2, 2, 4, 64).bfloat16()
    positions = torch.tensor([[40], [5]])
    with fused.kernels_on_cpu():
        from csm_triton.engine import triton_kernels

        ours = triton_kernels.decode_attention(query, cache[0], cache[1], positions)
    exact = fused._decode_attention_eager(query.float(), cache[0].float(), cache[1].float(), positions)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), exact, rtol=2 * BF16_ULP, atol=2 * BF16_ULP)


def test_a_frame_step_fused_equals_eager_token_for_token(tiny_lm):
    """The tiny CSM: two frames of a batch of 3 rows (sampled with top-k 50 and 4, and
    greedy), fused (the kernels, under the interpreter) and eager, from the same state."""
    from csm_triton.engine.capacity import EngineConfig
    from csm_triton.engine.engine import GenerationEngine
    from csm_triton.engine.frame_step import FrameStep

    lm = tiny_lm
    results = []
    for use_kernels in (False, True):
        engine = GenerationEngine(lm, EngineConfig(max_slots=4, max_context=64, warm_up=False))
        torch.manual_seed(6)
        engine.hidden.copy_(torch.randn_like(engine.hidden))
        step = FrameStep(lm, engine.cache, engine.depth_cache, engine.hidden, batch=3, attend_len=64, top_k_bound=64)
        frames = []
        with torch.inference_mode(), fused.kernels_on_cpu() if use_kernels else torch.inference_mode():
            for f in range(2):
                step.load_rows(
                    [(5 + f, 50, 11, 0, f, 1, 0), (9 + f, 4, 12, 0, f, 1, 0), (2 + f, 1, 0, 0, f, 0, 0)],
                    [0.9, 1.2, 1.0],
                )
                step.run()
                frames.append(step.codes.clone())
        results.append((torch.stack(frames), engine.hidden[:3].clone(), engine.cache.k[:, :3].clone()))
    (codes, hidden, keys), (fused_codes, fused_hidden, fused_keys) = results
    assert torch.equal(fused_codes, codes)
    assert len(codes.unique()) > 10  # real draws, not a constant
    torch.testing.assert_close(fused_hidden, hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_keys, keys, rtol=1e-4, atol=1e-5)


def test_check_kernels_turns_them_off_for_the_process_when_one_disagrees(tiny_lm, monkeypatch, caplog):
    """At load on a GPU (CsmLM), each kernel is run once at the model's shapes against its
    eager form: a kernel that does not compile or disagrees there costs speed, not answers."""
    from csm_triton.engine import triton_kernels

    cpu = torch.device("cpu")
    assert tiny_lm.fused_report == "fused kernels: not used on this device"  # the CPU runs the eager forms
    stacks = [tiny_lm.backbone, tiny_lm.depth]
    monkeypatch.setattr(fused, "_failed", None)  # whatever this test does, restored after it
    with fused.kernels_on_cpu():
        assert (
            fused.check_kernels(stacks, 2048, cpu, torch.float32)
            == "fused kernels: on, checked against their eager forms"
        )
        monkeypatch.setattr(triton_kernels, "silu_mul", lambda gate_up: gate_up[..., : gate_up.shape[-1] // 2] * 0)
        report = fused.check_kernels(stacks, 2048, cpu, torch.float32)
        assert report.startswith("fused kernels: off (AssertionError: silu_mul")
        assert "fused kernels off" in caplog.text
        gate_up = torch.randn(2, 1, 16)
        assert torch.equal(fused.silu_mul(gate_up), fused._silu_mul_eager(gate_up))  # the eager form runs now


def test_a_prefill_fused_equals_eager(tiny_lm):
    """Prompts run through the same layers with several tokens per row (the GPU runs them
    eagerly, with the kernels): two rows of 7 tokens at different positions."""
    cache = tiny_lm.new_backbone_cache(3, 64)
    torch.manual_seed(8)
    embeds = torch.randn(2, 7, tiny_lm.backbone_hidden_size)
    positions = torch.stack([torch.arange(0, 7), torch.arange(10, 17)])
    results = []
    for use_kernels in (False, True):
        fresh = type(cache)(cache.k.clone(), cache.v.clone())
        with torch.inference_mode(), fused.kernels_on_cpu() if use_kernels else torch.inference_mode():
            hidden = tiny_lm.backbone_forward(embeds, fresh, 1, positions)
        results.append((hidden, fresh.k, fresh.v))
    for eager, fused_result in zip(*results, strict=True):
        torch.testing.assert_close(fused_result, eager, rtol=1e-4, atol=1e-5)
    assert results[0][1][:, 1:3].abs().sum() > 0  # the rows' keys were written
