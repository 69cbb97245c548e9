"""perf_analyzer input data (its JSON `--input-data` format) from the load tests' real
workload: the texts of loadtest/data/texts.txt, the stored voices' ids, the reference
clips and their transcripts, and Mimi codes for the decoder.

    python -m loadtest.perf_analyzer.make_inputs --out build/perf_inputs [--max-audio-seconds 4]

Writes one file per request kind; perf_analyzer takes their entries in turn:
- csm_tts_voice.json      TEXT, VOICE_ID, MAX_AUDIO_SECONDS, SEED (csm_tts and csm_tts_stream)
- csm_tts_reference.json  TEXT, REFERENCE_AUDIO/_SAMPLE_RATE/_TEXT, MAX_AUDIO_SECONDS, SEED
- mimi_decoder_<N>f.json  audio_codes [32, N] per request (the batch dimension is perf_analyzer's -b)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from loadtest import workload

NUM_CODEBOOKS = 32
CODEBOOK_SIZE = 2048
# The two shapes the decoder sees while streaming: the 4-frame first chunk (no left
# context yet) and a 12-frame chunk decoded with 25 frames of left context.
DECODER_FRAMES = (4, 37)
REFERENCE_ENTRIES = 8


def tts_entries(
    texts: list[str], cap: float, voice_ids: list[str] | None = None, references: list[workload.Reference] | None = None
) -> list[dict]:
    entries = []
    for index, text in enumerate(texts):
        entry = {"TEXT": [text], "MAX_AUDIO_SECONDS": [workload.audio_seconds_for(text, cap)], "SEED": [index]}
        if voice_ids:
            entry["VOICE_ID"] = [voice_ids[index % len(voice_ids)]]
        if references:
            reference = references[index % len(references)]
            audio = workload.reference_inputs(reference)[0]["data"]
            entry |= {
                "REFERENCE_AUDIO": {"content": audio, "shape": [len(audio)]},
                "REFERENCE_SAMPLE_RATE": [reference.sample_rate],
                "REFERENCE_TEXT": [reference.transcript],
            }
        entries.append(entry)
    return entries


def decoder_entries(frames: int, count: int, seed: int) -> list[dict]:
    """Random codes: the decoder's cost does not depend on their values."""
    rng = random.Random(seed)
    return [
        {
            "audio_codes": {
                "content": [rng.randrange(CODEBOOK_SIZE) for _ in range(NUM_CODEBOOKS * frames)],
                "shape": [NUM_CODEBOOKS, frames],
            }
        }
        for _ in range(count)
    ]


def write_inputs(
    out: Path, voice_ids: list[str], cap: float, decoder_frames=DECODER_FRAMES, seed: int = 0
) -> dict[str, Path]:
    """Every input file; returns {kind: path}."""
    out.mkdir(parents=True, exist_ok=True)
    texts = workload.load_texts()
    random.Random(seed).shuffle(texts)
    documents = {
        "csm_tts_voice": tts_entries(texts, cap, voice_ids=voice_ids),
        # Fewer entries: each carries a clip (~0.5 MB of JSON).
        "csm_tts_reference": tts_entries(texts[:REFERENCE_ENTRIES], cap, references=workload.load_references()),
        **{f"mimi_decoder_{frames}f": decoder_entries(frames, 8, seed + frames) for frames in decoder_frames},
    }
    paths = {}
    for kind, entries in documents.items():
        paths[kind] = out / f"{kind}.json"
        paths[kind].write_text(json.dumps({"data": entries}, ensure_ascii=False))
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--voice-ids",
        default=",".join(r.voice_id for r in workload.load_references()),
        help="stored voices to name (default: the load tests' own, see workload.register_voices)",
    )
    parser.add_argument("--max-audio-seconds", type=float, default=4.0)
    parser.add_argument("--decoder-frames", type=lambda s: [int(v) for v in s.split(",")], default=list(DECODER_FRAMES))
    args = parser.parse_args(argv)
    paths = write_inputs(args.out, args.voice_ids.split(","), args.max_audio_seconds, args.decoder_frames)
    for kind, path in paths.items():
        print(f"{kind}: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
