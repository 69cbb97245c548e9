"""Voice profiles without a server: the store on disk, reference-audio checks and
resampling, the voice-resolution rules and the admin-token rule."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import soundfile

from csm_triton import constants as C
from csm_triton.core import audio, voice_leftovers, voice_store, voice_store_files
from csm_triton.core.voice_store import VoiceStore
from csm_triton.core.voices import VoiceResolver
from csm_triton.core.write_policy import WritePolicy
from csm_triton.errors import InvalidInput, PermissionDenied
from csm_triton.triton import adapter as triton_adapter
from csm_triton.triton.parameters import Parameters, voice_directory


def codes(frames: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, C.CODEBOOK_SIZE, (frames, C.NUM_CODEBOOKS)).astype(np.int64)


def tone(seconds: float, rate: int = C.SAMPLE_RATE, hz: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def voice_files(directory) -> list[str]:
    return sorted(os.listdir(directory))


# --- the store ---------------------------------------------------------------------------
def test_store_round_trip(tmp_path):
    store = VoiceStore(tmp_path)
    stored = codes(7)
    voice = store.register("alice", stored, "Hello, I am Alice.", 2.5)
    assert voice.voice_id == "alice" and voice.transcript == "Hello, I am Alice." and voice.duration_seconds == 2.5
    got = store.get("alice")
    np.testing.assert_array_equal(got.codes, stored)
    assert got.codes.dtype == np.int64 and got.codes.shape == (7, C.NUM_CODEBOOKS)
    assert not got.codes.flags.writeable, "cached codes are shared between requests: read-only"
    assert stored.flags.writeable, "the caller's array is left alone"
    listed = store.list()
    assert listed == [
        {
            "voice_id": "alice",
            "transcript": "Hello, I am Alice.",
            "duration_seconds": 2.5,
            "created_at": voice.created_at,
            "owner": None,
            "kind": "clip",
        }
    ]
    assert voice.created_at.endswith("Z")
    assert store.delete("alice")["voice_id"] == "alice"
    assert store.list() == [] and voice_files(tmp_path) == []
    with pytest.raises(InvalidInput, match="unknown voice 'alice'"):
        store.get("alice")
    with pytest.raises(InvalidInput, match="unknown voice 'alice'"):
        store.delete("alice")


def test_store_writes_one_metadata_file_and_one_codes_file_and_no_temporaries(tmp_path):
    store = VoiceStore(tmp_path)
    store.register("bob", codes(), "Hi.", 1.0)
    files = voice_files(tmp_path)
    assert len(files) == 2 and "bob.json" in files
    codes_file = next(name for name in files if name.endswith(".npy"))
    metadata = json.loads((tmp_path / "bob.json").read_text())
    assert metadata["codes_file"] == codes_file and metadata["frames"] == 5
    np.testing.assert_array_equal(np.load(tmp_path / codes_file), codes())


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_a_clear_refusal_that_leaves_the_store_as_it_was(tmp_path, monkeypatch, code):
    store = VoiceStore(tmp_path)
    store.register("kept", codes(seed=3), "Already here.", 1.0)
    before = voice_files(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "x.tmp"))

    monkeypatch.setattr(voice_store.np, "save", disk_full)
    with pytest.raises(InvalidInput, match=r"^voice store is full \(") as refused:
        store.register("carol", codes(), "Hi.", 1.0)
    assert str(tmp_path) not in str(refused.value) and "carol" in str(refused.value)
    assert voice_files(tmp_path) == before and [v["voice_id"] for v in store.list()] == ["kept"]
    monkeypatch.undo()

    monkeypatch.setattr(voice_store, "write_metadata", lambda *a, **k: disk_full())
    with pytest.raises(InvalidInput, match="voice store is full"):
        store.register("carol", codes(), "Hi.", 1.0)
    assert voice_files(tmp_path) == before, "codes without metadata are removed"
    monkeypatch.undo()
    fresh = VoiceStore(tmp_path)
    assert [v["voice_id"] for v in fresh.list()] == ["kept"]
    np.testing.assert_array_equal(fresh.get("kept").codes, codes(seed=3))


def test_other_file_system_errors_name_no_path(tmp_path, monkeypatch):
    store = VoiceStore(tmp_path / "voices")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "voices" / ".x.tmp"))

    monkeypatch.setattr(voice_store.np, "save", denied)
    with pytest.raises(voice_store_files.VoiceStoreError) as failure:
        store.register("dora", codes(), "Hi.", 1.0)
    assert str(failure.value) == "the voice store could not store voice 'dora': Permission denied (errno 13)"
    monkeypatch.undo()
    (tmp_path / "voices").rename(tmp_path / "moved")
    with pytest.raises(voice_store_files.VoiceStoreError, match="could not read the voices: No such file") as failure:
        store.get("dora")
    assert str(tmp_path) not in str(failure.value)


def test_a_register_that_committed_is_reported_even_if_deleted_at_once(tmp_path, monkeypatch):
    """Another process deletes the voice right after its metadata lands: the register
    committed, so it answers the voice (it used to stat the metadata and fail)."""
    store, other = VoiceStore(tmp_path), VoiceStore(tmp_path)
    write_metadata = voice_store.write_metadata

    def committed_then_deleted(directory, voice_id, metadata, *, exclusive):
        signature = write_metadata(directory, voice_id, metadata, exclusive=exclusive)
        other.delete(voice_id)
        return signature

    monkeypatch.setattr(voice_store, "write_metadata", committed_then_deleted)
    voice = store.register("fleeting", codes(), "Gone at once.", 1.0)
    monkeypatch.undo()
    assert voice.voice_id == "fleeting" and voice.transcript == "Gone at once."
    assert "fleeting" not in store and voice_files(tmp_path) == [], "the store shows the delete"


def test_concurrent_registers_and_deletes_answer_what_the_store_did(tmp_path):
    """Threads of two stores (two processes' worth) register and delete the same ids:
    every answer is a voice or a clear refusal, and the last answer per id matches disk."""
    import random
    import threading

    stores = [VoiceStore(tmp_path), VoiceStore(tmp_path)]
    outcomes: dict[str, list] = {f"race-{i}": [] for i in range(4)}
    errors = []

    def work(seed):
        rng = random.Random(seed)
        for _ in range(40):
            voice_id = rng.choice(sorted(outcomes))
            store = rng.choice(stores)
            try:
                if rng.random() < 0.5:
                    store.register(voice_id, codes(seed=seed), "Race.", 1.0)
                else:
                    store.delete(voice_id)
            except InvalidInput as error:
                if "already exists" not in str(error) and "unknown voice" not in str(error):
                    errors.append(error)
            except Exception as error:  # noqa: BLE001 - any other answer is the bug
                errors.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    listed = {v["voice_id"] for v in VoiceStore(tmp_path).list()}
    files = voice_files(tmp_path)
    assert {name[:-5] for name in files if name.endswith(".json")} == listed
    assert len([name for name in files if name.endswith(".npy")]) == len(listed), files
    assert not [name for name in files if name.startswith(".")], "no temporaries left"


def test_a_new_store_loads_the_voices_on_disk(tmp_path):
    first = VoiceStore(tmp_path)
    first.register("dave", codes(3, seed=1), "One.", 1.0)
    first.register("erin", codes(4, seed=2), "Two.", 2.0)
    second = VoiceStore(tmp_path)
    assert [v["voice_id"] for v in second.list()] == ["dave", "erin"]
    np.testing.assert_array_equal(second.get("erin").codes, codes(4, seed=2))
    assert second.get("dave").created_at == first.get("dave").created_at


def test_two_stores_on_one_directory_see_each_others_writes(tmp_path):
    a, b = VoiceStore(tmp_path), VoiceStore(tmp_path)
    assert b.list() == []
    a.register("frank", codes(), "From a.", 1.0)
    assert b.get("frank").transcript == "From a."
    b.register("grace", codes(), "From b.", 1.0)
    assert [v["voice_id"] for v in a.list()] == ["frank", "grace"]
    b.delete("frank")
    assert "frank" not in a and [v["voice_id"] for v in a.list()] == ["grace"]
    with pytest.raises(InvalidInput, match="already exists"):
        a.register("grace", codes(), "Again.", 1.0)


def test_an_unchanged_directory_is_not_rescanned(tmp_path, monkeypatch):
    store = VoiceStore(tmp_path)
    store.register("hank", codes(), "Hi.", 1.0)
    monkeypatch.setattr(voice_store, "_RACY_NS", -(10**18))  # as if the last change were long ago
    store.list()  # one scan after the change
    scans = []
    real_scandir = os.scandir
    monkeypatch.setattr(voice_store_files.os, "scandir", lambda path: scans.append(path) or real_scandir(path))
    for _ in range(5):
        store.get("hank")
        store.list()
    assert scans == []
    VoiceStore(tmp_path).register("ivy", codes(), "Hi.", 1.0)  # another process
    scans.clear()
    assert "ivy" in store and len(scans) == 1, "a changed directory is scanned once"
    store.list()
    assert len(scans) == 1


def test_registering_an_existing_id_is_refused_unless_replaced(tmp_path):
    store = VoiceStore(tmp_path)
    store.register("jack", codes(seed=1), "First.", 1.0)
    with pytest.raises(InvalidInput, match="voice 'jack' already exists"):
        store.register("jack", codes(seed=2), "Second.", 1.0)
    store.register("jack", codes(seed=2), "Second.", 1.0, replace=True)
    assert store.get("jack").transcript == "Second." and len(voice_files(tmp_path)) == 2, "old codes removed"
    np.testing.assert_array_equal(VoiceStore(tmp_path).get("jack").codes, codes(seed=2))


def test_broken_files_are_skipped_not_fatal(tmp_path):
    VoiceStore(tmp_path).register("kate", codes(), "Hi.", 1.0)
    (tmp_path / "liam.json").write_text("{not json")
    (tmp_path / "mona.json").write_text(json.dumps({"voice_id": "mona", "codes_file": "missing.npy"}))
    (tmp_path / "NotAnId.json").write_text("{}")
    assert [v["voice_id"] for v in VoiceStore(tmp_path).list()] == ["kate"]


@pytest.mark.parametrize(
    "bad", ["../x", "a/b", "/etc/passwd", "Alice", "a" * 65, "", "-a", "_a", "a b", "a.json", "abc\n", "ü"]
)
def test_voice_ids_are_checked_before_the_file_system(tmp_path, monkeypatch, bad):
    store = VoiceStore(tmp_path / "voices")
    monkeypatch.setattr(VoiceStore, "_refresh", lambda *a, **k: pytest.fail("touched the file system"))
    for call in (lambda: store.get(bad), lambda: store.delete(bad), lambda: store.register(bad, codes(), "Hi.", 1.0)):
        with pytest.raises(InvalidInput, match="not a valid voice id"):
            call()
    assert voice_files(tmp_path / "voices") == [] and voice_files(tmp_path) == ["voices"]


@pytest.mark.parametrize("good", ["a", "0", "my_voice-2", "a" * 64])
def test_valid_voice_ids(tmp_path, good):
    store = VoiceStore(tmp_path)
    store.register(good, codes(), "Hi.", 1.0)
    assert store.get(good).voice_id == good


@pytest.mark.parametrize(
    "bad_codes, transcript, duration, message",
    [
        (np.zeros((0, C.NUM_CODEBOOKS), np.int64), "Hi.", 1.0, "at least one frame"),
        (np.zeros((3, 31), np.int64), "Hi.", 1.0, r"shape \[frames, 32\]"),
        (np.full((2, C.NUM_CODEBOOKS), C.CODEBOOK_SIZE), "Hi.", 1.0, "outside"),
        (codes(), "Hi.", 0.0, "positive"),
        (codes(), "Hi.", float("nan"), "positive"),
    ],
)
def test_register_checks_what_it_stores(tmp_path, bad_codes, transcript, duration, message):
    with pytest.raises(InvalidInput, match=message):
        VoiceStore(tmp_path).register("nina", bad_codes, transcript, duration)


def test_stale_leftovers_of_a_crashed_writer_are_removed_at_start(tmp_path):
    VoiceStore(tmp_path).register("olga", codes(), "Hi.", 1.0)
    old = 1_000_000_000
    for name in (".olga.json.abc.tmp", "olga.deadbeef.npy"):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (old, old))
    (tmp_path / "fresh.0123.npy").write_bytes(b"x")  # another process's registration in flight
    VoiceStore(tmp_path)
    files = voice_files(tmp_path)
    assert ".olga.json.abc.tmp" not in files and "olga.deadbeef.npy" not in files
    assert "fresh.0123.npy" in files and "olga.json" in files


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temporary_name(target: str, pid: int) -> str:
    from csm_triton.core import files

    return f".{target}.{files._host_tag()}~{pid}~abc123.tmp"


def test_leftovers_are_swept_at_any_time_not_only_when_old(tmp_path, monkeypatch):
    store = VoiceStore(tmp_path)
    store.register("pia", codes(), "Hi.", 1.0)
    dead, alive = _temporary_name("pia.json", _dead_pid()), _temporary_name("quin.json", os.getpid())
    for name in (dead, alive, ".legacy.json.x1.tmp", "gone.0123456789ab.npy", "new.0123456789ab.npy"):
        (tmp_path / name).write_bytes(b"x")
    a_while_ago = time.time() - voice_leftovers.ORPHAN_GRACE_S - 5
    os.utime(tmp_path / "gone.0123456789ab.npy", (a_while_ago, a_while_ago))
    referenced = json.loads((tmp_path / "pia.json").read_text())["codes_file"]
    os.utime(tmp_path / referenced, (a_while_ago, a_while_ago))

    store.register("quin", codes(), "Hi.", 1.0)  # every register sweeps
    files = voice_files(tmp_path)
    assert dead not in files, "a temporary whose writer is gone goes at once"
    assert "gone.0123456789ab.npy" not in files, "unnamed codes go after a minute"
    assert {alive, ".legacy.json.x1.tmp", "new.0123456789ab.npy", referenced} <= set(files), (
        "a live writer's temporary, a young unknown one, young codes and named codes stay"
    )

    old = time.time() - 3600
    os.utime(tmp_path / alive, (old, old))
    os.utime(tmp_path / ".legacy.json.x1.tmp", (old, old))
    monkeypatch.setattr(voice_store, "_SWEEP_INTERVAL_S", 0.0)
    assert [v["voice_id"] for v in store.list()] == ["pia", "quin"]  # list sweeps too (rate-limited)
    files = voice_files(tmp_path)
    assert alive not in files and ".legacy.json.x1.tmp" not in files, "old temporaries go, whoever wrote them"
    assert "new.0123456789ab.npy" in files


def test_a_killed_writers_leftovers_are_swept_by_the_next_registration(tmp_path):
    """A real writer killed with SIGKILL in the middle of a registration (after its
    codes, before its metadata was published)."""
    script = f"""
import sys, time
from csm_triton.core import voice_store_files
from csm_triton.core.voice_store import VoiceStore
import numpy as np
def hang(temporary, target):
    print("writing", flush=True)
    time.sleep(600)
voice_store_files.link_exclusively = lambda voice_id: hang
VoiceStore({str(tmp_path)!r}).register("victim", np.ones((3, 32), np.int64), "Hi.", 1.0)
"""
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
    left = voice_files(tmp_path)
    assert any(name.startswith(".victim.json.") for name in left) and any(name.endswith(".npy") for name in left)

    store = VoiceStore(tmp_path)  # (start-up sweeps too; a registration sweeps regardless)
    store.register("next", codes(), "Hi.", 1.0)
    left = voice_files(tmp_path)
    assert not [name for name in left if name.startswith(".")], "the killed writer's temporary is gone"
    orphan = [name for name in left if name.startswith("victim.")]
    assert len(orphan) == 1, "its codes stay for the grace period (a registration may be in flight)"
    old = time.time() - voice_leftovers.ORPHAN_GRACE_S - 1
    os.utime(tmp_path / orphan[0], (old, old))
    assert store.sweep() == orphan
    assert [v["voice_id"] for v in store.list()] == ["next"]


def test_the_voice_directory_defaults_next_to_the_model_repository(tmp_path):
    args = {"model_repository": str(tmp_path / "repository" / "voice_list"), "model_version": "1"}
    assert voice_directory(args, Parameters({})) == tmp_path / "runtime" / "voices"
    configured = {"parameters": {"voice_dir": {"string_value": "elsewhere"}}}
    assert voice_directory(args, Parameters(configured)) == tmp_path / "elsewhere"
    absolute = {"parameters": {"voice_dir": {"string_value": str(tmp_path / "abs")}}}
    assert voice_directory(args, Parameters(absolute)) == tmp_path / "abs"


# --- reference audio -----------------------------------------------------------------------
def test_reference_audio_is_resampled_to_24_khz():
    prepared = audio.prepare_reference_audio(tone(1.0, rate=16_000), 16_000)
    assert prepared.dtype == np.float32 and prepared.shape == (24_000,)
    spectrum = np.abs(np.fft.rfft(prepared))
    assert abs(np.argmax(spectrum) * C.SAMPLE_RATE / prepared.size - 440.0) < 2.0, "pitch is kept"
    assert 0.45 < np.max(np.abs(prepared[1000:-1000])) < 0.55, "level is kept"


def test_24_khz_audio_passes_through_and_one_row_2d_is_mono():
    clip = tone(1.0)
    np.testing.assert_array_equal(audio.prepare_reference_audio(clip, C.SAMPLE_RATE), clip)
    assert audio.prepare_reference_audio(clip[None, :], np.array([C.SAMPLE_RATE], np.int32)).shape == (24_000,)


def test_only_clipping_audio_is_normalised():
    loud = tone(1.0, amplitude=2.0)
    assert np.isclose(np.max(np.abs(audio.prepare_reference_audio(loud, C.SAMPLE_RATE))), 1.0)
    quiet = tone(1.0, amplitude=0.1)
    np.testing.assert_array_equal(audio.prepare_reference_audio(quiet, C.SAMPLE_RATE), quiet)


def _samples(seconds=1.0):
    return tone(seconds)


@pytest.mark.parametrize(
    "samples, rate, message",
    [
        (_samples().astype(np.float64), 24_000, "must be FP32 audio samples, got float64"),
        ((_samples() * 32767).astype(np.int16), 24_000, "must be FP32 audio samples, got int16"),
        ([0.0] * 24_000, 24_000, "must be an FP32 tensor"),
        (np.zeros(0, np.float32), 24_000, "'REFERENCE_AUDIO' is empty"),
        (np.zeros((1, 0), np.float32), 24_000, "'REFERENCE_AUDIO' is empty"),
        (np.stack([_samples(), _samples()]), 24_000, "must be mono"),
        (np.stack([_samples(), _samples()], axis=1), 24_000, "must be mono"),
        (_samples()[:, None], 24_000, "must be mono"),
        (_samples()[None, None], 24_000, "must be mono"),
        (np.where(np.arange(24_000) == 5, np.nan, _samples()).astype(np.float32), 24_000, "NaN or infinite"),
        (np.where(np.arange(24_000) == 5, np.inf, _samples()).astype(np.float32), 24_000, "NaN or infinite"),
        (_samples(), 0, "'REFERENCE_SAMPLE_RATE' must be a positive sample rate"),
        (_samples(), -16_000, "must be a positive sample rate"),
        (_samples(), C.MIN_INPUT_SAMPLE_RATE - 1, "accepted sample rates are 8000-192000 Hz"),
        (_samples(), C.MAX_INPUT_SAMPLE_RATE + 1, "accepted sample rates are 8000-192000 Hz"),
        (_samples(), 24_000.0, "must be an integer"),
        (_samples(), np.array([24_000.0], np.float32), "must be an integer tensor"),
        (_samples(), np.array([16_000, 24_000], np.int32), "exactly one value"),
        (_samples(C.MIN_REFERENCE_SECONDS / 2), 24_000, "needs at least 0.5 s"),
        (_samples(C.MAX_REFERENCE_SECONDS + 0.5), 24_000, "the limit for a voice reference is 30 s"),
    ],
)
def test_reference_audio_is_refused_naming_the_input(samples, rate, message):
    with pytest.raises(InvalidInput, match=message) as caught:
        audio.prepare_reference_audio(samples, rate)
    assert "REFERENCE_AUDIO" in str(caught.value) or "REFERENCE_SAMPLE_RATE" in str(caught.value)


def test_the_duration_limits_themselves_are_accepted():
    assert audio.prepare_reference_audio(tone(C.MIN_REFERENCE_SECONDS), C.SAMPLE_RATE).size == 12_000
    assert audio.prepare_reference_audio(tone(C.MAX_REFERENCE_SECONDS, rate=8_000), 8_000).size == 720_000


def test_read_audio_file_mixes_down_to_mono_float32(tmp_path):
    left, right = tone(0.5, rate=16_000, amplitude=0.4), np.zeros(8_000, np.float32)
    soundfile.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 16_000, subtype="PCM_16")
    samples, rate = audio.read_audio_file(tmp_path / "stereo.wav")
    assert rate == 16_000 and samples.dtype == np.float32 and samples.shape == (8_000,)
    np.testing.assert_allclose(samples, left / 2, atol=1e-4)


# --- the resolver --------------------------------------------------------------------------
class FakeEncoder:
    def __init__(self):
        self.calls = []

    def __call__(self, samples):
        self.calls.append(samples)
        return np.ones((int(np.ceil(samples.size / C.SAMPLES_PER_FRAME)), C.NUM_CODEBOOKS), np.int64)


@pytest.fixture()
def resolver(tmp_path):
    store = VoiceStore(tmp_path)
    store.register("stored", codes(4), "Stored transcript.", 1.5)
    return VoiceResolver(store, FakeEncoder())


def test_no_voice_inputs_mean_the_default_voice(resolver):
    assert resolver.resolve() is None


def test_a_voice_id_resolves_to_the_stored_voice(resolver):
    transcript, stored = resolver.resolve(voice_id="stored")
    assert transcript == "Stored transcript."
    np.testing.assert_array_equal(stored, codes(4))
    assert resolver.encode.calls == [], "a stored voice is never re-encoded"
    with pytest.raises(InvalidInput, match="unknown voice 'missing'"):
        resolver.resolve(voice_id="missing")


def test_reference_audio_is_checked_resampled_and_encoded(resolver):
    transcript, encoded = resolver.resolve(
        reference_audio=tone(1.0, rate=16_000), reference_sample_rate=16_000, reference_text="What the clip says."
    )
    assert transcript == "What the clip says."
    (sent,) = resolver.encode.calls
    assert sent.dtype == np.float32 and sent.shape == (24_000,)
    assert encoded.shape == (13, C.NUM_CODEBOOKS)
    assert resolver.store.list()[0]["voice_id"] == "stored" and len(resolver.store) == 1, "nothing stored"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {
                "voice_id": "stored",
                "reference_audio": tone(1.0),
                "reference_sample_rate": 24_000,
                "reference_text": "x",
            },
            "give either VOICE_ID or REFERENCE_AUDIO, not both",
        ),
        ({"reference_text": "x"}, "'REFERENCE_TEXT' was given without 'REFERENCE_AUDIO'"),
        ({"voice_id": "stored", "reference_text": "x"}, "'REFERENCE_TEXT' was given without 'REFERENCE_AUDIO'"),
        ({"reference_sample_rate": 24_000}, "'REFERENCE_SAMPLE_RATE' was given without 'REFERENCE_AUDIO'"),
        ({"reference_audio": tone(1.0), "reference_sample_rate": 24_000}, "needs 'REFERENCE_TEXT'"),
        ({"reference_audio": tone(1.0), "reference_text": "x"}, "needs 'REFERENCE_SAMPLE_RATE'"),
        (
            {"reference_audio": tone(1.0), "reference_sample_rate": 24_000, "reference_text": " "},
            "'REFERENCE_TEXT' is empty",
        ),
        ({"reference_audio": tone(0.1), "reference_sample_rate": 24_000, "reference_text": "x"}, "at least 0.5 s"),
    ],
)
def test_resolver_rules(resolver, kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        resolver.resolve(**kwargs)
    assert resolver.encode.calls == []


def test_register_encodes_once_and_stores(resolver):
    voice = resolver.register("new-voice", tone(2.0, rate=48_000), 48_000, "Two seconds.")
    assert voice.duration_seconds == 2.0 and voice.codes.shape == (25, C.NUM_CODEBOOKS)
    assert resolver.resolve(voice_id="new-voice")[0] == "Two seconds."
    with pytest.raises(InvalidInput, match="not a valid voice id"):
        resolver.register("../x", tone(1.0), 24_000, "x")
    with pytest.raises(InvalidInput, match="already exists"):
        resolver.register("stored", tone(1.0), 24_000, "x")
    with pytest.raises(InvalidInput, match="'REFERENCE_TEXT' is empty"):
        resolver.register("blank-transcript", tone(1.0), 24_000, "  ")
    assert len(resolver.encode.calls) == 1, "refused ids and transcripts cost no encoding"
    assert "blank-transcript" not in resolver.store


# --- the admin token -----------------------------------------------------------------------
TOKEN = "s3cret-token"


def test_the_right_token_may_write():
    policy = WritePolicy.from_settings(None, False, {"CSM_ADMIN_TOKEN": TOKEN})
    policy.check_write({C.ADMIN_TOKEN_HEADER: TOKEN})


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({}, "needs the admin token in header 'x-csm-admin-token'"),
        ({C.ADMIN_TOKEN_HEADER: ""}, "needs the admin token"),
        ({C.ADMIN_TOKEN_HEADER: "wrong"}, "wrong admin token"),
        ({C.ADMIN_TOKEN_HEADER: TOKEN + " "}, "wrong admin token"),
        ({C.ADMIN_TOKEN_HEADER: 12345}, "wrong admin token"),
        ({C.ADMIN_TOKEN_HEADER: "tökén"}, "wrong admin token"),
        ({"x-csm-admin": TOKEN}, "needs the admin token"),
    ],
)
def test_a_missing_or_wrong_token_is_refused(parameters, message):
    policy = WritePolicy.from_settings(None, True, {"CSM_ADMIN_TOKEN": TOKEN})
    with pytest.raises(PermissionDenied, match=f"^permission denied: .*{message}"):
        policy.check_write(parameters)


def test_without_a_token_writes_are_refused_unless_anonymous_writes_are_allowed():
    refused = WritePolicy.from_settings(None, False, {"CSM_ADMIN_TOKEN": ""})
    with pytest.raises(PermissionDenied, match=r"writes are disabled.*\$CSM_ADMIN_TOKEN"):
        refused.check_write({C.ADMIN_TOKEN_HEADER: "anything"})
    WritePolicy.from_settings(None, True, {}).check_write({})
    with pytest.raises(PermissionDenied):
        WritePolicy.from_settings(None, False, {}).check_write({})


def test_the_token_variable_is_configurable_and_never_printed():
    policy = WritePolicy.from_settings("OTHER_TOKEN", None, {"OTHER_TOKEN": TOKEN, "CSM_ADMIN_TOKEN": "x"})
    policy.check_write({C.ADMIN_TOKEN_HEADER: TOKEN})
    assert TOKEN not in repr(policy) and TOKEN not in policy.describe()


def test_permission_denied_is_answered_as_an_invalid_argument_that_says_so(monkeypatch):
    class TritonError:
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message, code="INTERNAL"):
            self.message, self.code = message, code

    fake = types.SimpleNamespace(TritonError=TritonError, InferenceResponse=lambda error: error)
    monkeypatch.setattr(triton_adapter, "pb_utils", fake)
    error = triton_adapter.error_response(PermissionDenied("wrong admin token"), "voice_register")
    assert error.code == "INVALID_ARG" and error.message == "permission denied: wrong admin token"
    assert not isinstance(PermissionDenied("x"), (InvalidInput, PermissionError))


# --- a python stub exits when its server is gone ---------------------------------------------
def process_gone(pid: int) -> bool:
    """No such process, or a zombie waiting for whoever adopted it to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_parent_watchdog_ends_an_orphaned_process():
    """A 'server' starts a 'stub' that runs the watchdog, then dies with SIGKILL: the stub,
    re-parented, exits within a couple of its 0.1 s checks."""
    stub = (
        "import time; from csm_triton.triton import adapter; "
        "adapter.start_parent_watchdog(0.1, force=True); print('watching', flush=True); time.sleep(60)"
    )
    server = (
        f"import subprocess, sys, os, signal; stub = subprocess.Popen([sys.executable, '-c', {stub!r}], "
        "stdout=subprocess.PIPE, text=True); assert stub.stdout.readline().strip() == 'watching'; "
        "print(stub.pid, flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    result = subprocess.run([sys.executable, "-c", server], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    stub_pid = int(result.stdout.split()[0])
    # (run() returns once the stub, which shares the stderr pipe, has closed it too.)
    assert f"stub {stub_pid} exits" in result.stderr
    deadline = time.monotonic() + 5
    while not process_gone(stub_pid):
        assert time.monotonic() < deadline, f"the orphaned stub {stub_pid} is still running"
        time.sleep(0.05)


def test_the_parent_watchdog_starts_only_inside_a_stub():
    assert "triton_python_backend_utils" not in sys.modules
    assert triton_adapter.start_parent_watchdog() is None
