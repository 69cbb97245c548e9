"""How csm_tts_stream joins the segments of a long text: the audio around each segment
join against the audio around each chunk join inside a segment.

    python -m loadtest.segment_joins --serve REPOSITORY [--chars 5000] [--seconds-per-char 0.02]
                                     [--seed 3] [--out loadtest/results]

The same long text and seed go through csm_tts (every segment's codes decoded at once:
no joins at all) and csm_tts_stream (segments streamed back to back, chunk by chunk).
At each join of the stream, the SNR of the streamed audio against csm_tts's in a window
around the join is the measure of tests/model/test_streaming.py and
loadtest/streaming_decode_bench.py (streamed vs whole decode), taken locally: a join
decoded without the codes before it (a decoder restarted per segment) falls to the
no-context figure (~7 dB), a join decoded with them matches the chunk joins. The frame
budget per character is set on csm_prepare through Triton's model-load API for the run
(docs/model_config.md, `segment_seconds_per_char`) and put back afterwards, so that
csm_tts (at most 120 s) can return the whole text.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from csm_triton import constants as C
from csm_triton.core.stream_decoder import snr_db
from csm_triton.serving.flags import model_control_headers, model_control_key
from loadtest import common
from loadtest.workload import git_commit

WINDOW_FRAMES = 1  # each side of a join: 80 ms
WORDS = ("river", "town", "baker", "lantern", "morning", "harbour", "letter", "garden")


def long_text(chars: int) -> str:
    """Whole sentences (numbers, commas) up to `chars` characters."""
    sentences, total, i = [], 0, 0
    while True:
        sentence = (
            f"Sentence {i} tells how the {WORDS[i % 8]} and the {WORDS[(i * 3 + 1) % 8]} met again, {i + 2} days later."
        )
        if total + len(sentence) + 1 > chars:
            return " ".join(sentences)
        sentences.append(sentence)
        total += len(sentence) + 1
        i += 1


def joins(segment_frames, chunk_frames) -> tuple[list[int], list[int]]:
    """(segment joins, chunk joins inside segments) as frame positions of the stream."""
    segment = set(np.cumsum(segment_frames)[:-1].tolist()) - {0}
    every = set(np.cumsum(chunk_frames)[:-1].tolist())
    return sorted(segment), sorted(every - segment)


def join_snrs(reference: np.ndarray, streamed: np.ndarray, positions, window_frames: int = WINDOW_FRAMES):
    """snr_db of the streamed audio against the reference in a window around each join."""
    window = window_frames * C.SAMPLES_PER_FRAME
    values = []
    for frame in positions:
        at = frame * C.SAMPLES_PER_FRAME
        values.append(snr_db(reference[at - window : at + window], streamed[at - window : at + window]))
    return values


def summary(values) -> dict:
    return {"joins": len(values), "min_db": round(min(values), 2), "median_db": round(statistics.median(values), 2)}


def stream(client, inputs) -> tuple[list[np.ndarray], dict, float]:
    """csm_tts_stream over gRPC: the audio chunks, the final response's outputs, and the
    seconds to the first chunk."""
    arrivals = queue.Queue()
    client.start_stream(callback=lambda result, error: arrivals.put((time.perf_counter(), result, error)))
    chunks, final, first = [], {}, None
    started = time.perf_counter()
    try:
        client.async_stream_infer("csm_tts_stream", inputs, enable_empty_final_response=True)
        while True:
            arrived, result, error = arrivals.get(timeout=600)
            if error is not None:
                raise RuntimeError(f"csm_tts_stream: {error}")
            audio = result.as_numpy("AUDIO")
            if audio is not None and audio.size:
                first = first or arrived - started
                chunks.append(audio)
            if result.as_numpy("FINISH_REASONS") is not None:
                final = {name: result.as_numpy(name) for name in ("FINISH_REASONS", "SEGMENT_FRAMES")}
            flag = result.get_response().parameters.get("triton_final_response")
            if flag is not None and flag.bool_param:
                return chunks, final, first
    finally:
        client.stop_stream()


def set_budget(
    client, seconds_per_char: float | None, min_seconds: float | None, headers: dict[str, str] | None
) -> None:
    """csm_prepare loaded again with the frame-budget parameters (None, None: as in its
    repository). headers: the model-control key's (loading is refused without it)."""
    if seconds_per_char is None and min_seconds is None:
        client.load_model("csm_prepare", headers=headers)
        return
    config = client.get_model_config("csm_prepare", as_json=True)["config"]
    for key, value in (("segment_seconds_per_char", seconds_per_char), ("segment_min_seconds", min_seconds)):
        if value is not None:
            config.setdefault("parameters", {})[key] = {"string_value": str(value)}
    client.load_model("csm_prepare", config=json.dumps(config), headers=headers)


def measure(grpc_url: str, chars: int, seed: int) -> dict:
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(grpc_url)
    text = long_text(chars)

    def inputs():
        items = []
        for name, value in (("TEXT", np.array([text.encode()], dtype=object)), ("SEED", np.array([seed], np.int64))):
            item = grpc.InferInput(name, list(value.shape), "BYTES" if value.dtype == object else "INT64")
            item.set_data_from_numpy(value)
            items.append(item)
        return items

    started = time.perf_counter()
    offline = client.infer("csm_tts", inputs(), client_timeout=600)
    offline_seconds = time.perf_counter() - started
    started = time.perf_counter()
    chunks, final, first = stream(client, inputs())
    stream_seconds = time.perf_counter() - started
    whole, streamed = offline.as_numpy("AUDIO"), np.concatenate(chunks)
    frames = final["SEGMENT_FRAMES"].tolist()
    if offline.as_numpy("SEGMENT_FRAMES").tolist() != frames or whole.shape != streamed.shape:
        raise RuntimeError("csm_tts and csm_tts_stream generated different segments for the same seed")
    segment_joins, chunk_joins = joins(frames, [len(c) // C.SAMPLES_PER_FRAME for c in chunks])
    return {
        "text_chars": len(text),
        "segments": len(frames),
        "segment_frames": frames,
        "finish_reasons": sorted({r.decode() for r in final["FINISH_REASONS"]}),
        "audio_seconds": round(len(streamed) / C.SAMPLE_RATE, 2),
        "csm_tts_seconds": round(offline_seconds, 2),
        "stream_seconds": round(stream_seconds, 2),
        "stream_first_chunk_seconds": round(first, 3),
        "whole_snr_db": round(snr_db(whole, streamed), 2),
        "segment_joins": summary(join_snrs(whole, streamed, segment_joins)),
        "chunk_joins": summary(join_snrs(whole, streamed, chunk_joins)),
    }


def markdown(report: dict) -> str:
    r = report
    rows = [("segment joins", r["segment_joins"]), ("chunk joins inside a segment", r["chunk_joins"])]
    lines = [
        "# Segment joins of a long text in csm_tts_stream",
        "",
        f"- model: {r['model']} ({r['device']}); commit `{r['commit']}`; command: `{r['command']}`",
        f"- {r['text_chars']} characters, {r['segments']} segments, {r['audio_seconds']} s of audio "
        f"(frame budget {r['seconds_per_char']} s per character, floor {r['min_seconds']} s; endings: "
        f"{', '.join(r['finish_reasons'])})",
        f"- csm_tts {r['csm_tts_seconds']} s; csm_tts_stream {r['stream_seconds']} s, first chunk after "
        f"{r['stream_first_chunk_seconds']} s",
        f"- whole stream vs csm_tts: {r['whole_snr_db']} dB SNR",
        "",
        f"| joins | count | min SNR (dB), ±{WINDOW_FRAMES * 80} ms | median SNR (dB) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {s['joins']} | {s['min_db']} | {s['median_db']} |" for name, s in rows]
    lines += [
        "",
        "The reference is csm_tts's audio of the same codes (one decode, no joins), so the figure",
        "is how far the stream departs from an uncut decode around each join; both outputs are",
        "watermarked, the stream chunk by chunk. A segment join is an ordinary chunk join (one",
        "decoder for the whole stream, 25 frames of left context across the segment boundary):",
        "a decoder restarted per segment would fall to the no-context figure of",
        "streaming_decode.md (7 dB over a whole stream) for each segment's first chunk.",
        "With the tiny random checkpoint the audio is noise, so this says nothing of how a",
        "real voice carries over a join (prosody, level), only that the codec output is",
        "continuous there. Load average (1 min) of the machine before / after the run:",
        f"{r['load_before']} / {r['load_after']} (other work shared the 2 cores).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_target_arguments(parser)
    parser.add_argument("--chars", type=int, default=5000)
    parser.add_argument(
        "--seconds-per-char",
        type=float,
        default=0.02,
        help="csm_prepare's segment_seconds_per_char for the run (csm_tts returns at most 120 s)",
    )
    parser.add_argument("--min-seconds", type=float, default=1.0, help="csm_prepare's segment_min_seconds")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import tritonclient.grpc as grpc

    load_before = round(os.getloadavg()[0], 2)
    with common.target_from_args(args, register=False) as target:
        control = grpc.InferenceServerClient(target.grpc)
        # A server started here has its own key; a running one takes $CSM_MODEL_CONTROL_KEY.
        if target.server is not None:
            headers = target.server.grpc_model_control_headers
        else:
            headers = (
                model_control_headers(model_control_key(), "grpc") if os.environ.get(C.MODEL_CONTROL_KEY_ENV) else None
            )
        set_budget(control, args.seconds_per_char, args.min_seconds, headers)
        try:
            report = measure(target.grpc, args.chars, args.seed)
        finally:
            set_budget(control, None, None, headers)
        report.update(
            model=target.model,
            device=target.device,
            commit=git_commit(),
            load_before=load_before,
            load_after=round(os.getloadavg()[0], 2),
            seconds_per_char=args.seconds_per_char,
            min_seconds=args.min_seconds,
            command="python -m loadtest.segment_joins " + " ".join(argv if argv is not None else sys.argv[1:]),
        )
    table = markdown(report)
    print(table)
    if args.out:
        common.write_report(args.out, "segment_joins", report, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
