"""ONNX Runtime behind Triton's `platform: "onnxruntime_onnx"` where no native
onnxruntime backend exists (the embedded tritonserver from nvidia-pytriton).

`csm_triton.embedded` installs `backends/onnxruntime/model.py` (a Python-based
backend, a two-line subclass of `OnnxRuntimeModel`), so the model configs that
the NGC container serves with its native backend load unchanged here.

What the native backend does and this one copies:
- the file is `<model dir>/<version>/model.onnx`, or the config's
  `default_model_filename`; a directory of that name holds `model.onnx`
  (models with external data);
- inputs and outputs are mapped by name; config and model must agree on names,
  data types and ranks, otherwise loading fails with the mismatch spelled out;
- `parameters { key: "intra_op_thread_count" / "inter_op_thread_count" }` set
  the session's threads;
- with `max_batch_size > 0` the first dimension is the batch: the requests the
  dynamic batcher hands over together, if their other dimensions agree, run as
  ONE `session.run` on the concatenation and the results are split back.

No Triton import here: the Triton-facing parts come from `csm_triton.triton_adapter`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from csm_triton.errors import InvalidInput
from csm_triton.triton_adapter import (
    PythonModel,
    build_response,
    config_parameter,
    decode_utf8,
    error_response,
    input_array,
    log_info,
)

__all__ = [
    "OnnxRuntimeModel",
    "OnnxSession",
    "TensorSpec",
    "model_file",
    "tensor_specs",
]

DEFAULT_MODEL_FILENAME = "model.onnx"

TRITON_TO_NUMPY: dict[str, Any] = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}

ONNX_TO_TRITON = {
    "tensor(bool)": "TYPE_BOOL",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(uint16)": "TYPE_UINT16",
    "tensor(uint32)": "TYPE_UINT32",
    "tensor(uint64)": "TYPE_UINT64",
    "tensor(int8)": "TYPE_INT8",
    "tensor(int16)": "TYPE_INT16",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(float16)": "TYPE_FP16",
    "tensor(float)": "TYPE_FP32",
    "tensor(double)": "TYPE_FP64",
    "tensor(string)": "TYPE_STRING",
}


def _short(data_type: str) -> str:
    return data_type.removeprefix("TYPE_")


def _triton_type_of(array: np.ndarray) -> str:
    if array.dtype.kind in "OSU":
        return "TYPE_STRING"
    for name, dtype in TRITON_TO_NUMPY.items():
        if dtype is not np.object_ and array.dtype == np.dtype(dtype):
            return name
    return str(array.dtype)


@dataclass(frozen=True)
class TensorSpec:
    """One `input`/`output` entry of the model config; `dims` excludes the batch dimension."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(TRITON_TO_NUMPY[self.data_type])


def tensor_specs(model_config: Mapping[str, Any], key: str) -> list[TensorSpec]:
    specs = []
    for entry in model_config.get(key, []):
        name = entry["name"]
        data_type = entry.get("data_type", "")
        if data_type not in TRITON_TO_NUMPY:
            raise ValueError(f"{key[:-1]} '{name}': data type {data_type or '(none)'} is not supported by onnxruntime here")
        if entry.get("reshape"):
            raise ValueError(f"{key[:-1]} '{name}': 'reshape' is not supported by the embedded onnxruntime backend")
        dims = tuple(int(d) for d in entry.get("dims", []))
        specs.append(TensorSpec(name, data_type, dims, bool(entry.get("optional", False))))
    return specs


def model_file(model_directory: Path | str, version: int | str, model_config: Mapping[str, Any]) -> Path:
    """The ONNX file the native backend would open; FileNotFoundError naming it if absent."""
    filename = model_config.get("default_model_filename") or DEFAULT_MODEL_FILENAME
    path = Path(model_directory) / str(version) / filename
    if path.is_dir():  # a folder named model.onnx holding model.onnx + external data
        path = path / DEFAULT_MODEL_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"model '{model_config.get('name', Path(model_directory).name)}' version {version}: "
            f"ONNX file not found: {path}"
        )
    return path


def _instance_count(model_config: Mapping[str, Any]) -> int:
    groups = model_config.get("instance_group") or [{}]
    return max(1, sum(int(group.get("count", 1) or 1) for group in groups))


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _int_parameter(model_config: Mapping[str, Any], name: str) -> int | None:
    value = config_parameter(model_config, name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"parameter '{name}' must be an integer, got {value!r}") from None
    return number if number > 0 else None


class OnnxSession:
    """An `onnxruntime.InferenceSession` checked against a Triton model config.

    Plain numpy in and out, so that it is testable without Triton.
    """

    def __init__(
        self,
        path: Path | str,
        model_config: Mapping[str, Any],
        *,
        instance_kind: str = "CPU",
        device_id: int = 0,
    ) -> None:
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
        intra = _int_parameter(model_config, "intra_op_thread_count")
        inter = _int_parameter(model_config, "inter_op_thread_count")
        # Each instance is its own process: share the cores between them instead of
        # letting every session spin a thread per core.
        options.intra_op_num_threads = intra or max(1, _available_cpus() // _instance_count(model_config))
        options.inter_op_num_threads = inter or 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3

        providers: list[Any] = ["CPUExecutionProvider"]
        if instance_kind.upper().endswith("GPU"):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device_id)}))
            else:
                log_info(f"{self.name}: KIND_GPU instance but onnxruntime has no CUDA provider; running on the CPU")
        self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        self.threads = (options.intra_op_num_threads, options.inter_op_num_threads)
        self._check_against_model()

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
                    problems.append(f"config {kind} '{spec.name}' is not a model {kind} (model has: {', '.join(nodes)})")
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
                    raise InvalidInput(
                        f"input '{spec.name}' has data type {_short(_triton_type_of(array))}, expected BYTES"
                    )
                array = np.array(decode_utf8(array, spec.name), dtype=object).reshape(array.shape)
            elif array.dtype != spec.dtype:
                raise InvalidInput(
                    f"input '{spec.name}' has data type {_short(_triton_type_of(array))}, "
                    f"expected {_short(spec.data_type)}"
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
                    raise InvalidInput(
                        f"input '{spec.name}' has batch size {shape[0]}, but another input has {batch}"
                    )
                batch = shape[0]
            feed[spec.name] = array
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
        values = self.session.run(names, dict(feed))
        return dict(zip(names, values))

    def run_many(self, feeds: Sequence[Mapping[str, np.ndarray] | BaseException]) -> list[dict[str, np.ndarray] | BaseException]:
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


def _batch_size(feed: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(feed.values())).shape[0]) if feed else 1


class OnnxRuntimeModel(PythonModel):
    """The TritonPythonModel of the Python-based backend `onnxruntime`."""

    def initialize_model(self, args: Mapping[str, str], model_config: dict) -> None:
        path = model_file(args["model_repository"], args["model_version"], model_config)
        self.session = OnnxSession(
            path,
            model_config,
            instance_kind=args.get("model_instance_kind", "CPU"),
            device_id=int(args.get("model_instance_device_id", 0) or 0),
        )
        intra, inter = self.session.threads
        log_info(f"{self.model_name}: onnxruntime session on {path} (threads intra={intra} inter={inter})")

    def read_inputs(self, request) -> dict[str, np.ndarray | None]:
        return {
            spec.name: input_array(request, spec.name, required=not spec.optional) for spec in self.session.inputs
        }

    def handle(self, request) -> Mapping[str, np.ndarray]:
        return self.session.run(self.session.validate(self.read_inputs(request)))

    def execute(self, requests):
        feeds: list[Any] = []
        for request in requests:
            try:
                feeds.append(self.session.validate(self.read_inputs(request)))
            except Exception as error:  # noqa: BLE001 - that request's error only
                feeds.append(error)
        responses = []
        for result in self.session.run_many(feeds):
            if isinstance(result, BaseException):
                responses.append(error_response(result, self.model_name))
            else:
                responses.append(build_response(result))
        return responses
