"""The tiny checkpoint is a faithful stand-in for sesame/csm-1b, and broken checkpoints
are refused in one line naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, CsmForConditionalGeneration

from csm_triton import constants as C
from export.checkpoint import CheckpointError, resolve_checkpoint, validate_checkpoint
from export.tiny_checkpoint import build_tiny_checkpoint


def linked_copy(source: Path, target: Path) -> Path:
    """A checkpoint whose files are symlinks to `source`'s: cheap, and a test replaces
    only the file it breaks."""
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).symlink_to(path)
    return target


def replace_file(path: Path, content: bytes) -> None:
    path.unlink()
    path.write_bytes(content)


def refusal(path: Path) -> str:
    with pytest.raises(CheckpointError) as caught:
        validate_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_tiny_checkpoint_has_the_real_layout(tiny_checkpoint):
    names = {path.name for path in tiny_checkpoint.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
    } <= names
    assert validate_checkpoint(tiny_checkpoint) == tiny_checkpoint.resolve()
    generation = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert generation["_from_model_config"] is False
    assert generation["depth_decoder_top_k"] == C.DEFAULT_TOP_K
    assert generation["depth_decoder_suppress_tokens"] == [2048, 2049, 2050]


def test_tiny_checkpoint_loads_and_generates_with_a_reference(tiny_checkpoint):
    model = CsmForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    # The depth decoder's sampling settings survive the reload (they are dropped,
    # silently turning it greedy, when _from_model_config is left True).
    depth_generation = model.depth_decoder.generation_config
    assert (depth_generation.do_sample, depth_generation.top_k, depth_generation.temperature) == (True, 50, 0.9)
    assert model.config.num_codebooks == C.NUM_CODEBOOKS and model.config.vocab_size == C.LM_AUDIO_VOCAB_SIZE

    t = np.arange(C.SAMPLE_RATE) / C.SAMPLE_RATE
    reference = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    conversation = [
        {"role": "0", "content": [{"type": "text", "text": "Hello there."}, {"type": "audio", "path": reference}]},
        {"role": "0", "content": [{"type": "text", "text": "How are you?"}]},
    ]
    inputs = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(processor.tokenizer.convert_tokens_to_ids(C.AUDIO_TOKEN)) == 13  # 1 s of Mimi frames
    torch.manual_seed(0)
    frames = 4
    with torch.no_grad():
        audio = model.generate(**inputs, max_new_tokens=frames, output_audio=True)
    assert audio[0].shape == (frames * C.SAMPLES_PER_FRAME,)
    assert torch.isfinite(audio[0]).all()


def test_build_is_deterministic_by_seed(tiny_checkpoint, tmp_path):
    again = build_tiny_checkpoint(tmp_path / "again", seed=0)
    other = build_tiny_checkpoint(tmp_path / "other", seed=1)
    weights = (tiny_checkpoint / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_checkpoint / name).read_bytes()


@pytest.mark.parametrize(
    "name", ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]
)
def test_missing_file_is_refused(tiny_checkpoint, tmp_path, name):
    checkpoint = linked_copy(tiny_checkpoint, tmp_path / "checkpoint")
    (checkpoint / name).unlink()
    assert refusal(checkpoint) == f"checkpoint file missing: {checkpoint.resolve() / name}"


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "processor_config.json"])
def test_corrupt_json_is_refused(tiny_checkpoint, tmp_path, name):
    checkpoint = linked_copy(tiny_checkpoint, tmp_path / "checkpoint")
    replace_file(checkpoint / name, b'{"model_type": "csm",')
    assert refusal(checkpoint).startswith(f"checkpoint file corrupt: {checkpoint.resolve() / name} (")


def test_other_model_type_is_refused(tiny_checkpoint, tmp_path):
    checkpoint = linked_copy(tiny_checkpoint, tmp_path / "checkpoint")
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    replace_file(checkpoint / "config.json", json.dumps({**config, "model_type": "llama"}).encode())
    assert "model_type is 'llama'" in refusal(checkpoint)


@pytest.mark.parametrize("cut", [1, 1000, "header"])
def test_truncated_weights_are_refused(tiny_checkpoint, tmp_path, cut):
    checkpoint = linked_copy(tiny_checkpoint, tmp_path / "checkpoint")
    weights = (tiny_checkpoint / "model.safetensors").read_bytes()
    truncated = weights[:100] if cut == "header" else weights[:-cut]
    replace_file(checkpoint / "model.safetensors", truncated)
    assert refusal(checkpoint).startswith(f"checkpoint file corrupt: {checkpoint.resolve() / 'model.safetensors'} (")


def test_sharded_checkpoint_is_accepted(sharded_checkpoint):
    assert not (sharded_checkpoint / "model.safetensors").exists()
    index = json.loads((sharded_checkpoint / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert validate_checkpoint(sharded_checkpoint) == sharded_checkpoint.resolve()


def test_sharded_checkpoint_with_a_missing_shard_is_refused(sharded_checkpoint, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(sharded_checkpoint, checkpoint, symlinks=True)
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (checkpoint / shard).unlink()
    assert refusal(checkpoint) == f"checkpoint file missing: {checkpoint.resolve() / shard}"


def test_shard_lacking_indexed_tensors_is_refused(sharded_checkpoint, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(sharded_checkpoint, checkpoint, symlinks=True)
    index_path = checkpoint / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    # Point one of the first shard's tensors at the second shard, which lacks it.
    tensor = next(name for name, shard in index["weight_map"].items() if shard == first)
    index["weight_map"][tensor] = second
    replace_file(index_path, json.dumps(index).encode())
    message = refusal(checkpoint)
    assert message.startswith(f"checkpoint file corrupt: {checkpoint.resolve() / second} (") and tensor in message


def test_resolve_accepts_a_local_folder(tiny_checkpoint):
    assert resolve_checkpoint(str(tiny_checkpoint)) == tiny_checkpoint.resolve()


def test_resolve_refuses_a_missing_local_folder(tmp_path):
    with pytest.raises(CheckpointError, match="^checkpoint folder missing: "):
        resolve_checkpoint(str(tmp_path / "nowhere"))


def test_resolve_needs_a_token_for_the_hub(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(CheckpointError) as caught:
        resolve_checkpoint("sesame/csm-1b")
    assert "HF_TOKEN is not set" in str(caught.value) and "\n" not in str(caught.value)


def test_resolve_reports_an_unreachable_hub_in_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # Offline and with an empty cache: behaves like a machine without network,
    # whatever this one has.
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError) as caught:
        resolve_checkpoint("sesame/csm-1b")
    message = str(caught.value)
    assert message.startswith("could not download checkpoint 'sesame/csm-1b' from the hub")
    assert "\n" not in message
