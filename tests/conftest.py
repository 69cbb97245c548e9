"""Shared fixtures: the tiny random CSM checkpoint (single-file and sharded), built once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    # Imported here: torch and transformers take seconds, and many tests need neither.
    from export.tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-csm") / "checkpoint", seed=0)


@pytest.fixture(scope="session")
def sharded_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint re-saved in the real model's sharded layout
    (model.safetensors.index.json + several model-0000X-of-0000N.safetensors)."""
    from transformers import CsmForConditionalGeneration

    folder = tmp_path_factory.mktemp("tiny-csm-sharded") / "checkpoint"
    CsmForConditionalGeneration.from_pretrained(tiny_checkpoint).save_pretrained(folder, max_shard_size="10MB")
    for source in tiny_checkpoint.iterdir():  # tokenizer, processor, chat template
        if not (folder / source.name).exists() and not source.name.startswith("model"):
            (folder / source.name).symlink_to(source)
    return folder


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    """The engine's language model over the tiny checkpoint, on the CPU (fp32)."""
    from csm_triton.engine import CsmLM

    return CsmLM.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def builder(tiny_checkpoint):
    """csm_prepare's prompt builder over the tiny checkpoint's tokenizer."""
    from csm_triton.core.prompt import PromptBuilder

    return PromptBuilder(tiny_checkpoint)
