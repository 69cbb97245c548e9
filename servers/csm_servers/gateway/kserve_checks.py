"""The checks of the KServe v2 front (kserve_front.py) on parsed request JSON, against a
model's config as Triton reports it: pure functions, unit-tested without a server.

Each refusal names the input, what the config says and what the request said; the
front answers it as Triton's own error shape, `{"error": "..."}`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "MAX_JSON_DEPTH",
    "InputSpec",
    "ModelSpec",
    "Refused",
    "check_generate",
    "check_infer",
    "json_depth",
    "parse_json",
]

# Per input. The largest the service accepts is a 30 s voice reference at 192 kHz
# (5.76 M samples); tests/unit/test_kserve_front.py keeps the two in step.
DEFAULT_MAX_ELEMENTS = 2**24
# Arrays and objects inside one another. The deepest request the models take is 6
# (body > inputs > input > data of a rank-3 tensor); Triton's recursive readers
# overflow their stack on ~100k, Python's parser stops at its recursion limit, which
# depends on the caller's stack: a bound of our own makes the answer the same everywhere.
MAX_JSON_DEPTH = 32
_FLOAT_MAX = {
    "FP16": 65504.0,
    "BF16": 3.3895313892515355e38,
    "FP32": 3.4028234663852886e38,
    "FP64": 1.7976931348623157e308,
}
# datatype -> bytes per element (BYTES: its 4-byte length prefix at least)
_SIZES = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
    "BYTES": 4,
}
# Triton's own request parameters and the JSON type it insists on (else a 500).
_RESERVED = {
    "binary_data_output": bool,
    "priority": "uint",
    "timeout": "uint",
    "sequence_start": bool,
    "sequence_end": bool,
    "sequence_id": "uint_or_str",
}


class Refused(Exception):
    """A request the front answers itself: `status` and Triton's `{"error": message}`."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InputSpec:
    datatype: str  # KServe's name: FP32, BYTES, ...
    dims: tuple[int, ...]  # without the batch dimension; -1 variable


@dataclass(frozen=True)
class ModelSpec:
    name: str
    max_batch_size: int
    inputs: Mapping[str, InputSpec]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelSpec:
        """From Triton's JSON model config (GET /v2/models/{m}/config)."""
        inputs = {}
        for entry in config.get("input", []):
            datatype = str(entry.get("data_type", "")).removeprefix("TYPE_")
            inputs[entry["name"]] = InputSpec(
                "BYTES" if datatype == "STRING" else datatype, tuple(int(d) for d in entry.get("dims", []))
            )
        return cls(str(config.get("name", "")), int(config.get("max_batch_size", 0) or 0), inputs)


# --- checks on parsed JSON (pure: unit-tested on config dicts) ----------------------------
def _is_uint(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**64


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise Refused(f"{where} must be a JSON object, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _check_parameters(parameters: Any, where: str, *, reserved: bool = True) -> None:
    for key, value in _object(parameters, where).items():
        kind = _RESERVED.get(key) if reserved else None
        if kind is bool and type(value) is not bool:
            raise Refused(f"{where} '{key}' must be true or false, got {_json_type(value)}")
        if kind == "uint" and not _is_uint(value):
            raise Refused(f"{where} '{key}' must be an integer >= 0, got {json.dumps(value)[:40]}")
        if kind == "uint_or_str" and not (_is_uint(value) or isinstance(value, str)):
            raise Refused(f"{where} '{key}' must be an integer >= 0 or a string")
        if kind is None and (value is None or isinstance(value, (list, dict))):
            raise Refused(f"{where} '{key}' must be a string, a number or a boolean, got {_json_type(value)}")


def _leaves(data: Any, where: str, *, flat: bool = False):
    """The values of a (nested) JSON array, row-major, as Triton reads them."""
    if not isinstance(data, list):
        raise Refused(f"{where}: 'data' must be a JSON array, got {_json_type(data)}")
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                if flat:
                    raise Refused(f"{where}: /generate takes a value or a flat array of values, not nested arrays")
                stack.append(iter(value))
                break
            yield value
        else:
            stack.pop()


def _check_values(values, datatype: str, where: str) -> int:
    """How many values; Refused at the first one the datatype cannot hold exactly."""
    count = 0
    if datatype == "BYTES":
        accepts, expected = (lambda v: type(v) is str), "strings"
    elif datatype == "BOOL":
        accepts, expected = (lambda v: type(v) is bool), "true or false"
    elif datatype in _FLOAT_MAX:
        top = _FLOAT_MAX[datatype]
        accepts = lambda v: type(v) in (int, float) and -top <= v <= top  # noqa: E731 (NaN, inf fail too)
        expected = f"finite numbers within +-{top:.8g}"
    else:
        bits = _SIZES[datatype] * 8
        low, high = (0, 2**bits - 1) if datatype.startswith("U") else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        accepts, expected = (lambda v: type(v) is int and low <= v <= high), f"integers in [{low}, {high}]"
    for value in values:
        if not accepts(value):
            shown = json.dumps(value)[:40]
            raise Refused(f"{where} is {datatype}: its values must be {expected}, got {shown} (element {count})")
        count += 1
    return count


def _check_dims(spec: ModelSpec, name: str, shape: list[int], max_elements: int) -> int:
    """The element count of a declared shape that fits the config; Refused otherwise."""
    want = spec.inputs[name].dims
    batched = spec.max_batch_size > 0
    where = f"input '{name}' of model '{spec.name}'"
    expected = (["batch"] if batched else []) + [str(d) if d >= 0 else "-1" for d in want]
    if len(shape) != len(want) + batched:
        raise Refused(f"{where} has shape {shape}; the model takes rank {len(expected)}: [{', '.join(expected)}]")
    if batched and not 1 <= shape[0] <= spec.max_batch_size:
        raise Refused(f"{where} has batch size {shape[0]}; the model takes 1 to {spec.max_batch_size}")
    for axis, (size, dim) in enumerate(zip(shape[batched:], want), start=batched):
        if dim >= 0 and size != dim:
            raise Refused(f"{where} has shape {shape}: dimension {axis} must be {dim} ([{', '.join(expected)}])")
    elements = math.prod(shape)
    if elements > max_elements:
        raise Refused(f"{where} declares shape {shape}, {elements} elements; the front's limit is {max_elements}")
    return elements


def check_infer(
    spec: ModelSpec, header: Any, binary_bytes: int = 0, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> None:
    """An /infer body's JSON (the header, with the binary extension) against the model;
    `binary_bytes`: how many bytes follow the header. Refused naming the problem."""
    header = _object(header, "the request")
    if "id" in header and not isinstance(header["id"], str):
        raise Refused("the request's 'id' must be a string")
    if "parameters" in header:
        _check_parameters(header["parameters"], "request parameter")
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise Refused("the request must have 'inputs', an array of input objects")
    seen, binary_total = set(), 0
    for item in inputs:
        item = _object(item, "each of 'inputs'")
        name = item.get("name")
        if not isinstance(name, str) or name not in spec.inputs:
            known = ", ".join(spec.inputs) or "none"
            raise Refused(f"model '{spec.name}' has no input {json.dumps(name)[:80]} (its inputs: {known})")
        if name in seen:
            raise Refused(f"input '{name}' is given twice")
        seen.add(name)
        where, datatype = f"input '{name}' of model '{spec.name}'", spec.inputs[name].datatype
        if item.get("datatype") != datatype:
            given = json.dumps(item.get("datatype"))[:40]
            raise Refused(f"{where} is {datatype}; the request says {given}")
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise Refused(f"{where}: 'shape' must be an array of integers >= 0")
        elements = _check_dims(spec, name, shape, max_elements)
        parameters = _object(item.get("parameters", {}), f"{where}: 'parameters'")
        if any(key.startswith("shared_memory") for key in parameters):
            raise Refused(f"{where}: shared memory is not accepted through this front")
        if ("data" in item) == ("binary_data_size" in parameters):
            raise Refused(f"{where} must have either 'data' or 'parameters.binary_data_size'")
        if "data" in item:
            if datatype in ("FP16", "BF16"):
                raise Refused(f"{where} is {datatype}: send it with the binary extension, JSON cannot hold it")
            given = _check_values(_leaves(item["data"], where), datatype, where)
            if given != elements:
                raise Refused(f"{where} declares shape {shape} ({elements} elements) but 'data' holds {given}")
            continue
        size = parameters["binary_data_size"]
        if not _is_uint(size):
            raise Refused(f"{where}: 'binary_data_size' must be an integer >= 0")
        need = elements * _SIZES[datatype]
        if size < need if datatype == "BYTES" else size != need:
            rule = "at least" if datatype == "BYTES" else "exactly"
            raise Refused(
                f"{where} declares shape {shape}: its binary data must be {rule} {need} bytes, "
                f"'binary_data_size' says {size}"
            )
        binary_total += size
    if binary_total != binary_bytes:
        raise Refused(
            f"the inputs' binary_data_size add up to {binary_total} bytes, but {binary_bytes} "
            "bytes follow the JSON header"
        )
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list):
        raise Refused("the request's 'outputs' must be an array of output objects")
    for item in outputs:
        item = _object(item, "each of 'outputs'")
        if not isinstance(item.get("name"), str):
            raise Refused("each of 'outputs' needs a 'name' string")
        parameters = _object(item.get("parameters", {}), f"output '{item['name']}': 'parameters'")
        if any(key.startswith("shared_memory") for key in parameters):
            raise Refused(f"output '{item['name']}': shared memory is not accepted through this front")
        if "binary_data" in parameters and type(parameters["binary_data"]) is not bool:
            raise Refused(f"output '{item['name']}': 'binary_data' must be true or false")
        if "classification" in parameters and not _is_uint(parameters["classification"]):
            raise Refused(f"output '{item['name']}': 'classification' must be an integer >= 0")


def check_generate(spec: ModelSpec, body: Any, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> None:
    """A /generate(_stream) body: keys naming inputs hold a value or a flat array; the
    others become request parameters (a string, a number or a boolean)."""
    body = _object(body, "the request")
    for key, value in body.items():
        if key not in spec.inputs:
            if key == "id" and not isinstance(value, str):
                raise Refused("the request's 'id' must be a string")
            if key == "parameters":
                _check_parameters(value, "request parameter", reserved=False)
            elif key != "id":
                _check_parameters({key: value}, "request parameter", reserved=False)
            continue
        where, want = f"input '{key}' of model '{spec.name}'", spec.inputs[key]
        count = _check_values(
            _leaves(value if isinstance(value, list) else [value], where, flat=True), want.datatype, where
        )
        fixed, variable = math.prod(d for d in want.dims if d >= 0), sum(d < 0 for d in want.dims)
        if variable > 1:
            raise Refused(
                f"{where} has shape {list(want.dims)}: more than one variable dimension cannot be "
                "sent through /generate; use /infer"
            )
        if count == 0 or (count != fixed if not variable else count % fixed):
            rule = f"exactly {fixed}" if not variable else f"a positive multiple of {fixed}"
            raise Refused(f"{where} takes dims {list(want.dims)}: {rule} values, got {count}")
        if count > max_elements:
            raise Refused(f"{where} holds {count} values; the front's limit is {max_elements}")


# --- parsing: what Python reads must be what Triton's RapidJSON reads --------------------
def _reject_constant(name: str):
    raise Refused(f"the JSON holds {name}, which JSON does not allow")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    # RapidJSON takes a repeated key's FIRST value, Python its last: a body could show
    # this front "shape": [1] and Triton "shape": [1099511627776]. One set per object
    # (the dict itself) keeps this linear in the body whatever the key count.
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise Refused(f"the JSON repeats the key '{key[:80]}'")
            seen.add(key)
    return value


# A JSON string, or what is left of one that never closes: every quote starts a match
# that cannot fail, so the scan never restarts inside a string (restarting at each
# quote of '"\\"\\"...' would be quadratic). Possessive: no backtracking either.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = np.zeros(256, np.int8)
_BRACKET_STEP[list(b"[{")], _BRACKET_STEP[list(b"]}")] = 1, -1
_DEPTH_CHUNK = 1 << 20  # brackets per cumulative sum: a few MB of memory at most


def json_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in `raw` (valid JSON or not), in time linear
    in its length and without recursion: strings dropped, then a running bracket count."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    deepest = level = 0
    for start in range(0, len(brackets), _DEPTH_CHUNK):
        chunk = np.frombuffer(brackets, np.uint8, min(_DEPTH_CHUNK, len(brackets) - start), start)
        levels = np.cumsum(_BRACKET_STEP[chunk], dtype=np.int64) + level
        deepest, level = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def parse_json(raw: bytes, what: str = "the request body", *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no repeated keys, arrays and objects at most
    `max_depth` deep. Every step is linear in the body's length."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Refused(f"{what} is not UTF-8 (byte {error.start})") from None
    if json_depth(raw) > max_depth:
        raise Refused(f"{what} nests arrays or objects too deeply (the front's limit is {max_depth} levels)")
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except RecursionError:  # not reached under the depth bound; kept as a guard
        raise Refused(f"{what} nests arrays or objects too deeply") from None
    except ValueError as error:  # JSONDecodeError, and integers past Python's digit limit
        raise Refused(f"{what} is not valid JSON: {str(error)[:200]}") from None
