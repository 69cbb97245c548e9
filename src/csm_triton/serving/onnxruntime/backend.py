"""The Triton side of the embedded `onnxruntime` backend (a Python-based backend).

`csm-triton-server prepare` copies `model.py` beside this module to
`<home>/backends/onnxruntime/model.py`; Triton then serves every model whose config
says `platform: "onnxruntime_onnx"` or `backend: "onnxruntime"` with it (the NGC
container uses its native backend for the same configs). The session logic is
`csm_triton.serving.onnxruntime.session`, testable without Triton.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from csm_triton.serving.onnxruntime.session import OnnxSession, model_file
from csm_triton.triton.adapter import PythonModel, build_response, error_response, input_array, log_info
from csm_triton.triton.parameters import instance_device

__all__ = ["OnnxRuntimeModel"]


class OnnxRuntimeModel(PythonModel):
    """The TritonPythonModel of the Python-based backend `onnxruntime`."""

    def initialize_model(self, args: Mapping[str, str], model_config: dict) -> None:
        path = model_file(args["model_repository"], args["model_version"], model_config)
        self.session = OnnxSession(
            path,
            model_config,
            device=instance_device(args),
        )
        intra, inter = self.session.threads
        log_info(f"{self.model_name}: onnxruntime session on {path} (threads intra={intra} inter={inter})")

    def read_inputs(self, request) -> dict[str, np.ndarray | None]:
        return {spec.name: input_array(request, spec.name, required=not spec.optional) for spec in self.session.inputs}

    # Replaces PythonModel's one-request-at-a-time execute (so there is no `handle`):
    # the session runs compatible requests as one batch, and a request that fails
    # validation still gets its own error without failing its batch-mates.
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
