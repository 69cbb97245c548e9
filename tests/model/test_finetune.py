"""LoRA fine-tuning (finetune/): data layouts and checks, the code cache, training that
learns, is reproducible and resumes exactly, and a merge equal to base + adapter.

Data is made here with espeak-ng (24 clips, 2 speakers); the model is the tiny random CSM.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")

SENTENCES = (
    "Hello there.",
    "How are you today?",
    "The fox jumps.",
    "Bring an umbrella.",
    "We walked along.",
    "Nine o'clock.",
    "Where is the station?",
    "Thank you kindly.",
    "It might rain.",
    "See you soon.",
    "One, two, three.",
    "Good morning.",
)
VOICES = ("en+m3", "en+f3")  # speaker 0 and speaker 1
STEPS = 30


def _speak(text: str, voice: str, path) -> None:
    subprocess.run(["espeak-ng", "-v", voice, "-s", "190", "-w", str(path), text], check=True)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """24 clips: (name, wav path, text, speaker) for each, in a wav + txt folder."""
    folder = tmp_path_factory.mktemp("speech")
    items = []
    for speaker, voice in enumerate(VOICES):
        for index, text in enumerate(SENTENCES):
            name = f"s{speaker}_{index:02d}"
            _speak(text, voice, folder / f"{name}.wav")
            (folder / f"{name}.txt").write_text(text + "\n")
            items.append((name, folder / f"{name}.wav", text, speaker))
    return folder, items


def _args(data, out, checkpoint, cache, *extra):
    from finetune.train import parse_args

    args = parse_args(
        [
            "--data",
            str(data),
            "--out",
            str(out),
            "--checkpoint",
            str(checkpoint),
            "--cache-dir",
            str(cache),
            "--steps",
            str(STEPS),
            "--grad-accum",
            "1",
            "--lr",
            "5e-3",
            "--eval-every",
            str(STEPS),
            "--save-every",
            "10",
            "--eval-fraction",
            "0.17",
            "--no-progress",
            "--threads",
            "2",
            *extra,
        ]
    )
    args.quiet = True
    return args


@pytest.fixture(scope="module")
def trained(speech, tiny_checkpoint, tmp_path_factory):
    """One uninterrupted run with --merge (its output is shared by several tests)."""
    from finetune.train import train

    root = tmp_path_factory.mktemp("finetune")
    result = train(_args(speech[0], root / "run", tiny_checkpoint, root / "cache", "--merge", "--context"))
    return root, result


# --- data ------------------------------------------------------------------------------------


def test_folder_layout_loads_every_clip_at_24khz(speech):
    from finetune.data import load_dataset

    clips, report = load_dataset(speech[0])
    assert report.layout == "folder" and report.good == len(clips) == 24
    assert {clip.speaker for clip in clips} == {0}  # a folder has no speaker column
    assert all(clip.audio.dtype == np.float32 and 0.5 <= clip.seconds <= 5 for clip in clips)
    # espeak-ng writes 22.05 kHz: resampled to 24 kHz
    name, path, _, _ = speech[1][0]
    samples, rate = soundfile.read(path)
    assert rate == 22050
    clip = next(c for c in clips if c.name == f"{name}.wav")
    assert abs(clip.audio.size - round(samples.size * 24000 / 22050)) <= 1


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_manifest_layout_keeps_speakers(speech, tmp_path, kind):
    from finetune.data import load_dataset

    folder, items = speech
    manifest = folder / f"manifest.{kind}"
    rows = [{"audio": path.name, "text": text, "speaker": speaker} for _, path, text, speaker in items]
    if kind == "jsonl":
        manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        with open(manifest, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["audio", "text", "speaker"])
            writer.writeheader()
            writer.writerows(rows)
    clips, report = load_dataset(manifest)
    assert report.layout == "manifest" and len(clips) == 24
    assert sorted(clip.speaker for clip in clips) == [0] * 12 + [1] * 12
    assert {clip.text for clip in clips} == set(SENTENCES)


def _hf_dataset(items, *, source: bool):
    import datasets

    columns = {
        "audio": [{"bytes": path.read_bytes(), "path": path.name} for _, path, _, _ in items],
        "text": [text for _, _, text, _ in items],
    }
    if source:
        columns["source"] = [("alice", "bob")[speaker] for *_, speaker in items]
    return datasets.Dataset.from_dict(columns).cast_column("audio", datasets.Audio(decode=False))


def test_elise_layout_parquet_and_save_to_disk(speech, tmp_path):
    from finetune.data import load_dataset

    items = speech[1]
    parquet = tmp_path / "elise" / "data"
    parquet.mkdir(parents=True)
    _hf_dataset(items, source=False).to_parquet(str(parquet / "train-00000-of-00001.parquet"))
    clips, report = load_dataset(tmp_path / "elise")
    assert report.layout == "hf" and len(clips) == 24 and {c.speaker for c in clips} == {0}

    _hf_dataset(items, source=True).save_to_disk(str(tmp_path / "saved"))
    clips, report = load_dataset(tmp_path / "saved")
    assert len(clips) == 24 and report.speakers == {"alice": 0, "bob": 1}
    assert sorted(c.speaker for c in clips) == [0] * 12 + [1] * 12


def _broken_folder(speech, folder):
    """The 24 good clips plus one item of every kind the loader must skip."""
    shutil.copytree(speech[0], folder)
    rate = 24000
    (folder / "truncated.wav").write_bytes((folder / "s0_00.wav").read_bytes()[:30])
    (folder / "truncated.txt").write_text("broken")
    soundfile.write(folder / "nan.wav", np.full(rate, np.nan, dtype=np.float32), rate, subtype="FLOAT")
    (folder / "nan.txt").write_text("not a number")
    soundfile.write(folder / "silent.flac", np.zeros(rate, dtype=np.float32), rate)
    (folder / "silent.txt").write_text("nothing")
    soundfile.write(folder / "short.wav", 0.1 * np.random.default_rng(0).standard_normal(rate // 5), rate)
    (folder / "short.txt").write_text("short")
    soundfile.write(folder / "long.ogg", 0.1 * np.sin(np.arange(21 * rate) / 9), rate)
    (folder / "long.txt").write_text("long")
    shutil.copy(folder / "s0_01.wav", folder / "untranscribed.wav")
    shutil.copy(folder / "s0_02.wav", folder / "empty.wav")
    (folder / "empty.txt").write_text("  \n")
    shutil.copy(folder / "s1_03.wav", folder / "copy.wav")
    (folder / "copy.txt").write_text("again")
    return folder


def test_broken_items_are_skipped_and_reported(speech, tmp_path):
    from finetune import data as D

    clips, report = D.load_dataset(_broken_folder(speech, tmp_path / "broken"))
    assert len(clips) == 24 and report.total == 32
    assert dict(report.skipped) == {
        D.UNREADABLE: 1,
        D.NON_FINITE: 1,
        D.SILENT: 1,
        D.TOO_SHORT: 1,
        D.TOO_LONG: 1,
        D.NO_TRANSCRIPT: 1,
        D.EMPTY_TRANSCRIPT: 1,
        D.DUPLICATE: 1,
    }
    text = "\n".join(report.lines())
    assert "32 items, 24 good, 8 skipped" in text and "truncated.wav" in text


def test_all_bad_dataset_is_refused_in_one_line(tmp_path, capsys):
    from finetune.train import main

    folder = tmp_path / "bad"
    folder.mkdir()
    soundfile.write(folder / "a.wav", np.zeros(24000, dtype=np.float32), 24000)
    (folder / "a.txt").write_text("silence")
    (folder / "b.wav").write_bytes(b"RIFF....not audio")
    (folder / "b.txt").write_text("garbage")
    assert main(["--data", str(folder), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: no usable item in") and "silence" in err


# --- codes -----------------------------------------------------------------------------------


def test_codes_are_batched_exactly_and_cached(speech, tiny_checkpoint, tmp_path):
    import torch
    from transformers import CsmForConditionalGeneration, MimiModel

    from finetune.codes import CodeCache, encoded_frames, frame_aligned
    from finetune.data import load_dataset

    clips, _ = load_dataset(speech[0])
    clips = clips[:6]
    codec = CsmForConditionalGeneration.from_pretrained(tiny_checkpoint).codec_model
    cache = CodeCache(tmp_path / "cache", codec)
    batched = cache.codes_for(clips)
    assert cache.misses == 6 and cache.hits == 0
    for clip, codes in zip(clips, batched):
        assert codes.shape == (encoded_frames(clip.audio.size), 32)
        alone = codec.encode(torch.from_numpy(frame_aligned(clip.audio))[None, None]).audio_codes[0].T.numpy()
        assert np.array_equal(codes, alone)  # padding in a batch changes nothing
    again = CodeCache(tmp_path / "cache", codec)
    assert [np.array_equal(a, b) for a, b in zip(again.codes_for(clips), batched)] == [True] * 6
    assert again.hits == 6 and again.misses == 0
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]
    assert isinstance(codec, MimiModel)


# --- training --------------------------------------------------------------------------------


def test_training_lowers_the_held_out_loss(trained):
    root, result = trained
    (first_step, first), (last_step, last) = result.eval_losses[0], result.eval_losses[-1]
    assert (first_step, last_step) == (0, STEPS)
    print(f"held-out loss {first:.4f} -> {last:.4f} after {STEPS} steps ({(first - last) / first:.1%} lower)")
    assert last < first * 0.97
    run = root / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["final_eval_loss"] == pytest.approx(last)
    assert manifest["hyperparameters"]["rank"] == 32 and manifest["data_report"]["good"] == 24
    assert len(manifest["data_sha256"]) == 64 and manifest["packages"]["peft"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_the_run_registers_as_an_adapter_voice_on_its_base(trained, tiny_checkpoint, tmp_path):
    """Issue 26: what a run writes (OUT/adapter + OUT/manifest.json) passes the server's
    checks against the base it was trained on, base hash included, and is stored."""
    from csm_triton.core.adapters import ServedBase, base_model_sha256, load_lora_adapter
    from csm_triton.core.voice_store import VoiceStore
    from csm_triton.core.voices import VoiceResolver

    run = trained[0] / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["base_model_sha256"] == base_model_sha256(tiny_checkpoint)
    adapter = load_lora_adapter(run / "adapter", tiny_checkpoint)
    assert adapter.rank == 32 and adapter.scale == 1.0 and len(adapter.matrices) == 2 * 2 * 7
    voice = VoiceResolver(VoiceStore(tmp_path), None).register_adapter(
        "tuned",
        (run / "adapter" / "adapter_config.json").read_bytes(),
        (run / "adapter" / "adapter_model.safetensors").read_bytes(),
        ServedBase(tiny_checkpoint),
        manifest=(run / "manifest.json").read_bytes(),
    )
    assert voice.summary()["base_hash_checked"] and voice.summary()["rank"] == 32


def test_same_seed_same_adapter_bytes_and_resume_equals_uninterrupted(trained, speech, tiny_checkpoint):
    from finetune.train import train

    root, _ = trained
    reference = (root / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    again = train(_args(speech[0], root / "again", tiny_checkpoint, root / "cache", "--context"))
    assert (root / "again" / "adapter" / "adapter_model.safetensors").read_bytes() == reference
    assert again.eval_losses == trained[1].eval_losses

    first = train(
        _args(speech[0], root / "resumed", tiny_checkpoint, root / "cache", "--context", "--stop-after", "12")
    )
    assert first.steps_done == 12 and not (root / "resumed" / "adapter").exists()
    train(_args(speech[0], root / "resumed", tiny_checkpoint, root / "cache", "--context", "--resume"))
    assert (root / "resumed" / "adapter" / "adapter_model.safetensors").read_bytes() == reference

    from finetune.train import FinetuneError

    with pytest.raises(FinetuneError, match="other options"):
        train(_args(speech[0], root / "resumed", tiny_checkpoint, root / "cache", "--resume", "--rank", "8"))


def test_broken_folder_trains_on_the_good_items(speech, tiny_checkpoint, tmp_path):
    from finetune.train import train

    folder = _broken_folder(speech, tmp_path / "broken")
    args = _args(folder, tmp_path / "out", tiny_checkpoint, tmp_path / "cache")
    args.steps, args.eval_every = 2, 2
    train(args)
    report = json.loads((tmp_path / "out" / "manifest.json").read_text())["data_report"]
    assert report["good"] == 24 and sum(report["skipped"].values()) == 8


# --- merge -----------------------------------------------------------------------------------


def test_merged_checkpoint_equals_base_plus_adapter(trained, speech, tiny_checkpoint):
    import torch
    from peft import PeftModel
    from transformers import CsmForConditionalGeneration, CsmProcessor

    from export.checkpoint import validate_checkpoint
    from finetune.batches import Example, Turn, build_batch

    root, _ = trained
    merged_dir = validate_checkpoint(root / "run" / "merged")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        assert (merged_dir / name).read_bytes() == (tiny_checkpoint / name).read_bytes()
    assert json.loads((merged_dir / "finetune_manifest.json").read_text())["final_eval_loss"] is not None

    processor = CsmProcessor.from_pretrained(tiny_checkpoint)
    rng = np.random.default_rng(0)
    example = Example(
        Turn(1, "See you soon.", rng.integers(0, 2048, (9, 32))),
        Turn(1, "Hello there.", rng.integers(0, 2048, (7, 32))),
    )

    def logits(model):
        model.eval()
        torch.manual_seed(0)
        inner = model.get_base_model() if isinstance(model, PeftModel) else model
        with torch.no_grad():
            batch = build_batch(processor, inner, [example], depth_decoder_labels_ratio=1.0)
            output = model(**batch)
        return output.logits, output.depth_decoder_logits

    base = CsmForConditionalGeneration.from_pretrained(tiny_checkpoint)
    base_logits = logits(base)
    adapted = logits(
        PeftModel.from_pretrained(
            CsmForConditionalGeneration.from_pretrained(tiny_checkpoint), root / "run" / "adapter"
        )
    )
    merged = CsmForConditionalGeneration.from_pretrained(merged_dir)
    merged_logits = logits(merged)
    for ours, theirs, original in zip(merged_logits, adapted, base_logits):
        assert float((ours - theirs).abs().max()) <= 1e-4
        assert float((ours - original).abs().max()) > 1e-2
    # the codec is untouched (the served Mimi encodes and decodes as before)
    assert all(
        torch.equal(a, b)
        for a, b in zip(base.codec_model.state_dict().values(), merged.codec_model.state_dict().values())
    )
    # the depth decoder's sampling settings survive the merge
    for ours, original in (
        (merged.generation_config, base.generation_config),
        (merged.depth_decoder.generation_config, base.depth_decoder.generation_config),
    ):
        assert (ours.do_sample, ours.top_k, ours.temperature) == (
            original.do_sample,
            original.top_k,
            original.temperature,
        )
    assert merged.depth_decoder.generation_config.do_sample  # not silently greedy


def test_help_lists_every_option():
    out = subprocess.run(
        [sys.executable, "-m", "finetune.train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in (
        "--data",
        "--rank",
        "--alpha",
        "--dropout",
        "--target-modules",
        "--depth-decoder-labels-ratio",
        "--context",
        "--resume",
        "--merge",
        "--eval-every",
        "--save-every",
        "--grad-accum",
    ):
        assert option in out
