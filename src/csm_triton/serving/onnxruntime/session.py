"""ONNX Runtime behind Triton's `platform: "onnxruntime_onnx"` where no native
onnxruntime backend exists (the embedded tritonserver from nvidia-pytriton).

`csm_triton.serving.install` installs `backends/onnxruntime/model.py` (a Python-based
backend; its Triton side is `backend.py` beside this module), so the model configs
that the NGC container serves with its native backend load unchanged here.

What the native backend does and this one copies:
- the file is `<model dir>/<version>/model.onnx`, or the config's
  `default_model_filename`; a directory of that name holds `model.onnx`
  (models with external data);
- inputs and outputs are mapped by name; config and model must agree on names,
  data types and ranks, otherwise loading fails with the mismatch spelled out;
- `parameters`: `intra_op_thread_count` / `inter_op_thread_count` (threads),
  `enable_mem_arena` / `enable_mem_pattern` ("0"/"1"), `memory.enable_memory_arena_shrinkage`
  (e.g. "cpu:0", a run option), and for the CUDA provider `arena_extend_strategy` ("0"
  kNextPowerOfTwo, "1" kSameAsRequested), `gpu_mem_limit` and `cudnn_conv_algo_search` ("0"
  EXHAUSTIVE, "1" HEURISTIC, "2" DEFAULT), as the native backend reads them. Unlike the native
  backend, `cudnn_conv_algo_search` defaults to HEURISTIC here: EXHAUSTIVE benchmarks every
  cuDNN convolution algorithm for each new input shape, and Mimi's time axis is a new shape
  for nearly every request (latency spikes);
- with `max_batch_size > 0` the first dimension is the batch: the requests the
  dynamic batcher hands over together, if their other dimensions agree, run as
  ONE `session.run` on the concatenation and the results are split back.

What only this backend does: `parameters { key: "validate.<input>" value: { string_value:
RULE } }` applies a rule of `csm_triton.core.validation.INPUT_RULES` to that input
of every request (value ranges and lengths: INVALID_ARG naming the input instead of
an ONNX Runtime error naming graph nodes). The native backend ignores the key.

No Triton import here: plain numpy in and out, testable without a server.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from csm_triton.core.validation import INPUT_RULES, decode_utf8
from csm_triton.errors import InvalidInput
from csm_triton.serving.onnxruntime.specs import (
    ONNX_TO_TRITON,
    TensorSpec,
    array_type_name,
    model_file,
    short_type_name,
    tensor_specs,
)
from csm_triton.triton.parameters import Parameters

__all__ = ["OnnxSession", "TensorSpec", "model_file", "tensor_specs"]

LOG = logging.getLogger("csm_triton.onnxruntime")
# The native backend's `cudnn_conv_algo_search` values; "1" (HEURISTIC) unless the config says.
CUDNN_CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
DEFAULT_CUDNN_CONV_ALGO_SEARCH = "1"
# After runs whose inputs and outputs held this much (~10 s of audio), free heap pages
# are handed back (malloc_trim); smaller runs, such as stream chunks, skip the cost.
TRIM_AFTER_BYTES = 1 << 20


def _instance_count(model_config: Mapping[str, Any]) -> int:
    groups = model_config.get("instance_group") or [{}]
    return max(1, sum(int(group.get("count", 1) or 1) for group in groups))


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


class OnnxSession:
    """An `onnxruntime.InferenceSession` checked against a Triton model config.

    Plain numpy in and out, so that it is testable without Triton.
    """

    def __init__(self, path: Path | str, model_config: Mapping[str, Any], *, device: str = "cpu") -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.name = str(model_config.get("name") or self.path.parent.parent.name)
        self.max_batch_size = int(model_config.get("max_batch_size", 0) or 0)
        self.batched = self.max_batch_size > 0
        self.inputs = tensor_specs(model_config, "input")
        self.outputs = tensor_specs(model_config, "output")
        if not self.outputs:
            raise ValueError(f"model '{self.name}': the config lists no outputs")

        options = ort.SessionOptions()
        parameters = Parameters(model_config, self.name)
        # 0 or absent: chosen here.
        intra = parameters.integer("intra_op_thread_count", 0, minimum=0)
        inter = parameters.integer("inter_op_thread_count", 0, minimum=0)
        # Each instance is its own process: share the cores between them instead of
        # letting every session spin a thread per core.
        options.intra_op_num_threads = intra or max(1, _available_cpus() // _instance_count(model_config))
        options.inter_op_num_threads = inter or 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        # Memory, as the native backend reads it. With the CPU arena on, the largest
        # request's buffers stay reserved by the process after it ends.
        options.enable_cpu_mem_arena = _switch(parameters, "enable_mem_arena", options.enable_cpu_mem_arena)
        options.enable_mem_pattern = _switch(parameters, "enable_mem_pattern", options.enable_mem_pattern)
        self.run_options = ort.RunOptions()
        shrinkage = parameters.text("memory.enable_memory_arena_shrinkage")
        if shrinkage:
            self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", shrinkage)

        providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", _cuda_options(parameters, device)))
            else:
                LOG.warning(f"{self.name}: KIND_GPU instance but onnxruntime has no CUDA provider; running on the CPU")
        self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        # The providers in use: onnxruntime falls back to the CPU by itself when its CUDA
        # provider is listed but cannot load (missing or mismatched CUDA/cuDNN libraries).
        self.providers = list(self.session.get_providers())
        if providers[0] != "CPUExecutionProvider" and "CUDAExecutionProvider" not in self.providers:
            LOG.warning(
                f"{self.name}: KIND_GPU instance but onnxruntime runs it on the CPU "
                f"(providers in use: {', '.join(self.providers)})"
            )
        self.threads = (options.intra_op_num_threads, options.inter_op_num_threads)
        self._check_against_model()
        self.rules = _input_rules(self.name, self.inputs, model_config.get("parameters") or {})

    # --- load-time checks -----------------------------------------------------------
    def _check_against_model(self) -> None:
        model_inputs = {node.name: node for node in self.session.get_inputs()}
        model_outputs = {node.name: node for node in self.session.get_outputs()}
        problems = []
        config_names = {spec.name for spec in self.inputs}
        for name in model_inputs:
            if name not in config_names:
                problems.append(f"model input '{name}' is missing from the config")
        self._onnx_shapes: dict[str, tuple] = {}
        for kind, specs, nodes in (("input", self.inputs, model_inputs), ("output", self.outputs, model_outputs)):
            for spec in specs:
                node = nodes.get(spec.name)
                if node is None:
                    problems.append(
                        f"config {kind} '{spec.name}' is not a model {kind} (model has: {', '.join(nodes)})"
                    )
                    continue
                onnx_type = ONNX_TO_TRITON.get(node.type, node.type)
                if onnx_type != spec.data_type:
                    problems.append(f"{kind} '{spec.name}': config says {spec.data_type}, model has {onnx_type}")
                shape = tuple(node.shape) if node.shape is not None else None
                expected_rank = len(spec.dims) + (1 if self.batched else 0)
                if shape is not None and len(shape) != expected_rank:
                    problems.append(
                        f"{kind} '{spec.name}': model rank {len(shape)} {list(shape)}, config rank {expected_rank} "
                        f"(dims {list(spec.dims)}{' plus the batch dimension' if self.batched else ''})"
                    )
                    continue
                self._onnx_shapes[spec.name] = shape
        if problems:
            raise ValueError(f"model '{self.name}' ({self.path}) does not match its config: " + "; ".join(problems))

    # --- per-request checks ---------------------------------------------------------
    def validate(self, arrays: Mapping[str, np.ndarray | None]) -> dict[str, np.ndarray]:
        """The session's feed for one request; InvalidInput naming the tensor when wrong."""
        feed: dict[str, np.ndarray] = {}
        batch = None
        for spec in self.inputs:
            array = arrays.get(spec.name)
            if array is None:
                if spec.optional:
                    continue
                raise InvalidInput(f"missing required input '{spec.name}'")
            array = np.asarray(array)
            if spec.data_type == "TYPE_STRING":
                if array.dtype.kind not in "OSU":
                    raise InvalidInput(f"input '{spec.name}' has data type {array_type_name(array)}, expected BYTES")
                array = np.array(decode_utf8(array, spec.name), dtype=object).reshape(array.shape)
            elif array.dtype != spec.dtype:
                raise InvalidInput(
                    f"input '{spec.name}' has data type {array_type_name(array)}, "
                    f"expected {short_type_name(spec.data_type)}"
                )
            shape = array.shape
            expected = (None,) + spec.dims if self.batched else spec.dims
            if len(shape) != len(expected):
                raise InvalidInput(
                    f"input '{spec.name}' has shape {list(shape)}, expected rank {len(expected)} "
                    f"({self._describe(spec)})"
                )
            onnx_shape = self._onnx_shapes.get(spec.name) or (None,) * len(shape)
            for axis, (size, want, onnx_want) in enumerate(zip(shape, expected, onnx_shape)):
                if self.batched and axis == 0:
                    continue
                for bound in (want, onnx_want):
                    if isinstance(bound, int) and bound >= 0 and size != bound:
                        raise InvalidInput(
                            f"input '{spec.name}' has shape {list(shape)}: dimension {axis} must be {bound} "
                            f"({self._describe(spec)})"
                        )
            if self.batched:
                if shape[0] < 1 or shape[0] > self.max_batch_size:
                    raise InvalidInput(
                        f"input '{spec.name}' has batch size {shape[0]}, expected 1..{self.max_batch_size}"
                    )
                if batch is not None and shape[0] != batch:
                    raise InvalidInput(f"input '{spec.name}' has batch size {shape[0]}, but another input has {batch}")
                batch = shape[0]
            rule = self.rules.get(spec.name)
            feed[spec.name] = rule(array, spec.name) if rule else array
        return feed

    def _describe(self, spec: TensorSpec) -> str:
        config = (["batch"] if self.batched else []) + [str(d) for d in spec.dims]
        text = f"model '{self.name}' takes [{', '.join(config)}]"
        onnx_shape = self._onnx_shapes.get(spec.name)
        if onnx_shape is not None:
            onnx_dims = [str(d) if isinstance(d, int) and d >= 0 else "-1" for d in onnx_shape]
            if self.batched:
                onnx_dims[0] = "batch"
            if onnx_dims != config:
                text += f", its ONNX file [{', '.join(onnx_dims)}]"
        return text

    # --- running --------------------------------------------------------------------
    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [spec.name for spec in self.outputs]
        values = self.session.run(names, dict(feed), self.run_options)
        return dict(zip(names, values))

    def run_many(
        self, feeds: Sequence[Mapping[str, np.ndarray] | BaseException]
    ) -> list[dict[str, np.ndarray] | BaseException]:
        """Results aligned with `feeds`; an exception in `feeds` passes through.

        Feeds whose non-batch shapes agree run together in one `session.run`. If a
        batched run fails, its members run one by one so that only the bad one fails.
        """
        results: list[dict[str, np.ndarray] | BaseException | None] = [None] * len(feeds)
        groups: dict[tuple, list[int]] = {}
        for index, feed in enumerate(feeds):
            if isinstance(feed, BaseException):
                results[index] = feed
            elif not self.batched:
                groups[("single", index)] = [index]
            else:
                key = tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(feed.items()))
                groups.setdefault(key, []).append(index)
        for members in groups.values():
            batch = [feeds[i] for i in members]
            if len(batch) > 1 and sum(_batch_size(f) for f in batch) <= self.max_batch_size:
                try:
                    for index, outputs in zip(members, self._run_concatenated(batch)):
                        results[index] = outputs
                    continue
                except Exception:  # noqa: BLE001 - isolate the failing request below
                    pass
            for index in members:
                try:
                    results[index] = self.run(feeds[index])
                except Exception as error:  # noqa: BLE001 - becomes that request's error
                    results[index] = error
        if sum(_tensor_bytes(item) for item in [*feeds, *results]) >= TRIM_AFTER_BYTES:
            _release_free_memory()
        return results  # type: ignore[return-value]

    def _run_concatenated(self, batch: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        sizes = [_batch_size(feed) for feed in batch]
        joined = {name: np.concatenate([feed[name] for feed in batch], axis=0) for name in batch[0]}
        outputs = self.run(joined)
        total = sum(sizes)
        for name, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != total:
                raise RuntimeError(
                    f"model '{self.name}': output '{name}' has shape {list(value.shape)} for a batch of {total}"
                )
        cuts = np.cumsum(sizes)[:-1]
        split = {name: np.split(value, cuts, axis=0) for name, value in outputs.items()}
        return [{name: parts[i] for name, parts in split.items()} for i in range(len(batch))]


def _input_rules(model: str, inputs: Sequence[TensorSpec], entries: Mapping[str, Any]) -> dict[str, Any]:
    """The `validate.<input>` parameters as {input name: rule}; a bad one fails the load."""
    names = {spec.name for spec in inputs}
    rules = {}
    for key, entry in entries.items():
        if key.startswith("validate."):
            name, rule = key.partition(".")[2], str(entry.get("string_value", "")).strip()
            if name not in names or rule not in INPUT_RULES:
                raise ValueError(
                    f"model '{model}': config parameter '{key}' must name an input of the config "
                    f"({', '.join(sorted(names))}) and one of {', '.join(sorted(INPUT_RULES))}, "
                    f"got {rule!r}"
                )
            rules[name] = INPUT_RULES[rule]
    return rules


def _tensor_bytes(tensors: Mapping[str, np.ndarray] | BaseException | None) -> int:
    return sum(array.nbytes for array in tensors.values()) if isinstance(tensors, Mapping) else 0


try:
    _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # pragma: no cover - not glibc
    _MALLOC_TRIM = None


def _release_free_memory() -> None:
    """Hand the heap's free pages back to the system. Even without the arena, glibc
    keeps what a long request freed (a 120 s decode left ~60 MB more resident)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _switch(parameters: Parameters, name: str, default: bool) -> bool:
    """An on/off parameter as the native backend parses it ("1"/"0", "true"/"false")."""
    value = parameters.choice(name, ("0", "1", "true", "false"), "1" if default else "0")
    return value in ("1", "true")


def _cuda_options(parameters: Parameters, device: str) -> dict[str, str]:
    options = {"device_id": device.partition(":")[2] or "0"}
    strategy = parameters.choice("arena_extend_strategy", ("0", "1"), "0")
    options["arena_extend_strategy"] = ("kNextPowerOfTwo", "kSameAsRequested")[int(strategy)]
    limit = parameters.integer("gpu_mem_limit", None, minimum=1)
    if limit is not None:
        options["gpu_mem_limit"] = str(limit)
    search = parameters.choice("cudnn_conv_algo_search", ("0", "1", "2"), DEFAULT_CUDNN_CONV_ALGO_SEARCH)
    options["cudnn_conv_algo_search"] = CUDNN_CONV_ALGO_SEARCH[int(search)]
    return options


def _batch_size(feed: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(feed.values())).shape[0]) if feed else 1
