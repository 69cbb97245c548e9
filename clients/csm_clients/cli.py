"""csm-tts: the voice-cloning service from the command line.

    csm-tts say "Hello there." -o hello.wav [--voice alice]
    csm-tts clone me.wav "What the clip says." "Hello in my voice." -o cloned.wav
    csm-tts stream "A longer text, written as it is spoken." -o streamed.wav
    csm-tts say "Fine, thanks." --speaker 1 --context-turn 0 hi.wav "Hi, how are you?" -o reply.wav
    csm-tts read book.txt -o book.wav [--voice alice] [--captions book.srt]
    csm-tts voices add alice me.wav "What the clip says." | voices list | voices rm alice
    csm-tts voices add-adapter my-voice build/my-voice/adapter [--speaker 0]
    csm-tts batch lines.jsonl --out-dir out/ --concurrency 4
    llm ... | csm-tts pipe -o answer.wav   (text on stdin spoken as it arrives, via the gateway)
    csm-tts watermark hello.wav

Triton's address: --url, else $CSM_TRITON_URL, else localhost:8001 (gRPC) or :8000
(--protocol http). Voice writes send --admin-token, else $CSM_ADMIN_TOKEN, else the
file $CSM_ADMIN_TOKEN_FILE names, else make serve's development token
(build/runtime/admin-token, in a checkout). Exit codes: 0 done, 1 a request (or a
batch item) failed or the server refused it, 2 bad command line: anything refused
before it is sent (a sampling value outside the server's range, a missing or
unreadable file, more context turns than the server takes, a speaker outside 0-255, a
text over the server's 20,000 characters).

Conversations (say, stream, read): --context-turn SPEAKER AUDIO TEXT is an earlier turn
(a clip and what it says), --context-voice SPEAKER VOICE_ID a stored voice as a turn;
both repeat, stored voices come first then clips, each in the order given (the server's
order). --speaker is the speaker id of the text to say (default 0).

--speed 0.25-4.0 (say, clone, stream, read) makes the speech faster or slower without
changing its pitch (FFmpeg's atempo; a stream is stretched continuously, chunk after
chunk); 1.0, the default, writes the audio exactly as generated. It needs PyAV, the
`speed` extra (pip install 'csm-tts-client[speed]'); `pipe` needs websockets, the `pipe` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import soundfile

from csm_clients.adapters import read_adapter_folder
from csm_clients.admin_token import admin_token_from_environment
from csm_clients.async_client import AsyncVoiceCloner
from csm_clients.audio import Reference
from csm_clients.batch import run_batch
from csm_clients.captions import FORMATS as CAPTION_FORMATS
from csm_clients.captions import write_captions
from csm_clients.cli_checks import SAMPLING_OPTIONS, UsageError, checked_request, sampling, text_options
from csm_clients.client import VoiceCloner
from csm_clients.errors import CsmClientError
from csm_clients.limits import DEFAULT_LIMITS, check_sampling, check_speaker
from csm_clients.pipe import add_pipe_parser, run_pipe
from csm_clients.timestretch import TimeStretcher, check_speed, needs_stretch, require_av, stretch

__all__ = ["main"]


def _save(speech, args: argparse.Namespace) -> None:
    if needs_stretch(args.speed):
        speech = dataclasses.replace(speech, audio=stretch(speech.audio, speech.sample_rate, args.speed))
    path = speech.save(args.out, args.sample_rate)
    print(f"{path}: {speech.seconds:.2f} s of audio")
    _captions(speech, args)


CAPTIONS_HELP = "also write captions, one per sentence (.srt or .vtt); each sentence is spoken as a segment"


def _captions(spoken, args: argparse.Namespace) -> None:
    """--captions: one cue per sentence (SEGMENT_TIMES, NORMALIZED_TEXT: the request asked
    for a segment per sentence, cli_checks.text_options). `spoken`: a Speech or a stream."""
    if args.captions is None:
        return
    if not spoken.segment_times:
        print("no captions: the server sent no SEGMENT_TIMES", file=sys.stderr)
        return
    print(
        f"{write_captions(args.captions, spoken.segment_times, spoken.normalized_text, speed=args.speed)}: "
        f"{len(spoken.segment_times)} segment(s)"
    )


def _caption_path(value: str) -> Path:
    path = Path(value)
    if path.suffix.lower().lstrip(".") not in CAPTION_FORMATS:
        raise argparse.ArgumentTypeError(f"captions go to a .srt or .vtt file, not {value!r}")
    return path


def _voice(args):
    if args.reference and args.voice:
        raise SystemExit(f"csm-tts {args.command}: give either --voice or --reference, not both")
    return Reference.from_file(args.reference, args.transcript) if args.reference else args.voice


def _say(cloner: VoiceCloner, args) -> int:
    speech = cloner.synthesize(args.text, voice=args.voice, **sampling(args), **text_options(args), **args.request)
    _save(speech, args)
    _report_cut_segments(speech)
    return 0


def _report_cut_segments(spoken) -> None:
    """Segments that never emitted their end frame were cut at a frame cap: worth one
    line (their audio may end mid-word), never an error. `spoken`: a Speech or a stream."""
    cut = [
        f"{number} ({reason}, {frames} frames)"
        for number, (reason, frames) in enumerate(zip(spoken.finish_reasons, spoken.segment_frames), start=1)
        if reason != "end_of_speech"
    ]
    if cut:
        print(
            f"{len(cut)} of {len(spoken.finish_reasons)} segment(s) did not end by themselves: {', '.join(cut)}",
            file=sys.stderr,
        )


def _clone(cloner: VoiceCloner, args) -> int:
    spoken = cloner.clone_voice_from_file(
        args.reference, args.transcript, args.text, **sampling(args), **text_options(args)
    )
    _save(spoken, args)
    return 0


def _stream(cloner: VoiceCloner, args) -> int:
    """Chunks written to the file as they come (stream, and read: a book can pass
    csm_tts's 120 s, which a stream does not have)."""
    voice = _voice(args)
    started, total = time.perf_counter(), 0.0
    output = stretcher = None
    chunks = cloner.stream(args.text, voice=voice, **sampling(args), **text_options(args), **args.request)
    try:
        for number, chunk in enumerate(chunks, start=1):
            if output is None:  # opened on the first chunk: its rate is the stream's
                output = soundfile.SoundFile(args.out, "w", samplerate=chunk.sample_rate, channels=1)
                # One stretcher for the whole stream: continuous across the chunks.
                stretcher = TimeStretcher(args.speed, chunk.sample_rate) if needs_stretch(args.speed) else None
            audio = stretcher.push(chunk.audio) if stretcher else chunk.audio
            output.write(audio)
            total += audio.size / chunk.sample_rate
            if args.command == "stream":
                print(
                    f"chunk {number}: {chunk.seconds:.2f} s of audio at {time.perf_counter() - started:.2f} s",
                    file=sys.stderr,
                )
        if stretcher is not None:
            tail = stretcher.flush()
            output.write(tail)
            total += tail.size / stretcher.sample_rate
    finally:
        if output is not None:
            output.close()
    _report_cut_segments(chunks)
    _captions(chunks, args)
    read = f" ({len(args.text)} characters in {time.perf_counter() - started:.1f} s)" if args.command == "read" else ""
    print(f"{args.out}: {total:.2f} s of audio{read}")
    return 0


def _voices(cloner: VoiceCloner, args) -> int:
    if args.action == "add":
        print(json.dumps(cloner.register_voice(args.voice_id, args.reference, args.transcript)))
    elif args.action == "add-adapter":
        try:  # refused before sending: exit 2, as main's own checks
            if (args.reference is None) != (args.transcript is None):
                raise UsageError("give --reference and --transcript together")
            limits = cloner.limits()
            if args.default_speaker is not None:
                check_speaker(args.default_speaker, "--speaker", limits)
            files = read_adapter_folder(args.folder, limits)
        except (UsageError, CsmClientError) as error:
            print(f"csm-tts voices add-adapter: error: {error}", file=sys.stderr)
            return 2
        print(
            json.dumps(
                cloner.register_adapter(
                    args.voice_id,
                    files,
                    default_speaker=args.default_speaker,
                    reference_audio=args.reference,
                    transcript=args.transcript,
                )
            )
        )
    elif args.action == "rm":
        print(json.dumps(cloner.delete_voice(args.voice_id)))
    else:
        voices = cloner.list_voices()
        if args.json:
            print(json.dumps(voices, indent=2))
        for voice in [] if args.json else voices:
            adapter = (
                f"[adapter r{voice.get('rank')} {voice.get('size_bytes', 0) / 2**20:.1f} MiB] "
                if voice.get("kind") == "adapter"
                else ""
            )
            print(f"{voice['voice_id']:<24} {voice['duration_seconds']:>6.2f} s  {adapter}{voice['transcript']}")
    return 0


def _watermark(cloner: VoiceCloner, args) -> int:
    score = cloner.detect_watermark(args.audio)
    print(f"{args.audio}: watermark score {score:.3f}, {'watermarked' if score.watermarked else 'not watermarked'}")
    return 0


def _batch(args) -> int:
    async def run():
        async with AsyncVoiceCloner(args.url, args.protocol, timeout=args.timeout) as cloner:
            return await run_batch(args.input, args.out_dir, cloner, concurrency=args.concurrency)

    summary = asyncio.run(run())
    print(summary.table())
    return 1 if summary.failures else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csm-tts",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("CSM_TRITON_URL"),
        help="Triton host:port (default $CSM_TRITON_URL, else localhost:8001 / :8000 for http)",
    )
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument(
        "--admin-token",
        help="for voices add/rm (default $CSM_ADMIN_TOKEN, else $CSM_ADMIN_TOKEN_FILE's content, "
        "else build/runtime/admin-token from make serve)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    commands = parser.add_subparsers(dest="command", required=True)

    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--top-k", type=int)
    sampling.add_argument("--seed", type=int)
    sampling.add_argument("--max-audio-seconds", type=float)
    sampling.add_argument(
        "--no-normalize", action="store_true", help="speak the text as written (default: numbers, dates... as words)"
    )
    sampling.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="0.25-4.0: faster or slower, same pitch (default 1.0: as generated); needs the `speed` extra (PyAV)",
    )
    conversation = argparse.ArgumentParser(add_help=False)
    conversation.add_argument("--speaker", type=int, help="speaker id of the text (0-255, default 0)")
    conversation.add_argument(
        "--context-turn",
        nargs=3,
        action="append",
        metavar=("SPEAKER", "AUDIO", "TEXT"),
        help="an earlier turn: its speaker id, a clip of it and what the clip says (repeatable)",
    )
    conversation.add_argument(
        "--context-voice",
        nargs=2,
        action="append",
        metavar=("SPEAKER", "VOICE_ID"),
        help="a stored voice as an earlier turn, before the --context-turn turns (repeatable)",
    )
    output = argparse.ArgumentParser(add_help=False, parents=[sampling])
    output.add_argument("-o", "--out", type=Path, required=True, help="audio file (.wav, .flac, .ogg ...)")
    output.add_argument("--sample-rate", type=int, help="resample the result to this rate (default: as generated)")
    output.add_argument("--captions", type=_caption_path, help=CAPTIONS_HELP)

    say = commands.add_parser(
        "say", parents=[output, conversation], help="speak text (a stored voice or the default one)"
    )
    say.add_argument("text")
    say.add_argument("--voice", help="a stored voice id")
    say.set_defaults(run=_say)

    clone = commands.add_parser("clone", parents=[output], help="speak text in the voice of a clip")
    clone.add_argument("reference", type=Path, help="the reference clip (any soundfile format)")
    clone.add_argument("transcript", help="what the clip says")
    clone.add_argument("text")
    clone.set_defaults(run=_clone)

    streamed = argparse.ArgumentParser(add_help=False, parents=[sampling, conversation])
    streamed.add_argument("-o", "--out", type=Path, required=True, help="audio file")
    streamed.add_argument("--captions", type=_caption_path, help=CAPTIONS_HELP)
    streamed.add_argument("--voice", help="a stored voice id")
    streamed.add_argument("--reference", type=Path, help="a reference clip (with --transcript)")
    streamed.add_argument("--transcript", help="what the reference clip says")
    stream = commands.add_parser("stream", parents=[streamed], help="stream speech, writing chunks as they come")
    stream.add_argument("text")
    stream.set_defaults(run=_stream)
    read = commands.add_parser(
        "read",
        parents=[streamed],
        help=f"speak a UTF-8 text file (up to {DEFAULT_LIMITS.MAX_LONG_TEXT_CHARS} characters) in one "
        "streamed request, written as it comes",
    )
    read.add_argument("book", type=Path, help="the text file")
    read.set_defaults(run=_stream)

    voices = commands.add_parser("voices", help="stored voices: add, add-adapter, list, rm")
    actions = voices.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="store a voice (needs the admin token)")
    add.add_argument("voice_id")
    add.add_argument("reference", type=Path)
    add.add_argument("transcript")
    adapter = actions.add_parser(
        "add-adapter", help="store a LoRA adapter from make finetune as a voice (needs the admin token)"
    )
    adapter.add_argument("voice_id")
    adapter.add_argument("folder", type=Path, help="the adapter folder (OUT/adapter) or the run folder (OUT)")
    adapter.add_argument("--speaker", type=int, dest="default_speaker", help="the speaker id it speaks as (0-255)")
    adapter.add_argument("--reference", type=Path, help="a reference clip of its own (with --transcript)")
    adapter.add_argument("--transcript", help="what the reference clip says")
    listing = actions.add_parser("list", help="list stored voices")
    listing.add_argument("--json", action="store_true")
    remove = actions.add_parser("rm", help="delete a stored voice (needs the admin token)")
    remove.add_argument("voice_id")
    voices.set_defaults(run=_voices)

    watermark = commands.add_parser("watermark", help="watermark score of an audio file")
    watermark.add_argument("audio", type=Path)
    watermark.set_defaults(run=_watermark)

    batch = commands.add_parser("batch", help="many items (.jsonl or .csv) to WAV files, resumable")
    batch.add_argument("input", type=Path)
    batch.add_argument("--out-dir", type=Path, required=True)
    batch.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    batch.set_defaults(run=None)
    add_pipe_parser(commands)  # pipe.py: through the gateway's WebSocket, its own options
    return parser


def _check(args: argparse.Namespace, cloner: VoiceCloner) -> None:
    """A speaking command's options, against the server's limits (read from it once);
    sets args.request. Refused like the server would, before any conversion:
    --top-k 2147483648 must not wrap in INT32, --seed 2**63 not overflow INT64."""
    if not hasattr(args, "speed"):  # voices, watermark: nothing to check here
        return
    limits = cloner.limits()
    check_sampling(**sampling(args), field_names=SAMPLING_OPTIONS, limits=limits)
    if needs_stretch(check_speed(args.speed, "--speed")):
        require_av()  # the `speed` extra, before any synthesis is paid for
    args.request = checked_request(args, limits)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "pipe":  # talks to the gateway, not Triton (pipe.py)
        return run_pipe(args)
    # An explicit --admin-token, even empty, wins over the environment and the token file.
    admin_token = args.admin_token if args.admin_token is not None else admin_token_from_environment()
    try:
        if args.command == "batch":  # each item checked as its turn comes (batch.py)
            return _batch(args)
        with VoiceCloner(args.url, args.protocol, admin_token=admin_token, timeout=args.timeout) as cloner:
            try:  # every refusal before sending: one line, exit 2 (the server's own: exit 1)
                _check(args, cloner)
            except (UsageError, CsmClientError) as error:
                print(f"csm-tts {args.command}: error: {error}", file=sys.stderr)
                return 2
            return args.run(cloner, args)
    except CsmClientError as error:
        print(f"csm-tts: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
