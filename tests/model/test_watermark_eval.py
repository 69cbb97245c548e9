"""`make watermark-eval` end to end in its quick mode (a few clips of each kind, ~30 s):
the corpus is what the report says it is, every transform is scored, and the report
carries the table, the ROC points, the threshold, the machine, the commit and the
command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from csm_triton import constants as C
from loadtest import watermark_eval as evaluation


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield evaluation.run(quick=True, seed=1, log=lambda message: None)
    finally:
        torch.set_num_threads(threads)


def test_full_corpus_has_every_kind_at_24_khz_between_2_and_6_s():
    corpus = evaluation.build_corpus(evaluation.COMPOSITION["full"], seed=3)
    assert len(corpus) >= 200
    kinds = {clip.kind for clip in corpus}
    assert kinds == {"speech", "tone", "chord", "chirp", "noise", "click", "music", "hiss", "hum"}
    for clip in corpus:
        assert clip.audio.dtype == np.float32 and clip.audio.ndim == 1 and np.isfinite(clip.audio).all()
        assert 2.0 <= clip.audio.size / C.SAMPLE_RATE <= 6.0, clip.name
        assert np.abs(clip.audio).max() <= 1.0, clip.name
    tones = [float(clip.name.split()[1]) for clip in corpus if clip.kind == "tone"]
    assert min(tones) == pytest.approx(50, abs=1) and max(tones) == pytest.approx(8000, abs=1)
    languages = {clip.name.split("+")[0] for clip in corpus if clip.kind == "speech"}
    assert len(languages) == len(evaluation.SENTENCES)


def test_transforms_keep_the_clip_usable():
    rng = np.random.default_rng(0)
    audio = (0.3 * np.sin(np.arange(3 * C.SAMPLE_RATE) * 0.05)).astype(np.float32)
    for name in evaluation.TRANSFORMS:
        out = evaluation.transform(audio, name, rng)
        assert out.dtype == np.float32 and np.isfinite(out).all() and np.abs(out).max() <= 1.0
        expected = int(evaluation.TRIM_SECONDS * C.SAMPLE_RATE) if name == "trim to 2 s" else audio.size
        assert out.size == expected, name
    for codec in ("mp3", "opus"):  # 64 kbit/s, as the report claims (container overhead aside)
        _, bits = evaluation.encoded(audio, codec)
        assert 60 <= bits / 3 / 1000 <= 72, codec


def test_quick_report_has_the_table_roc_and_provenance(report, tmp_path):
    assert report["threshold"] == C.WATERMARK_THRESHOLD
    assert [row["transform"] for row in report["table"]] == list(evaluation.TRANSFORMS)
    composition = report["corpus"]["composition"]
    assert sum(composition.values()) == report["corpus"]["clean_clips"] and min(composition.values()) >= 1
    for row in report["table"]:
        assert row["clean_clips"] == report["corpus"]["clean_clips"]
        assert row["marked_clips"] == report["corpus"]["marked_clips"] == composition["speech"]
        for key in ("fpr", "tpr", "perth_alone_fpr", "perth_alone_tpr"):
            assert 0.0 <= row[key] <= 1.0
    untouched = report["table"][0]
    assert untouched["tpr"] == 1.0  # marked speech, straight from Watermarker.apply
    assert untouched["fpr"] <= untouched["perth_alone_fpr"]  # the gate only ever removes positives
    for name, points in report["roc"].items():
        points = np.array(points)
        assert points.shape == (len(evaluation.ROC_THRESHOLDS), 3), name
        assert (np.diff(points[:, 1]) <= 0).all() and (np.diff(points[:, 2]) <= 0).all()  # falls with the threshold
        assert points[0, 1] == points[0, 2] == 1.0  # threshold 0: everything is positive
    assert report["machine"] and report["commit"] and report["command"].startswith("python -m loadtest.watermark_eval")
    assert set(report["codec_bitrate_kbps"]) == {"mp3 64 kbit/s", "opus 64 kbit/s"}

    paths = evaluation.write(report, tmp_path, "watermark_eval_quick")
    assert json.loads((tmp_path / "watermark_eval_quick.json").read_text())["table"] == report["table"]
    text = (tmp_path / "watermark_eval_quick.md").read_text()
    assert "| transform | FPR | TPR |" in text and report["commit"] in text and "white noise 20 dB SNR" in text
    assert {path.suffix for path in paths} >= {".json", ".md"}
