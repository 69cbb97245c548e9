"""LoRA adapters as voices (issue 26, registration): a real peft adapter on the tiny
checkpoint is read back exactly as peft applies it, every adapter the engine would serve
differently from peft is refused with one line naming why, and the voice store keeps
adapter voices with its guarantees: nothing half-registered after a failure mid-write or
a killed writer, the caps, listing, deletion, and the client's folder reading."""

from __future__ import annotations

import errno
import json
import os
import time

import numpy as np
import pytest
import torch

from csm_triton import constants as C
from csm_triton.core import adapters, voice_leftovers, voice_records, voice_store
from csm_triton.core.adapters import ServedBase, base_model_sha256, check_adapter, load_lora_adapter
from csm_triton.core.voice_store import VoiceStore
from csm_triton.core.voices import VoiceResolver
from csm_triton.errors import InvalidInput, PermissionDenied

RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def peft_model(tiny_checkpoint):
    """The tiny CSM with a rank-4 LoRA on every supported projection (A and B random, so
    the adapter is not a no-op), as finetune.train targets them."""
    from peft import LoraConfig, get_peft_model
    from transformers import CsmForConditionalGeneration

    from finetune.train import DEFAULT_TARGET_MODULES, LM_PREFIX

    torch.manual_seed(0)
    model = CsmForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    config = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        init_lora_weights=False,
        bias="none",
        target_modules=LM_PREFIX + "(" + "|".join(DEFAULT_TARGET_MODULES) + ")$",
    )
    return get_peft_model(model, config)


@pytest.fixture(scope="module")
def adapter_folder(peft_model, tiny_checkpoint, tmp_path_factory):
    """OUT/adapter + OUT/manifest.json, as `make finetune` leaves them."""
    run = tmp_path_factory.mktemp("run")
    peft_model.save_pretrained(run / "adapter")
    (run / "manifest.json").write_text(json.dumps({"base_model_sha256": base_model_sha256(tiny_checkpoint)}))
    return run / "adapter"


@pytest.fixture()
def files(adapter_folder):
    return {
        "config": (adapter_folder / adapters.CONFIG_FILE).read_bytes(),
        "weights": (adapter_folder / adapters.WEIGHTS_FILE).read_bytes(),
        "manifest": (adapter_folder.parent / "manifest.json").read_bytes(),
    }


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    return ServedBase(tiny_checkpoint)


def _tensors(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


def _save(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def _config(files, **changes) -> bytes:
    return json.dumps({**json.loads(files["config"]), **changes}).encode()


# --- reading an adapter ----------------------------------------------------------------------
def test_an_adapter_reads_back_as_the_matrices_peft_applies(adapter_folder, peft_model, tiny_checkpoint):
    adapter = load_lora_adapter(adapter_folder, tiny_checkpoint)
    assert adapter.rank == RANK and adapter.scale == ALPHA / RANK
    assert adapter.target_modules == list(adapters.PROJECTIONS) and adapter.stacks == ["backbone", "depth"]
    assert len(adapter.matrices) == 2 * 2 * 7, "2 stacks x 2 layers x 7 projections"
    modules = dict(peft_model.named_modules())
    for (stack, layer, projection), (a, b) in adapter.matrices.items():
        kind = "self_attn" if projection in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        name = f"base_model.model.{adapters.STACKS[stack]}.layers.{layer}.{kind}.{projection}"
        linear = modules[name]
        assert a.dtype == b.dtype == torch.float32 and a.shape == (RANK, linear.in_features)
        assert b.shape == (linear.out_features, RANK)
        torch.testing.assert_close(a, linear.lora_A["default"].weight, rtol=0, atol=0)
        torch.testing.assert_close(b, linear.lora_B["default"].weight, rtol=0, atol=0)
        # What the engine adds to W x is what peft adds: scale * B (A x).
        x = torch.randn(3, linear.in_features)
        expected = linear(x) - linear.base_layer(x)
        torch.testing.assert_close(adapter.scale * (x @ a.T) @ b.T, expected, rtol=1e-5, atol=1e-6)


def test_the_base_hash_is_the_same_from_the_checkpoint_and_from_a_build_manifest(tiny_checkpoint, tmp_path):
    direct = base_model_sha256(tiny_checkpoint)
    digests = {
        f"csm_lm/1/checkpoint/{name}": hashlib_of(tiny_checkpoint / name)
        for name in ("config.json", "model.safetensors")
    }
    (tmp_path / "manifest.json").write_text(json.dumps({"artifacts_sha256": digests}))
    served = ServedBase(tiny_checkpoint, tmp_path / "manifest.json", "csm_lm/1/checkpoint/")
    assert served.sha256 == direct and len(direct) == 64
    wrong = {key: "0" * 64 for key in digests}
    (tmp_path / "manifest.json").write_text(json.dumps({"artifacts_sha256": wrong}))
    assert ServedBase(tiny_checkpoint, tmp_path / "manifest.json", "csm_lm/1/checkpoint/").sha256 != direct, (
        "the build manifest's digests are used, not re-read"
    )


def hashlib_of(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_check_adapter_accepts_the_finetune_layout_and_its_base_hash(files, base):
    checked = check_adapter(files["config"], files["weights"], base, manifest=files["manifest"])
    assert checked.recorded_base_sha256 == base.sha256 and checked.description()["rank"] == RANK


# --- refusals: one line each, naming the problem --------------------------------------------
CONFIG_REFUSALS = {
    "another PEFT method": ({"peft_type": "IA3"}, "is not a peft LoRA config"),
    "rank above the engine's": ({"r": C.MAX_ADAPTER_RANK + 1}, "rank r=65 is not supported"),
    "rank zero": ({"r": 0}, "rank r=0 is not supported"),
    "an embedding target": ({"target_modules": ["embed_tokens"]}, "target module 'embed_tokens' is not supported"),
    "trained biases": ({"bias": "all"}, 'bias="all" asks for trained biases'),
    "DoRA": ({"use_dora": True}, "DoRA"),
    "rsLoRA": ({"use_rslora": True}, "rsLoRA"),
    "modules to save": ({"modules_to_save": ["lm_head"]}, "fully trained modules"),
    "per-module ranks": ({"rank_pattern": {"q_proj": 8}}, "per-module ranks"),
    "PiSSA": ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
    "an unknown option": ({"use_something_new": True}, "option 'use_something_new' is set"),
    "a non-positive alpha": ({"lora_alpha": 0}, "lora_alpha=0 must be a positive number"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_REFUSALS))
def test_configs_the_engine_would_serve_differently_are_refused(files, base, case):
    changes, message = CONFIG_REFUSALS[case]
    with pytest.raises(InvalidInput, match="^adapter_config.json") as refused:
        check_adapter(_config(files, **changes), files["weights"], base)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_config_that_is_not_json_is_refused(files, base):
    with pytest.raises(InvalidInput, match="adapter_config.json is not valid JSON"):
        check_adapter(b"{not json", files["weights"], base)


def _drop(tensors, suffix):
    return {k: v for k, v in tensors.items() if not k.endswith(suffix)}


KEY = "base_model.model.backbone_model.layers.0.self_attn.q_proj"
TENSOR_REFUSALS = {
    "truncated file": (lambda data: data[:-100], "is corrupt or incomplete"),
    "garbage": (lambda data: b"\x00" * 64, "is corrupt or incomplete"),
    "a codec tensor": (
        lambda t: {
            **t,
            "base_model.model.codec_model.encoder_transformer.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(
                RANK, 4
            ),
        },
        "Mimi, the codec",
    ),
    "a DoRA magnitude": (lambda t: {**t, f"{KEY}.lora_magnitude_vector": torch.ones(64)}, "DoRA magnitude vector"),
    "a trained bias": (lambda t: {**t, f"{KEY}.lora_B.bias": torch.zeros(64)}, "a trained bias"),
    "a missing B": (lambda t: _drop(t, f"{KEY}.lora_B.weight"), "q_proj has no lora_B: a partial adapter"),
    "a NaN": (
        lambda t: {**t, f"{KEY}.lora_A.weight": torch.full_like(t[f"{KEY}.lora_A.weight"], float("nan"))},
        "NaN or infinite",
    ),
    "an integer tensor": (
        lambda t: {**t, f"{KEY}.lora_A.weight": t[f"{KEY}.lora_A.weight"].to(torch.int32)},
        "is torch.int32",
    ),
    "a layer the base lacks": (
        lambda t: {**t, KEY.replace("layers.0", "layers.7") + ".lora_A.weight": t[f"{KEY}.lora_A.weight"].clone()},
        "adapts layer 7, but the served base's backbone",
    ),
    "another rank than the config's": (
        lambda t: {**t, f"{KEY}.lora_A.weight": torch.zeros(RANK + 1, 64)},
        "an adapter for another base model or rank",
    ),
}


@pytest.mark.parametrize("case", sorted(TENSOR_REFUSALS))
def test_weights_the_engine_cannot_apply_are_refused(files, base, case):
    change, message = TENSOR_REFUSALS[case]
    if case in ("truncated file", "garbage"):
        weights = change(files["weights"])
    else:
        weights = _save(change(_tensors(files["weights"])))
    with pytest.raises(InvalidInput, match="^adapter_model.safetensors") as refused:
        check_adapter(files["config"], weights, base)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_an_adapter_for_another_base_is_refused_by_shape_and_by_hash(files, tiny_checkpoint):
    other = json.loads((tiny_checkpoint / "config.json").read_text())
    other["hidden_size"] *= 2
    with pytest.raises(
        InvalidInput,
        match=r"has shape \[64, 4\], the served base needs \[128, 4\] \(.*\): "
        r"an adapter for another base",
    ):
        check_adapter(files["config"], files["weights"], adapters.base_shapes(other))
    with pytest.raises(
        InvalidInput,
        match=r"^manifest.json: the adapter was trained on base .* this server serves "
        r"base 000000000000\.\.\.",
    ):
        check_adapter(
            files["config"],
            files["weights"],
            ServedBase(tiny_checkpoint),
            manifest=files["manifest"],
            served_base_sha256="0" * 64,
        )


def test_sizes_are_bounded_before_anything_is_parsed(files, base, monkeypatch, adapter_folder, tiny_checkpoint):
    monkeypatch.setattr(C, "MAX_ADAPTER_BYTES", len(files["weights"]) - 1)
    with pytest.raises(InvalidInput, match=r"^adapter_model.safetensors is [\d,]+ bytes; the limit is"):
        check_adapter(files["config"], files["weights"], base)
    read = []
    monkeypatch.setattr(type(adapter_folder), "read_bytes", lambda self: read.append(self) or b"")
    with pytest.raises(InvalidInput, match="the limit is"):
        load_lora_adapter(adapter_folder, tiny_checkpoint)
    assert not any(path.name == adapters.WEIGHTS_FILE for path in read), "the size is checked before reading"


# --- the store ---------------------------------------------------------------------------------
def _files_in(directory) -> list[str]:
    return sorted(os.listdir(directory))


def _register(store, files, base, voice_id="tuned", **options):
    resolver = VoiceResolver(store, lambda audio: np.zeros((max(1, audio.size // 1920), C.NUM_CODEBOOKS), np.int64))
    return resolver.register_adapter(
        voice_id, files["config"], files["weights"], base, manifest=files["manifest"], **options
    )


def test_an_adapter_voice_round_trip(tmp_path, files, base, tiny_checkpoint):
    store = VoiceStore(tmp_path)
    voice = _register(store, files, base, default_speaker=3)
    folder = store.adapter_dir("tuned")
    assert sorted(os.listdir(folder)) == sorted(adapters.ADAPTER_FILES)
    assert (folder / adapters.WEIGHTS_FILE).read_bytes() == files["weights"], "stored byte for byte"
    assert load_lora_adapter(folder, tiny_checkpoint).rank == RANK, "what the engine will read"
    (listed,) = store.list()
    assert listed == voice.summary() and listed == {
        "voice_id": "tuned",
        "transcript": "",
        "duration_seconds": 0.0,
        "created_at": voice.created_at,
        "owner": None,
        "kind": "adapter",
        "rank": RANK,
        "lora_alpha": float(ALPHA),
        "target_modules": list(adapters.PROJECTIONS),
        "stacks": ["backbone", "depth"],
        "base_model_sha256": base.sha256,
        "base_hash_checked": True,
        "size_bytes": len(files["config"]) + len(files["weights"]),
        "default_speaker": 3,
    }
    assert VoiceStore(tmp_path).get("tuned").summary() == listed, "another process reads it the same"
    assert store.delete("tuned")["kind"] == "adapter"
    assert _files_in(tmp_path) == [] and store.list() == []
    with pytest.raises(InvalidInput, match="unknown voice 'tuned'"):
        store.adapter_dir("tuned")


def test_an_adapter_voice_may_carry_its_own_clip(tmp_path, files, base):
    store = VoiceStore(tmp_path)
    voice = _register(
        store,
        files,
        base,
        reference_audio=np.full(24_000, 0.1, np.float32),
        reference_sample_rate=np.array([24_000]),
        reference_text="What the clip says.",
    )
    assert voice.has_clip and voice.codes.shape == (12, C.NUM_CODEBOOKS) and voice.duration_seconds == 1.0
    resolver = VoiceResolver(store, None)
    assert resolver.context_reference("tuned")[0] == "What the clip says."
    # As VOICE_ID it speaks with its adapter (csm_prepare's adapter_id) and its own clip as the reference.
    assert resolver.adapter_voice("tuned").voice_id == "tuned" and resolver.adapter_voice(None) is None
    assert resolver.resolve(voice_id="tuned")[0] == "What the clip says."
    store.delete("tuned")
    assert _files_in(tmp_path) == []


def test_clip_voices_keep_their_metadata_and_read_as_clips(tmp_path, files, base):
    store = VoiceStore(tmp_path)
    store.register("plain", np.zeros((5, C.NUM_CODEBOOKS), np.int64), "Hi.", 1.0)
    assert "kind" not in json.loads((tmp_path / "plain.json").read_text()), "the old layout, unchanged"
    assert store.get("plain").kind == "clip" and store.list()[0]["kind"] == "clip"
    with pytest.raises(InvalidInput, match="voice 'plain' is a clip voice, not a LoRA adapter"):
        store.adapter_dir("plain")
    _register(store, files, base)
    with pytest.raises(InvalidInput, match="without a reference clip; it cannot be a context turn"):
        VoiceResolver(store, None).context_reference("tuned")
    # Without a clip it speaks in the adapter's own voice: no reference turn.
    assert VoiceResolver(store, None).resolve(voice_id="tuned") is None
    assert VoiceResolver(store, None).adapter_voice("plain") is None


@pytest.mark.parametrize("failing", ["weights", "metadata"])
def test_a_failure_mid_registration_leaves_nothing(tmp_path, files, base, monkeypatch, failing):
    store = VoiceStore(tmp_path)
    store.register("kept", np.zeros((5, C.NUM_CODEBOOKS), np.int64), "Hi.", 1.0)
    before = _files_in(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if failing == "weights":  # the config landed in the temporary folder, the weights do not
        write_durable = voice_records.write_durable
        monkeypatch.setattr(
            voice_records,
            "write_durable",
            lambda path, data: disk_full() if path.name == adapters.WEIGHTS_FILE else write_durable(path, data),
        )
    else:  # the adapter folder is in place, the commit fails
        monkeypatch.setattr(voice_store, "write_metadata", lambda *a, **k: disk_full())
    with pytest.raises(InvalidInput, match=r"^voice store is full \(.*nothing was stored"):
        _register(store, files, base)
    assert _files_in(tmp_path) == before and [v["voice_id"] for v in store.list()] == ["kept"]
    monkeypatch.undo()
    assert [v["voice_id"] for v in VoiceStore(tmp_path).list()] == ["kept"]


def test_a_killed_writers_leftovers_are_swept_and_committed_adapters_kept(tmp_path, files, base, monkeypatch):
    store = VoiceStore(tmp_path)
    _register(store, files, base)
    kept = store.adapter_dir("tuned").name
    # A writer killed while filling its temporary folder (its pid is gone), and one killed
    # after the rename, before the metadata (an adapter folder no metadata names).
    dead = subprocess_pid()
    filling = tmp_path / f".orphan.abc.adapter.{_host()}~{dead}~1.tmp"
    filling.mkdir()
    (filling / adapters.CONFIG_FILE).write_bytes(b"{}")
    unnamed = tmp_path / "orphan.def.adapter"
    unnamed.mkdir()
    (unnamed / adapters.CONFIG_FILE).write_bytes(b"{}")
    old = time.time() - voice_leftovers.ORPHAN_GRACE_S - 5
    os.utime(unnamed, (old, old))
    os.utime(store.adapter_dir("tuned"), (old, old))
    assert set(store.sweep()) == {filling.name, unnamed.name}
    assert sorted(p for p in _files_in(tmp_path)) == sorted(["tuned.json", kept])


def subprocess_pid() -> int:
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _host() -> str:
    from csm_triton.core import files as core_files

    return core_files._host_tag()


def test_adapters_count_against_the_store_and_have_a_cap_of_their_own(tmp_path, files, base):
    store = VoiceStore(tmp_path, max_voices=3, max_adapters=1)
    _register(store, files, base, "first")
    with pytest.raises(InvalidInput, match=r"full of adapters: it holds 1 adapter voices.*max_stored_adapters = 1"):
        _register(store, files, base, "second")
    store.register("clip-a", np.zeros((5, C.NUM_CODEBOOKS), np.int64), "Hi.", 1.0)
    store.register("clip-b", np.zeros((5, C.NUM_CODEBOOKS), np.int64), "Hi.", 1.0)
    store.delete("first")
    store.max_adapters = 5
    _register(store, files, base, "third")
    with pytest.raises(InvalidInput, match=r"voice store is full: it holds 3 voices"):
        _register(store, files, base, "fourth")
    assert len(_files_in(tmp_path)) == 3 + 2 + 1, "3 metadata, 2 codes, 1 adapter folder"


def test_registration_refusals_write_nothing(tmp_path, files, base):
    store = VoiceStore(tmp_path)
    _register(store, files, base)
    with pytest.raises(InvalidInput, match="voice 'tuned' already exists"):
        _register(store, files, base)
    with pytest.raises(InvalidInput, match=r"'DEFAULT_SPEAKER' must be in \[0, 255\]"):
        _register(store, files, base, "other", default_speaker=256)
    with pytest.raises(InvalidInput, match="needs 'REFERENCE_AUDIO', 'REFERENCE_TEXT' and 'REFERENCE_SAMPLE_RATE'"):
        _register(store, files, base, "other", reference_audio=np.zeros(24_000, np.float32))
    with pytest.raises(InvalidInput, match="the adapter was trained on base"):
        VoiceResolver(store, None).register_adapter(
            "other",
            files["config"],
            files["weights"],
            base,
            manifest=json.dumps({"base_model_sha256": "1" * 64}).encode(),
        )
    assert [v["voice_id"] for v in store.list()] == ["tuned"] and len(_files_in(tmp_path)) == 2


def test_an_owned_adapter_voice_is_deleted_only_by_its_owner(tmp_path, files, base):
    store = VoiceStore(tmp_path)
    _register(store, files, base, owner="key-a")
    with pytest.raises(PermissionDenied, match="belongs to another key"):
        store.delete("tuned", owner="key-b")
    assert store.delete("tuned", owner="key-a")["owner"] == "key-a" and _files_in(tmp_path) == []


# --- the client's side ---------------------------------------------------------------------------
def test_the_client_reads_the_run_folder_and_sends_every_file(adapter_folder, files):
    from csm_clients import calls
    from csm_clients.adapters import read_adapter_folder
    from csm_clients.errors import InvalidRequest

    for folder in (adapter_folder, adapter_folder.parent):  # OUT/adapter or OUT
        read = read_adapter_folder(folder)
        assert (read.config, read.weights, read.manifest) == (files["config"], files["weights"], files["manifest"])
    call = calls.register_adapter("tuned", read, default_speaker=2)
    assert call.model == "voice_register" and call.admin
    assert call.inputs["ADAPTER_WEIGHTS"][0] == files["weights"] and call.inputs["DEFAULT_SPEAKER"].tolist() == [2]
    assert set(call.inputs) == {"VOICE_ID", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_MANIFEST", "DEFAULT_SPEAKER"}
    with pytest.raises(InvalidRequest, match="has no adapter_config.json: give the adapter folder"):
        read_adapter_folder(adapter_folder.parent.parent)


def test_the_cli_refuses_a_wrong_folder_before_sending(tmp_path, capsys):
    from csm_clients.cli import main

    assert main(["--url", "localhost:1", "voices", "add-adapter", "tuned", str(tmp_path)]) == 2
    assert "has no adapter_config.json" in capsys.readouterr().err
    assert main(["--url", "localhost:1", "voices", "add-adapter", "tuned", str(tmp_path), "--speaker", "300"]) == 2
