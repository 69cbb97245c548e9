"""csm_prepare: text + voice (a stored VOICE_ID, or inline REFERENCE_AUDIO with its
REFERENCE_TEXT) -> CSM prompt tensors for csm_lm."""

from __future__ import annotations

from pathlib import Path

from csm_triton.triton import adapter as triton
from csm_triton.core import validation
from csm_triton.core.prompt import PromptBuilder
from csm_triton.triton.models.voices import forward_mimi_encoder, voice_directory
from csm_triton.core.voice_store import VoiceStore
from csm_triton.core.voices import VoiceResolver


class PrepareModel(triton.PythonModel):
    def initialize_model(self, args, model_config):
        tokenizer_dir = self.parameters.text("tokenizer_dir", "tokenizer")
        self.prompt_builder = PromptBuilder(Path(triton.model_directory(args)) / tokenizer_dir)
        self.voices = VoiceResolver(VoiceStore(voice_directory(args, self.parameters)), forward_mimi_encoder)

    def handle(self, request):
        # TEXT is checked here, before the voice is resolved (maybe encoded through BLS),
        # so a bad text costs nothing; PromptBuilder.prepare trusts it. REFERENCE_TEXT's
        # content is the VoiceResolver's to check, for this model and voice_register alike.
        text = validation.single_text(triton.input_texts(request, "TEXT"), "TEXT")
        voice_id = triton.input_texts(request, "VOICE_ID", required=False)
        reference_text = triton.input_texts(request, "REFERENCE_TEXT", required=False)
        voice = self.voices.resolve(
            voice_id=validation.single_text(voice_id, "VOICE_ID", required=False),
            reference_audio=triton.input_array(request, "REFERENCE_AUDIO", required=False),
            reference_sample_rate=triton.input_array(request, "REFERENCE_SAMPLE_RATE", required=False),
            reference_text=validation.single_string(reference_text, "REFERENCE_TEXT", required=False),
        )
        reference_text, reference_codes = voice if voice is not None else (None, None)
        prompt = self.prompt_builder.prepare(text, reference_text, reference_codes)
        return {"input_ids": prompt.input_ids, "prompt_codes": prompt.audio_codes}
