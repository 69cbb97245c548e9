"""The onnxruntime shim's logic without Triton: file lookup, config checks, input
checks, and batching of requests with equal shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from csm_triton.errors import InvalidInput
from csm_triton.serving.onnxruntime.session import OnnxSession, model_file


def _config(**changes) -> dict:
    config = {
        "name": "scale",
        "max_batch_size": 8,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [-1]}],
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": {},
    }
    config.update(changes)
    return json.loads(json.dumps(config))


def _write_model(path: Path, *, width: int | str = 4, dtype=None) -> Path:
    import onnx
    from onnx import TensorProto, helper

    dtype = dtype or TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", dtype, ["batch", width])],
        [helper.make_tensor_value_info("y", dtype, ["batch", width])],
        [helper.make_tensor("two", dtype, [], [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


@pytest.fixture
def session(tmp_path):
    return OnnxSession(_write_model(tmp_path / "scale" / "1" / "model.onnx"), _config())


def test_model_file_follows_the_native_backend(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "m" / "1" / "model.onnx")):
        model_file(tmp_path / "m", 1, {"name": "m"})
    custom = _write_model(tmp_path / "m" / "2" / "codec.onnx")
    assert model_file(tmp_path / "m", "2", {"default_model_filename": "codec.onnx"}) == custom
    nested = _write_model(tmp_path / "m" / "3" / "model.onnx" / "model.onnx")  # external-data layout
    assert model_file(tmp_path / "m", 3, {}) == nested


def test_config_that_does_not_match_the_model_fails_to_load(tmp_path):
    path = _write_model(tmp_path / "scale" / "1" / "model.onnx")
    wrong_type = _config(input=[{"name": "x", "data_type": "TYPE_INT64", "dims": [-1]}])
    with pytest.raises(ValueError, match="input 'x': config says TYPE_INT64, model has TYPE_FP32"):
        OnnxSession(path, wrong_type)
    with pytest.raises(ValueError, match="config output 'z' is not a model output"):
        OnnxSession(path, _config(output=[{"name": "z", "data_type": "TYPE_FP32", "dims": [-1]}]))
    with pytest.raises(ValueError, match="model rank 2"):
        OnnxSession(path, _config(max_batch_size=0))


def test_thread_parameters_are_honoured(tmp_path):
    path = _write_model(tmp_path / "scale" / "1" / "model.onnx")
    parameters = {"intra_op_thread_count": {"string_value": "3"}, "inter_op_thread_count": {"string_value": "2"}}
    assert OnnxSession(path, _config(parameters=parameters)).threads == (3, 2)
    assert OnnxSession(path, _config(instance_group=[{"count": 64, "kind": "KIND_CPU"}])).threads == (1, 1)


def test_validate_names_the_tensor(session):
    good = np.ones((2, 4), dtype=np.float32)
    assert session.validate({"x": good})["x"] is good
    cases = [
        ({"x": good.astype(np.int32)}, "input 'x' has data type INT32, expected FP32"),
        ({"x": np.ones(4, dtype=np.float32)}, "input 'x' has shape \\[4\\], expected rank 2"),
        ({"x": np.ones((1, 3), dtype=np.float32)}, "input 'x' has shape \\[1, 3\\]: dimension 1 must be 4"),
        ({"x": np.ones((9, 4), dtype=np.float32)}, "input 'x' has batch size 9, expected 1..8"),
        ({}, "missing required input 'x'"),
    ]
    for arrays, message in cases:
        with pytest.raises(InvalidInput, match=message):
            session.validate(arrays)


def test_equal_shapes_run_as_one_batch_and_split_back(session, monkeypatch):
    calls = []
    run = session.run
    monkeypatch.setattr(session, "run", lambda feed: calls.append(feed["x"].shape) or run(feed))
    feeds = [{"x": np.full((n, 4), n, dtype=np.float32)} for n in (1, 2, 1)]
    bad = InvalidInput("input 'x' is wrong")
    results = session.run_many([feeds[0], bad, feeds[1], feeds[2]])
    assert calls == [(4, 4)]
    assert results[1] is bad
    for feed, result in zip(feeds, [results[0], results[2], results[3]]):
        assert np.array_equal(result["y"], feed["x"] * 2)  # doubling is exact in float32


def test_a_failing_batch_is_retried_request_by_request(session, monkeypatch):
    run = session.run

    def fragile(feed):
        if (feed["x"] < 0).any():
            raise RuntimeError("negative input")
        return run(feed)

    monkeypatch.setattr(session, "run", fragile)
    good, poison = np.ones((1, 4), dtype=np.float32), -np.ones((1, 4), dtype=np.float32)
    results = session.run_many([{"x": good}, {"x": poison}, {"x": good}])
    assert np.array_equal(results[0]["y"], good * 2) and np.array_equal(results[2]["y"], good * 2)
    assert isinstance(results[1], RuntimeError)


def test_unbatched_models_run_request_by_request(tmp_path):
    path = _write_model(tmp_path / "scale" / "1" / "model.onnx")
    session = OnnxSession(
        path,
        _config(
            max_batch_size=0,
            input=[{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 4]}],
            output=[{"name": "y", "data_type": "TYPE_FP32", "dims": [-1, 4]}],
        ),
    )
    results = session.run_many([{"x": np.ones((3, 4), dtype=np.float32)}, {"x": np.ones((5, 4), dtype=np.float32)}])
    assert [r["y"].shape for r in results] == [(3, 4), (5, 4)]


def test_memory_parameters_are_read_as_the_native_backend_reads_them(tmp_path):
    path = _write_model(tmp_path / "scale" / "1" / "model.onnx")
    default = OnnxSession(path, _config()).session.get_session_options()
    assert default.enable_cpu_mem_arena and default.enable_mem_pattern
    off = {"enable_mem_arena": {"string_value": "0"}, "enable_mem_pattern": {"string_value": "false"}}
    options = OnnxSession(path, _config(parameters=off)).session.get_session_options()
    assert not options.enable_cpu_mem_arena and not options.enable_mem_pattern
    with pytest.raises(ValueError, match="'enable_mem_arena' must be one of"):
        OnnxSession(path, _config(parameters={"enable_mem_arena": {"string_value": "maybe"}}))
    shrink = OnnxSession(path, _config(parameters={"memory.enable_memory_arena_shrinkage": {"string_value": "cpu:0"}}))
    assert shrink.run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    assert np.array_equal(shrink.run({"x": np.ones((1, 4), np.float32)})["y"], np.full((1, 4), 2, np.float32))


def test_a_validate_parameter_applies_its_rule_and_a_bad_one_fails_the_load(tmp_path):
    path = _write_model(tmp_path / "scale" / "1" / "model.onnx")
    checked = OnnxSession(path, _config(parameters={"validate.x": {"string_value": "mimi_audio"}}))
    bad = np.array([[0, np.nan, 0, 0]], np.float32)
    with pytest.raises(InvalidInput, match="input 'x' contains NaN or infinite samples"):
        checked.validate({"x": bad})
    assert OnnxSession(path, _config()).validate({"x": bad})["x"] is bad  # no rule, no check
    for key, rule in (("validate.x", "nonsense"), ("validate.nope", "mimi_audio")):
        with pytest.raises(ValueError, match=f"config parameter '{key}' must name an input"):
            OnnxSession(path, _config(parameters={key: {"string_value": rule}}))


def test_the_committed_codec_configs_turn_the_arena_off_and_check_their_inputs():
    from export.model_config import read_config

    for model, name, rule in (
        ("mimi_encoder", "input_values", "mimi_audio"),
        ("mimi_decoder", "audio_codes", "mimi_codes"),
    ):
        parameters = read_config(Path(__file__).parents[2] / "model_repository" / model / "config.pbtxt").parameters
        assert parameters["enable_mem_arena"].string_value == "0"
        assert parameters[f"validate.{name}"].string_value == rule
