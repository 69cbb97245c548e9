"""Mimi's ONNX export: fixed tensor names, really dynamic axes, and parity with torch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from transformers.models.mimi.modeling_mimi import MimiConv1d

from csm_triton import constants as C
from export.mimi_onnx import (
    EXPORT_EXAMPLE_BATCH,
    EXPORT_EXAMPLE_SECONDS,
    ParityError,
    check_mimi_parity,
    export_mimi,
    exportable_mimi,
    load_codec,
    pseudo_speech,
)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mimi-onnx")
    encoder, decoder = folder / "encoder.onnx", folder / "decoder.onnx"
    export_mimi(tiny_checkpoint, encoder, decoder)
    return encoder, decoder


def _dims(value_info) -> list:
    return [dim.dim_param or dim.dim_value for dim in value_info.type.tensor_type.shape.dim]


def test_graphs_have_fixed_names_and_symbolic_batch_and_time(exported):
    encoder, decoder = (onnx.load(path) for path in exported)
    for model in (encoder, decoder):
        assert {opset.version for opset in model.opset_import if opset.domain in ("", "ai.onnx")} == {C.ONNX_OPSET}

    (encoder_input,), (encoder_output,) = encoder.graph.input, encoder.graph.output
    assert (encoder_input.name, encoder_output.name) == ("input_values", "audio_codes")
    assert encoder_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert encoder_output.type.tensor_type.elem_type == onnx.TensorProto.INT64

    (decoder_input,), (decoder_output,) = decoder.graph.input, decoder.graph.output
    assert (decoder_input.name, decoder_output.name) == ("audio_codes", "audio_values")
    assert decoder_input.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert decoder_output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    for value_info, fixed in (
        (encoder_input, 1),
        (encoder_output, C.NUM_CODEBOOKS),
        (decoder_input, C.NUM_CODEBOOKS),
        (decoder_output, 1),
    ):
        batch, channels, time = _dims(value_info)
        # Symbolic (a name), not a number frozen from the export example.
        assert isinstance(batch, str) and isinstance(time, str), _dims(value_info)
        assert channels == fixed


def test_parity_within_thresholds(tiny_checkpoint, exported):
    figures = check_mimi_parity(tiny_checkpoint, *exported)
    json.dumps(figures, allow_nan=False)
    cases = {(case["seconds"], case["batch"]): case for case in figures["cases"]}
    assert set(cases) == {(s, b) for s in C.PARITY_CLIP_SECONDS for b in C.PARITY_BATCH_SIZES}
    for (seconds, _), case in cases.items():
        assert case["frames"] == int(np.ceil(seconds * C.FRAME_RATE_HZ))
        assert case["decoder_max_abs_diff"] <= C.DECODER_MAX_ABS_DIFF
        assert case["encoder_code_agreement"] >= C.ENCODER_MIN_CODE_AGREEMENT
    assert figures["decoder_max_abs_diff"] == max(case["decoder_max_abs_diff"] for case in cases.values())


def test_batch_and_length_not_seen_at_export_run(tiny_checkpoint, exported):
    seconds = 3.3  # 79200 samples: not a whole number of frames either
    assert (EXPORT_EXAMPLE_BATCH, EXPORT_EXAMPLE_SECONDS) != (2, seconds)
    figures = check_mimi_parity(tiny_checkpoint, *exported, seconds=(seconds,), batch_sizes=(2,))
    (case,) = figures["cases"]
    assert (case["batch"], case["frames"]) == (2, 42)


def test_perturbed_decoder_fails_parity(tiny_checkpoint, exported, tmp_path):
    encoder, decoder = exported
    model = onnx.load(decoder)
    codec = load_codec(tiny_checkpoint)
    final_bias = f"decoder.decoder_seanet.layers.{len(codec.decoder.decoder_seanet.layers) - 1}.conv.bias"
    (initializer,) = [init for init in model.graph.initializer if init.name.endswith(final_bias)]
    # Shifts every output sample by 0.01, ten times the tolerated difference.
    initializer.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(initializer) + 0.01, initializer.name))
    perturbed = tmp_path / "perturbed_decoder.onnx"
    onnx.save(model, perturbed)
    with pytest.raises(ParityError) as caught:
        check_mimi_parity(tiny_checkpoint, encoder, perturbed, seconds=(1.0,), batch_sizes=(1,))
    message = str(caught.value)
    assert "\n" not in message and str(perturbed) in message and "decoder" in message
    assert caught.value.figures["cases"][0]["decoder_max_abs_diff"] > C.DECODER_MAX_ABS_DIFF


@torch.no_grad()
def test_integer_padding_is_exact_and_temporary(tiny_checkpoint):
    codec = load_codec(tiny_checkpoint)
    original = MimiConv1d.forward
    frame = C.SAMPLES_PER_FRAME
    for samples in (1, frame - 1, frame, frame + 1, 5 * frame + 7):
        audio = torch.from_numpy(pseudo_speech(samples / C.SAMPLE_RATE, 1, seed=samples))
        codes = codec.encode(audio).audio_codes
        decoded = codec.decode(codes).audio_values
        with exportable_mimi():
            assert MimiConv1d.forward is not original
            assert torch.equal(codec.encode(audio).audio_codes, codes)
            assert torch.equal(codec.decode(codes).audio_values, decoded)
        assert MimiConv1d.forward is original
    with pytest.raises(RuntimeError), exportable_mimi():
        raise RuntimeError("export failed")
    assert MimiConv1d.forward is original


def test_codec_loads_alone_from_a_sharded_checkpoint(tiny_checkpoint, sharded_checkpoint):
    single, sharded = load_codec(tiny_checkpoint).state_dict(), load_codec(sharded_checkpoint).state_dict()
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[name], sharded[name]) for name in single)
