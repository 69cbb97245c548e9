"""csm-tts against the real tritonserver: say, clone, stream, voices, watermark, and a
resumable batch with a bad line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile

from csm_clients.cli import main

from .client_fixtures import speech_clip
from .conftest import ADMIN_TOKEN

pytestmark = pytest.mark.integration
SHORT = ["--max-audio-seconds", "0.5", "--seed", "1"]


@pytest.fixture()
def cli(triton_server, monkeypatch, tmp_path):
    """main() in-process, with Triton's address and the token from the environment as a user sets them."""
    monkeypatch.setenv("CSM_TRITON_URL", triton_server.grpc_url)
    monkeypatch.setenv("CSM_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.chdir(tmp_path)
    return main


def seconds(path: Path) -> float:
    info = soundfile.info(str(path))
    return info.frames / info.samplerate


def test_say_clone_stream_and_watermark(cli, speech_clip, capsys):
    assert cli(["say", "Hello from the command line.", "-o", "say.wav", *SHORT]) == 0
    assert (
        cli(
            [
                "clone",
                str(speech_clip.path),
                speech_clip.transcript,
                "In that voice.",
                "-o",
                "clone.flac",
                "--sample-rate",
                "16000",
                *SHORT,
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "stream",
                "Streamed to a file.",
                "-o",
                "stream.wav",
                "--max-audio-seconds",
                "1.5",
                "--reference",
                str(speech_clip.path),
                "--transcript",
                speech_clip.transcript,
            ]
        )
        == 0
    )
    assert seconds(Path("say.wav")) == pytest.approx(0.56) and soundfile.info("clone.flac").samplerate == 16_000
    assert seconds(Path("stream.wav")) == pytest.approx(1.52)
    captured = capsys.readouterr()
    assert "chunk 1:" in captured.err and "stream.wav: 1.52 s of audio" in captured.out
    assert cli(["watermark", "say.wav"]) == 0
    verdict = capsys.readouterr().out  # e.g. "say.wav: watermark score 0.985, watermarked"
    assert verdict.strip().endswith(", watermarked") and float(verdict.split("score ")[1].split(",")[0]) >= 0.9


def test_voices_add_list_rm(cli, speech_clip, capsys):
    assert cli(["voices", "add", "cli-voice", str(speech_clip.path), speech_clip.transcript]) == 0
    assert json.loads(capsys.readouterr().out)["voice_id"] == "cli-voice"
    assert cli(["voices", "list"]) == 0 and "cli-voice" in capsys.readouterr().out
    assert cli(["say", "In my stored voice.", "--voice", "cli-voice", "-o", "stored.wav", *SHORT]) == 0
    assert cli(["voices", "rm", "cli-voice"]) == 0
    capsys.readouterr()
    assert cli(["voices", "list", "--json"]) == 0
    assert "cli-voice" not in {v["voice_id"] for v in json.loads(capsys.readouterr().out)}


def test_errors_are_one_line_exit_1_from_the_server_2_before_sending(cli, capsys):
    assert cli(["--admin-token", "", "voices", "rm", "anyone"]) == 1  # the server refused
    assert capsys.readouterr().err.startswith("csm-tts: PermissionDenied: permission denied:")
    assert cli(["say", "Hi.", "--temperature", "0", "-o", "x.wav"]) == 2  # refused before sending
    error = capsys.readouterr().err
    assert error.startswith("csm-tts say: error: --temperature: input 'TEMPERATURE' must be in")
    assert error.count("\n") == 1 and "Traceback" not in error
    assert not Path("x.wav").exists()


def test_batch_of_five_with_a_bad_line_writes_four_reports_one_and_resumes(cli, speech_clip, tmp_path, capsys):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "fox.wav").write_bytes(speech_clip.path.read_bytes())
    lines = [
        {"id": "first", "text": "The first line.", "seed": 1},
        {"text": "Cloned inline.", "reference_audio": "clips/fox.wav", "reference_text": speech_clip.transcript},
        {"id": "bad", "text": "Too hot.", "temperature": 0},
        {
            "id": "fourth",
            "text": "The fourth line.",
            "top_k": 10,
            "speaker": 1,  # a conversation's reply
            "context": [{"audio": "clips/fox.wav", "text": speech_clip.transcript, "speaker": 0}],
        },
        {"id": "fifth", "text": "The fifth line."},
    ]
    batch = tmp_path / "lines.jsonl"
    batch.write_text("\n".join(json.dumps({**line, "max_audio_seconds": 0.5}) for line in lines) + "\n")
    out = tmp_path / "out"

    assert cli(["batch", str(batch), "--out-dir", str(out), "--concurrency", "3"]) == 1
    report = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["fifth.wav", "first.wav", "fourth.wav", "line-0002.wav"]
    table = dict(line.rsplit(None, 1) for line in report.out.splitlines()[:7])
    assert (table["items"], table["written"], table["failed"]) == ("5", "4", "1")
    assert float(table["audio seconds"]) == pytest.approx(4 * 0.56) and float(table["real-time factor"]) > 0
    assert "line 3 (bad): in ensemble 'csm_tts', input 'TEMPERATURE' must be in (0, 5]" in report.out
    assert "5/5" in report.err  # the progress bar

    assert cli(["batch", str(batch), "--out-dir", str(out)]) == 1  # resumed: only the bad one is tried again
    table = dict(line.rsplit(None, 1) for line in capsys.readouterr().out.splitlines()[:7])
    assert (table["written"], table["skipped (already done)"], table["failed"]) == ("0", "4", "1")


def test_batch_from_csv_through_the_console_script(triton_server, tmp_path):
    batch = tmp_path / "lines.csv"
    batch.write_text("id,text,seed,max_audio_seconds\nhello,Hello from a CSV row.,1,0.5\nbye,Goodbye.,2,0.5\n")
    script = Path(sys.executable).with_name("csm-tts")
    result = subprocess.run(
        [
            str(script),
            "--url",
            triton_server.http_url,
            "--protocol",
            "http",
            "batch",
            str(batch),
            "--out-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CSM_TRITON_URL": "unused:1"},
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bye.wav", "hello.wav"]


def test_captions_follow_the_servers_segment_times(cli, capsys):
    """--captions: one cue per sentence (each spoken as a segment), timed by SEGMENT_TIMES, worded as spoken."""
    text = (
        "The first sentence is about the weather, which was grey and cold all morning long today. " * 2
        + "Then the sun came out at 3 pm, and everyone went outside to enjoy it for an hour or two. " * 2
    )
    assert cli(["say", text, "-o", "long.wav", "--captions", "long.srt", "--seed", "2"]) == 0
    cues = Path("long.srt").read_text().strip().split("\n\n")
    assert len(cues) == 4 and [cue.split("\n")[2][:9] for cue in cues] == ["The first"] * 2 + ["Then the "] * 2, cues
    spans = [cue.split("\n")[1].split(" --> ") for cue in cues]
    as_seconds = [
        [
            sum(float(part) * 60 ** (2 - i) for i, part in enumerate(stamp.replace(",", ".").split(":")))
            for stamp in span
        ]
        for span in spans
    ]
    assert as_seconds[0][0] == 0.0 and all(a[1] <= b[0] + 1e-3 for a, b in zip(as_seconds, as_seconds[1:]))
    assert abs(as_seconds[-1][1] - seconds(Path("long.wav"))) < 0.01, "the last cue ends with the audio"
    assert "three" in Path("long.srt").read_text(), "the cue text is the text as spoken (normalized)"
    with pytest.raises(SystemExit) as refused:  # not .srt/.vtt: refused by the parser, before sending
        cli(["say", "Hi.", "-o", "x.wav", "--captions", "x.txt"])
    assert refused.value.code == 2 and "captions go to a .srt or .vtt file" in capsys.readouterr().err
