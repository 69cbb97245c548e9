"""A Triton model config's tensors as the embedded ONNX Runtime backend reads them:
the config types an ONNX graph can hold, their numpy types, and the ONNX file the native
backend would open. Apart from the session (session.py) so the config side is read in one
place and the session module stays about running the graph."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

__all__ = [
    "DEFAULT_MODEL_FILENAME",
    "ONNX_TO_TRITON",
    "SUPPORTED_TYPES",
    "TensorSpec",
    "array_type_name",
    "model_file",
    "numpy_dtype",
    "short_type_name",
    "tensor_specs",
]

DEFAULT_MODEL_FILENAME = "model.onnx"

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


# The config types this backend serves: those an ONNX graph can hold.
SUPPORTED_TYPES = frozenset(ONNX_TO_TRITON.values())


def short_type_name(data_type: str) -> str:
    return data_type.removeprefix("TYPE_")


def numpy_dtype(data_type: str) -> np.dtype:
    """A config type (TYPE_FP32, TYPE_STRING, ...) as numpy's (tritonclient's table)."""
    name = short_type_name(data_type)
    return np.dtype(triton_to_np_dtype("BYTES" if name == "STRING" else name))


def array_type_name(array: np.ndarray) -> str:
    """An array's Triton type name for messages: FP32, BYTES, ..."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    return np_to_triton_dtype(array.dtype) or str(array.dtype)


@dataclass(frozen=True)
class TensorSpec:
    """One `input`/`output` entry of the model config; `dims` excludes the batch dimension."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False

    @property
    def dtype(self) -> np.dtype:
        return numpy_dtype(self.data_type)


def tensor_specs(model_config: Mapping[str, Any], key: str) -> list[TensorSpec]:
    specs = []
    for entry in model_config.get(key, []):
        name = entry["name"]
        data_type = entry.get("data_type", "")
        if data_type not in SUPPORTED_TYPES:
            raise ValueError(
                f"{key[:-1]} '{name}': data type {data_type or '(none)'} is not supported by onnxruntime here"
            )
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
