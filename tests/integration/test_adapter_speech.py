"""Issue 26 end to end: a LoRA adapter voice registered through voice_register speaks
through csm_prepare -> csm_generate -> csm_lm, per request, beside the base model. The
server's codes are compared with the engine run in-process with the same adapter file
(tests/model/test_engine_lora.py checks that engine against peft's own merged model), and
with the base model's codes for the same prompt (they must differ: the adapter acts)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tritonclient.http as http
from tritonclient.utils import np_to_triton_dtype

from csm_triton import constants as C
from csm_triton.core.adapters import base_model_sha256, load_lora_adapter
from csm_triton.engine import CsmLM, EngineConfig, GenerationEngine, GenerationRequest
from csm_triton.engine.lora import LoraWeights

from .test_voice_models import tensor, text, token

pytest.importorskip("peft")

VOICE = "speaks-tuned"
SAMPLING = {
    "TEMPERATURE": np.array([0.7], np.float32),
    "TOP_K": np.array([20], np.int32),
    "SEED": np.array([11], np.int64),
    "MAX_AUDIO_SECONDS": np.array([0.48], np.float32),
}  # 6 frames


@pytest.fixture(scope="module")
def adapter_folder(tiny_checkpoint, tmp_path_factory):
    """A trained-looking adapter (random, non-zero A and B) in make finetune's layout."""
    from peft import LoraConfig, get_peft_model
    from transformers import CsmForConditionalGeneration

    from finetune.train import DEFAULT_TARGET_MODULES, LM_PREFIX

    run = tmp_path_factory.mktemp("tuned-run")
    torch.manual_seed(5)
    model = get_peft_model(
        CsmForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32),
        LoraConfig(
            r=4,
            lora_alpha=8,
            init_lora_weights=False,
            target_modules=LM_PREFIX + "(" + "|".join(DEFAULT_TARGET_MODULES) + ")$",
        ),
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.05)
    model.save_pretrained(run / "adapter")
    (run / "manifest.json").write_text(json.dumps({"base_model_sha256": base_model_sha256(tiny_checkpoint)}))
    return run


def infer(client, model: str, inputs: dict[str, np.ndarray], outputs: list[str], headers=None) -> dict:
    items = []
    for name, value in inputs.items():
        item = http.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        item.set_data_from_numpy(value)
        items.append(item)
    result = client.infer(model, items, headers=headers)
    return {name: result.as_numpy(name) for name in outputs}


def test_an_adapter_voice_speaks_with_its_adapter_per_request(http_client, adapter_folder, tiny_checkpoint):
    blob = lambda data: np.array([data], dtype=np.object_)  # noqa: E731
    infer(
        http_client,
        "voice_register",
        {
            "VOICE_ID": text(VOICE),
            "ADAPTER_CONFIG": blob((adapter_folder / "adapter" / "adapter_config.json").read_bytes()),
            "ADAPTER_WEIGHTS": blob((adapter_folder / "adapter" / "adapter_model.safetensors").read_bytes()),
            "ADAPTER_MANIFEST": blob((adapter_folder / "manifest.json").read_bytes()),
        },
        ["VOICE"],
        headers=token(),
    )
    try:
        prepare_outputs = [
            "input_ids",
            "prompt_codes",
            "segment_ids",
            "segment_token_counts",
            "segment_max_frames",
            "audio_token_ids",
            "adapter_id",
        ]
        tuned = infer(
            http_client,
            "csm_prepare",
            {"TEXT": text("Tuned voices speak here."), "VOICE_ID": text(VOICE)},
            prepare_outputs,
        )
        assert tuned["adapter_id"][0] == VOICE.encode()
        base = dict(tuned, adapter_id=np.array([b""], dtype=np.object_))
        codes = {}
        for name, prepared in (("tuned", tuned), ("base", base)):
            generated = infer(http_client, "csm_generate", {**prepared, **SAMPLING}, ["audio_codes"])
            codes[name] = generated["audio_codes"][0].T  # [frames, 32]

        # The same request in-process, the adapter read from the same files the server stored.
        lm = CsmLM.from_checkpoint(tiny_checkpoint, device="cpu")
        adapter = load_lora_adapter(adapter_folder / "adapter", lm.config)
        engine = GenerationEngine(
            lm,
            EngineConfig(max_slots=1, lora_slots=1),
            adapter_loader=lambda _: LoraWeights(adapter.matrices, adapter.scale, adapter.rank),
        )
        handle = engine.submit(
            GenerationRequest(
                tuned["input_ids"],
                tuned["prompt_codes"].reshape(-1, C.NUM_CODEBOOKS),
                max_frames=6,
                temperature=0.7,
                top_k=20,
                seed=11,
                adapter=VOICE,
            )
        )
        engine.run_until_idle()
        expected = handle.result(timeout=10).codes
        np.testing.assert_array_equal(codes["tuned"], expected)
        assert len(expected) > 0 and not np.array_equal(codes["base"], codes["tuned"]), "the adapter changed nothing"
    finally:
        http_client.infer("voice_delete", [tensor(http, "VOICE_ID", text(VOICE))], headers=token())
