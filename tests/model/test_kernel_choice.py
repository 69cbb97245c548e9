"""CPU kernels chosen per weight shape at load (engine/kernels.py): whichever kernel
runs, fp32 tokens equal transformers' `generate`; the choice is logged; a one-slot
engine keeps one copy of each weight; bf16 on CPU generates."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, CsmForConditionalGeneration

from csm_triton import constants as C
from csm_triton.core.prompt import PromptBuilder
from csm_triton.engine import CsmLM, EngineConfig, FinishReason, GenerationEngine, GenerationRequest, kernels
from csm_triton.engine.layers import Linear

SUPPRESSED = list(range(C.CODEBOOK_SIZE, C.LM_AUDIO_VOCAB_SIZE))
TARGETS = ["Hello there.", "How are you doing today, my friend?", "Five boxing wizards."]


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    return CsmForConditionalGeneration.from_pretrained(str(tiny_checkpoint)).eval()


@pytest.fixture(scope="module")
def expected(hf_model, tiny_checkpoint):
    """transformers' greedy frames for each target (the reference every kernel must equal)."""
    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint))
    frames = {}
    for index, target in enumerate(TARGETS):
        conversation = [{"role": "0", "content": [{"type": "text", "text": target}]}]
        inputs = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
        output = hf_model.generate(
            **inputs,
            max_new_tokens=5 + index,
            do_sample=False,
            depth_decoder_do_sample=False,
            suppress_tokens=SUPPRESSED,
            depth_decoder_suppress_tokens=SUPPRESSED,
        )
        frames[target] = output[0].numpy()
    return frames


@pytest.fixture
def time_every_shape(monkeypatch):
    # The tiny model's weights are all below the size worth timing: time them anyway,
    # so that "measure" runs its timing path here.
    monkeypatch.setattr(C, "CPU_KERNEL_MIN_TIMED_BYTES", 0)


@pytest.fixture(scope="module")
def builder(tiny_checkpoint):
    return PromptBuilder(tiny_checkpoint)


def generate(lm, builder, targets, slots):
    engine = GenerationEngine(lm, EngineConfig(max_slots=slots, max_prefills_per_step=len(targets)))
    handles = []
    for index, target in enumerate(targets):
        prompt = builder.prepare(target, None, None)
        handles.append(
            engine.submit(GenerationRequest(prompt.input_ids, prompt.audio_codes, max_frames=5 + index, greedy=True))
        )
    engine.run_until_idle()
    return [handle.result() for handle in handles]


@pytest.mark.parametrize("mode", ["measure", "mkl", "onednn"])
def test_every_kernel_choice_gives_generates_tokens(tiny_checkpoint, builder, expected, mode, time_every_shape):
    # Three slots: buckets of 1 and 3 rows, so both buckets' kernels run (one request
    # alone first, then three together).
    lm = CsmLM.from_checkpoint(tiny_checkpoint, device="cpu", max_batch=3, cpu_kernels=mode)
    if mode != "measure":
        assert all(kernel == mode for shape in lm.kernel_report.shapes for kernel in shape.choice.values())
    else:
        assert all(shape.how == "measured" and shape.ms for shape in lm.kernel_report.shapes)
    assert {rows for shape in lm.kernel_report.shapes for rows in shape.choice} == {1, 3}
    for result, target in zip(
        generate(lm, builder, TARGETS[:1], 3) + generate(lm, builder, TARGETS, 3), TARGETS[:1] + TARGETS
    ):
        np.testing.assert_array_equal(result.codes, expected[target])


def test_the_measured_choice_and_its_times_are_logged_per_shape(tiny_checkpoint, caplog, time_every_shape):
    with caplog.at_level(logging.INFO, logger="csm_triton.engine.kernels"):
        lm = CsmLM.from_checkpoint(tiny_checkpoint, device="cpu", max_batch=8)
    lines = [record.getMessage() for record in caplog.records if record.name == "csm_triton.engine.kernels"]
    shapes = {(linear.out_features, linear.in_features) for _, linear in lm.named_linears()}
    assert len(lines) == len(shapes) == len(lm.kernel_report.shapes)
    gate_up = next(line for line in lines if "backbone gate_up" in line)
    # e.g. "256x64 float32 [backbone gate_up x2] measured: 1 row mkl 0.005 ms (vs onednn 0.016); 8 rows ..."
    assert gate_up.startswith("CPU kernels: 256x64 float32 [backbone gate_up x2] measured: 1 row ")
    assert "8 rows" in gate_up and " ms (vs " in gate_up and "keeps " in gate_up
    assert "mkl" in gate_up and "onednn" in gate_up  # both candidates timed
    assert lm.kernel_report.lines()[:-1] == [line.removeprefix("CPU kernels: ") for line in lines]


def test_weights_too_small_to_matter_are_not_timed(tiny_checkpoint):
    # Every tiny-model weight is under 1 MiB: F.linear, no timing (a test server's load
    # stays fast on a busy machine), and the log says why.
    lm = CsmLM.from_checkpoint(tiny_checkpoint, device="cpu", max_batch=4)
    assert all(
        shape.how == "small, not timed" and set(shape.choice.values()) == {"mkl"} for shape in lm.kernel_report.shapes
    )
    assert lm.kernel_report.seconds < 1.0
    assert "[backbone gate_up x2] small, not timed: 1 row mkl; 4 rows mkl; keeps plain weight" in "\n".join(
        lm.kernel_report.lines()
    )


def _kept_bytes(lm) -> tuple[int, int]:
    linears = [linear for _, linear in lm.named_linears()]
    # A oneDNN-packed copy is an opaque tensor (no storage to measure): its logical size.
    kept = sum(copy.numel() * copy.element_size() for linear in linears for copy in linear.copies())
    one_each = sum(linear.out_features * linear.in_features * linear.dtype.itemsize for linear in linears)
    return kept, one_each


def test_a_one_slot_engine_keeps_one_copy_of_each_weight_whatever_is_measured(tiny_checkpoint, time_every_shape):
    lm = CsmLM.from_checkpoint(tiny_checkpoint, device="cpu", max_batch=1)
    assert all(len(linear.copies()) == 1 for _, linear in lm.named_linears())
    kept, one_each = _kept_bytes(lm)
    assert kept == one_each
    # Two buckets both packed for oneDNN: two copies (what the one-slot engine avoids).
    two = CsmLM.from_checkpoint(tiny_checkpoint, device="cpu", max_batch=8, cpu_kernels="onednn")
    assert all(len(linear.copies()) == 2 and linear.weight is None for _, linear in two.named_linears())
    assert _kept_bytes(two)[0] >= 2 * one_each


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 8, 40])
def test_each_kernel_computes_f_linear_at_every_row_count(dtype, rows):
    torch.manual_seed(0)
    weight, bias, x = (
        torch.randn(96, 64, dtype=dtype),
        torch.randn(96, dtype=dtype),
        torch.randn(3, rows, 64, dtype=dtype),
    )
    reference = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    for kernel in kernels.available_kernels(dtype):
        linear = Linear(weight, bias)
        linear.use({1: kernel, 8: kernel})
        tolerance = 1e-5 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(linear(x).float(), reference, rtol=tolerance, atol=tolerance * 10)


def test_row_buckets_follow_the_slot_count():
    assert kernels.row_buckets(None) == kernels.row_buckets(16) == (1, 8)
    assert kernels.row_buckets(1) == (1,)
    assert kernels.row_buckets(4) == (1, 4)  # four rows read best from a layout packed for four


def test_an_unknown_kernel_setting_is_refused_with_the_choices(tiny_checkpoint):
    with pytest.raises(ValueError, match="cpu_kernels must be one of measure, mkl, onednn, got 'fast'"):
        CsmLM.from_checkpoint(tiny_checkpoint, device="cpu", cpu_kernels="fast")


def test_bf16_on_cpu_generates_frames_with_measured_kernels(tiny_checkpoint, builder, time_every_shape):
    lm = CsmLM.from_checkpoint(tiny_checkpoint, device="cpu", dtype=torch.bfloat16, max_batch=3)
    assert lm.dtype == torch.bfloat16
    # Every weight in bf16 but the heads, whose logits are computed in fp32 (lm.py).
    heads = {name for name, linear in lm.named_linears() if "head" in name}
    assert {shape.dtype for shape in lm.kernel_report.shapes if set(shape.names) - heads} == {torch.bfloat16}
    assert {shape.dtype for shape in lm.kernel_report.shapes if set(shape.names) <= heads} == {torch.float32}
    results = generate(lm, builder, TARGETS, 3)
    for index, result in enumerate(results):
        assert result.reason == FinishReason.MAX_FRAMES
        assert result.codes.shape == (5 + index, C.NUM_CODEBOOKS)
        assert 0 <= result.codes.min() and result.codes.max() < C.CODEBOOK_SIZE


def _csm_lm_parameters(**values):
    from csm_triton.triton.parameters import Parameters

    return Parameters({"name": "csm_lm", "parameters": {key: {"string_value": value} for key, value in values.items()}})


def test_the_csm_lm_config_parameter_forces_a_kernel_and_refuses_others(tiny_checkpoint):
    from csm_triton.triton.models.lm import engine_from_config
    from csm_triton.triton.parameters import ParameterError

    parameters = _csm_lm_parameters(checkpoint_dir=tiny_checkpoint.name, max_slots="2", cpu_kernels="onednn")
    engine = engine_from_config(tiny_checkpoint.parent, parameters, "cpu")
    assert {kernel for shape in engine.lm.kernel_report.shapes for kernel in shape.choice.values()} == {"onednn"}
    with pytest.raises(ParameterError, match="'cpu_kernels' must be one of 'measure', 'mkl', 'onednn', got 'fast'"):
        engine_from_config(tiny_checkpoint.parent, _csm_lm_parameters(cpu_kernels="fast"), "cpu")
