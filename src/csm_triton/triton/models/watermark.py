"""watermark / watermark_detect: the Triton side of `csm_triton.core.watermark`.

`model_repository/watermark*/1/model.py` name these. `watermark` sits after
mimi_decoder in the csm_tts ensemble; its config parameter `enabled` ("true" or
"false", default "true") lets a deployment pass audio through unmarked, in which
case Perth is not even loaded.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from csm_triton import constants as C
from csm_triton.core import validation
from csm_triton.core.watermark import Watermarker
from csm_triton.triton import adapter as triton
from csm_triton.triton.parameters import instance_device

__all__ = ["WatermarkDetectModel", "WatermarkModel"]

_SAMPLE_RATE_TENSOR = np.array([C.SAMPLE_RATE], dtype=np.int32)


def _load_watermarker(args: Mapping[str, str], model_name: str) -> Watermarker:
    watermarker = Watermarker(instance_device(args))
    watermarker.warm_up()  # so the first client does not pay ~1 s of set-up
    triton.log_info(f"{model_name}: Perth watermark loaded on {watermarker.device}")
    return watermarker


class WatermarkModel(triton.PythonModel):
    """audio_values [1, 1, samples] (mimi_decoder's output) -> AUDIO [samples], SAMPLE_RATE [1]."""

    def initialize_model(self, args, model_config):
        self.enabled = self.parameters.boolean("enabled", True)
        self.watermarker = _load_watermarker(args, self.model_name) if self.enabled else None
        if not self.enabled:
            triton.log_info(f"{self.model_name}: watermarking disabled by config; audio passes through")

    def handle(self, request):
        audio = validation.audio_samples(triton.input_array(request, "audio_values"), "audio_values")
        if self.enabled:
            audio = self.watermarker.apply(audio, C.SAMPLE_RATE, name="audio_values")
        return {"AUDIO": audio, "SAMPLE_RATE": _SAMPLE_RATE_TENSOR}


class WatermarkDetectModel(triton.PythonModel):
    """AUDIO [samples] at SAMPLE_RATE [1] -> SCORE [1] in [0, 1], WATERMARKED [1]
    (SCORE >= WATERMARK_THRESHOLD); the rule is `core.watermark.Detection`'s."""

    def initialize_model(self, args, model_config):
        self.watermarker = _load_watermarker(args, self.model_name)

    def handle(self, request):
        sample_rate = validation.input_sample_rate(triton.input_array(request, "SAMPLE_RATE"), "SAMPLE_RATE")
        detection = self.watermarker.detect(triton.input_array(request, "AUDIO"), sample_rate, name="AUDIO")
        return {
            "SCORE": np.array([detection.score], dtype=np.float32),
            "WATERMARKED": np.array([detection.watermarked], dtype=np.bool_),
        }
