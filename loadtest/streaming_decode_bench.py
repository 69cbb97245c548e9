"""Streamed vs whole-utterance decoding of the same codes, against the amount of left
context each chunk is decoded with.

    python -m loadtest.streaming_decode_bench --checkpoint DIR [--seconds 10] [--out loadtest/results]

Exports the checkpoint's Mimi decoder to ONNX (as the repository build does), decodes
random codes whole and in the streaming chunk schedule (csm_triton.core.stream_decoder) with
several left-context lengths, and reports the SNR of the streamed audio against the
whole decode and the decoding cost relative to decoding once.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from csm_triton import constants as C
from csm_triton.core.stream_decoder import StreamDecoder, snr_db
from loadtest import common
from loadtest.workload import git_commit

CONTEXTS = (0, 5, 12, 25, 50, C.MIMI_ATTENTION_WINDOW_FRAMES)


def chunked(decoder: StreamDecoder, codes: np.ndarray) -> np.ndarray:
    pieces, start = [], 0
    while start < len(codes):
        end = start + (C.STREAM_FIRST_CHUNK_FRAMES if start == 0 else C.STREAM_CHUNK_FRAMES)
        pieces.append(decoder.push(codes[start:end]))
        start = end
    return np.concatenate(pieces)


def run(checkpoint: Path, seconds: float, seed: int) -> dict:
    from export.mimi_onnx import export_mimi

    folder = Path(tempfile.mkdtemp(prefix="csm-stream-bench-"))
    export_mimi(checkpoint, folder / "encoder.onnx", folder / "decoder.onnx")
    session = ort.InferenceSession(str(folder / "decoder.onnx"), providers=["CPUExecutionProvider"])
    frames_decoded = [0]

    def decode(codes: np.ndarray) -> np.ndarray:
        frames_decoded[0] += len(codes)
        return session.run(None, {"audio_codes": codes.T[None].astype(np.int64)})[0][0, 0]

    frames = int(seconds * C.FRAME_RATE_HZ)
    codes = np.random.default_rng(seed).integers(0, C.CODEBOOK_SIZE, (frames, C.NUM_CODEBOOKS))
    whole = decode(codes)
    rows = []
    for context in CONTEXTS:
        frames_decoded[0] = 0
        started = time.perf_counter()
        streamed = chunked(StreamDecoder(decode, context), codes)
        rows.append(
            {
                "left_context_frames": context,
                "snr_db": round(snr_db(whole, streamed), 2),
                "max_abs_diff": float(np.abs(whole - streamed).max()),
                "decode_cost_vs_whole": round(frames_decoded[0] / frames, 2),
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return {
        "checkpoint": str(checkpoint),
        "audio_seconds": seconds,
        "commit": git_commit(),
        "command": "python -m loadtest.streaming_decode_bench " + " ".join(sys.argv[1:]),
        "chunks": f"{C.STREAM_FIRST_CHUNK_FRAMES} then {C.STREAM_CHUNK_FRAMES} frames",
        "rows": rows,
    }


def markdown(report: dict) -> str:
    lines = [
        "# Streamed vs whole-utterance Mimi decoding",
        "",
        f"- checkpoint: `{report['checkpoint']}`; {report['audio_seconds']} s of random codes; chunks of "
        f"{report['chunks']}",
        f"- commit `{report['commit']}`; command: `{report['command']}`",
        "",
        "| left context (frames) | SNR vs whole decode (dB) | max abs diff | frames decoded / frames |",
        "|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['left_context_frames']} | {row['snr_db']} | {row['max_abs_diff']:.2e} | "
            f"{row['decode_cost_vs_whole']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = run(args.checkpoint, args.seconds, args.seed)
    table = markdown(report)
    print(table)
    if args.out:
        common.write_report(args.out, "streaming_decode", report, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
