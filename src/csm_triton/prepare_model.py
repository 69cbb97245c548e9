"""csm_prepare: text (+ optional voice reference) -> CSM prompt tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from csm_triton import triton_adapter as triton
from csm_triton import validation
from csm_triton.prompt import PromptBuilder


class PrepareModel(triton.PythonModel):
    def initialize_model(self, args, model_config):
        tokenizer_dir = triton.config_parameter(model_config, "tokenizer_dir", "tokenizer")
        self.prompt_builder = PromptBuilder(Path(triton.model_directory(args)) / tokenizer_dir)

    def handle(self, request):
        text = validation.single_text(triton.input_texts(request, "TEXT"), "TEXT")
        reference_text = validation.single_text(
            triton.input_texts(request, "REFERENCE_TEXT", required=False), "REFERENCE_TEXT", required=False
        )
        reference_codes = triton.input_array(request, "reference_codes", required=False)
        prompt = self.prompt_builder.prepare(text, reference_text, reference_codes)
        return {"input_ids": prompt.input_ids, "audio_codes": prompt.audio_codes}
