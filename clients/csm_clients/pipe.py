"""csm-tts pipe: text on stdin, spoken as it arrives, audio out (through the gateway's text stream).

    llm ... | csm-tts pipe -o answer.wav [--voice alice] [--gateway http://localhost:7860]
    llm ... | csm-tts pipe --format pcm | aplay -f S16_LE -r 24000 -c 1

stdin is read as it comes (`--by chunk`, the default: whatever the pipe holds, at most
4 KiB at a time; `--by line`: line by line) and sent to the gateway's WebSocket route
(csm_clients.text_stream); each sentence is spoken once it is complete, and the rest
when stdin ends. The audio is written as it arrives: raw 24 kHz 16-bit mono PCM, or a
WAV file (to a file its header carries the real length; to stdout its sizes read
"unknown", as a streamed WAV does). The gateway's address: --gateway, else
$CSM_GATEWAY_URL, else http://localhost:7860; its API key: --api-key, else
$CSM_GATEWAY_API_KEY.
"""

from __future__ import annotations

import argparse
import codecs
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile

from csm_clients.errors import CsmClientError
from csm_clients.limits import check_sampling, check_speaker

__all__ = ["add_pipe_parser", "run_pipe", "stdin_deltas"]

SAMPLE_RATE = 24_000
CHUNK_BYTES = 4_096


def add_pipe_parser(commands) -> None:
    """The `pipe` subcommand of csm-tts (cli.py)."""
    pipe = commands.add_parser(
        "pipe",
        help="speak text from stdin as it arrives (through the gateway), audio out; "
        "needs the `pipe` extra (websockets)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pipe.add_argument("-o", "--out", default="-", help="audio file, or - for stdout (default)")
    pipe.add_argument(
        "--format", choices=("pcm", "wav"), help="raw 16-bit PCM or WAV (default: wav for a .wav file, else pcm)"
    )
    pipe.add_argument("--by", choices=("chunk", "line"), default="chunk", help="how stdin is read (default chunk)")
    pipe.add_argument(
        "--gateway",
        default=os.environ.get("CSM_GATEWAY_URL", "http://localhost:7860"),
        help="the gateway's URL (default $CSM_GATEWAY_URL, else http://localhost:7860)",
    )
    pipe.add_argument(
        "--api-key",
        default=os.environ.get("CSM_GATEWAY_API_KEY"),
        help="the gateway's API key (default $CSM_GATEWAY_API_KEY)",
    )
    pipe.add_argument("--voice", help="a stored voice id (default: the model's voice)")
    pipe.add_argument("--speaker", type=int, help="speaker id of the text (0-255, default 0)")
    pipe.add_argument("--temperature", type=float)
    pipe.add_argument("--top-k", type=int)
    pipe.add_argument("--seed", type=int)


def stdin_deltas(stream: BinaryIO, by: str = "chunk") -> Iterator[str]:
    """UTF-8 text from `stream` as it arrives (a character cut between two reads waits
    for the rest of its bytes); UnicodeDecodeError names the byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    fileno = stream.fileno() if by == "chunk" and hasattr(stream, "fileno") else None
    read = 0
    while True:
        data = os.read(fileno, CHUNK_BYTES) if fileno is not None else stream.readline()
        try:
            text = decoder.decode(data, final=not data)
        except UnicodeDecodeError as error:
            raise UnicodeDecodeError(
                error.encoding,
                error.object,
                error.start,
                error.end,
                f"stdin is not UTF-8 text (byte {read + error.start})",
            ) from None
        read += len(data)
        if text:
            yield text
        if not data:
            return


class _Output:
    """Where the audio goes, written as it comes."""

    def __init__(self, out: str, audio_format: str):
        self.to_stdout = out == "-"
        self.audio_format, self.samples = audio_format, 0
        self._sound = self._raw = None
        if audio_format == "wav" and not self.to_stdout:
            self._sound = soundfile.SoundFile(out, "w", SAMPLE_RATE, 1, subtype="PCM_16")
        else:
            self._raw = sys.stdout.buffer if self.to_stdout else open(out, "wb")
            if audio_format == "wav":  # a streamed WAV: sizes "unknown" (0xFFFFFFFF), as players expect
                self._raw.write(
                    b"RIFF"
                    + struct.pack("<I", 0xFFFFFFFF)
                    + b"WAVEfmt "
                    + struct.pack("<IHHIIHH", 16, 1, 1, SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16)
                    + b"data"
                    + struct.pack("<I", 0xFFFFFFFF)
                )

    def write(self, data: bytes) -> None:
        self.samples += len(data) // 2
        if self._sound is not None:
            self._sound.write(np.frombuffer(data, "<i2"))
        else:
            self._raw.write(data)
            self._raw.flush()

    def close(self) -> None:
        if self._sound is not None:
            self._sound.close()
        elif self._raw is not None and not self.to_stdout:
            self._raw.close()


def run_pipe(args: argparse.Namespace) -> int:
    """Exit codes as csm-tts's: 0 done, 1 the gateway or the server refused or failed,
    2 refused before sending (an option out of range, stdin not UTF-8)."""
    try:
        check_sampling(
            seed=args.seed,
            temperature=args.temperature,
            top_k=args.top_k,
            field_names={"seed": "--seed", "temperature": "--temperature", "top_k": "--top-k"},
        )
        if args.speaker is not None:
            check_speaker(args.speaker, "--speaker")
    except CsmClientError as error:
        print(f"csm-tts pipe: error: {error}", file=sys.stderr)
        return 2
    try:
        from csm_clients.text_stream import stream_text  # websockets (the `pipe` extra): only this command
    except CsmClientError as error:  # MissingExtra: which extra to install
        print(f"csm-tts pipe: error: {error}", file=sys.stderr)
        return 2

    audio_format = args.format or ("wav" if Path(args.out).suffix.lower() == ".wav" else "pcm")
    output = None
    try:
        speech = stream_text(
            args.gateway,
            stdin_deltas(sys.stdin.buffer, args.by),
            voice=args.voice,
            api_key=args.api_key,
            seed=args.seed,
            temperature=args.temperature,
            top_k=args.top_k,
            speaker=args.speaker,
        )
        output = _Output(args.out, audio_format)
        with speech:
            for data in speech:
                output.write(data)
    except UnicodeDecodeError as error:
        print(f"csm-tts pipe: error: {error.reason}", file=sys.stderr)
        return 2
    except CsmClientError as error:
        print(f"csm-tts: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    finally:
        if output is not None:
            output.close()
    cut = [
        f"{s.index + 1} ({', '.join(s.finish_reasons)})"
        for s in speech.sentences
        if any(reason != "end_of_speech" for reason in s.finish_reasons)
    ]
    if cut:
        print(
            f"{len(cut)} of {len(speech.sentences)} sentence(s) did not end by themselves: {', '.join(cut)}",
            file=sys.stderr,
        )
    print(
        f"{'stdout' if output.to_stdout else args.out}: {output.samples / SAMPLE_RATE:.2f} s of audio, "
        f"{len(speech.sentences)} sentence(s)",
        file=sys.stderr,
    )
    return 0
