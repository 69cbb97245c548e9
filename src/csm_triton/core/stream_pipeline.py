"""One streamed utterance, from text to watermarked audio chunks, with its stages injected.

The pipeline knows the order of the work and how a stream ends; the stages know how
to reach the models (in the server: BLS calls to csm_prepare, csm_lm, mimi_decoder and
watermark). That split lets the ending rules be tested without a server:

* exactly one final response (`finish` or `fail`) per stream, whatever fails, even
  `send` itself or the final call's own transport;
* a client that goes away stops the pulling of codes, and the generator is told to
  free its KV slot (`cancel_generation`), since csm_lm cannot see that its caller left;
* a stage's failure reaches the client as that stage's error (an `InvalidInput` of
  csm_prepare stays a client error);
* a long text's segments (csm_prepare's segment outputs) are generated one after the
  other and streamed back to back, still with one final response for the whole, which
  says how each segment ended (FINISH_REASONS) and how many frames it took
  (SEGMENT_FRAMES), beside an empty AUDIO so that clients reading every response's
  AUDIO as a chunk keep working;
* a long text's first audio waits for its first segment only: csm_prepare is asked for
  the head alone (`head_only`), and for the rest's segments on a thread of its own
  while the head is spoken (core.text_split.split_head: the same segments as a whole
  split);
* a text that arrives in pieces (`continue_from`, core.continuation) continues the
  chain of the piece before: its segments are the next segments of one long text, and
  its final response names the tail it leaves for the next piece (CONTINUATION).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from csm_triton import constants as C
from csm_triton.core import validation
from csm_triton.core.continuation import ContinuationStore
from csm_triton.core.segments import SegmentChain
from csm_triton.core.stream_decoder import StreamDecoder

Arrays = Mapping[str, np.ndarray]
# prepare inputs (TEXT, VOICE_ID, ...) -> the prompt csm_lm takes (input_ids, prompt_codes)
Prepare = Callable[[Arrays], Arrays]
# (prompt + sampling + chunk schedule, stream id) -> code chunks [frames, NUM_CODEBOOKS];
# a generator may return csm_lm's finish reason (its StopIteration value), else the
# chain infers it from the frame cap.
Generate = Callable[[Arrays, str], Iterable[np.ndarray]]
Decode = Callable[[np.ndarray], np.ndarray]  # codes [frames, NUM_CODEBOOKS] -> samples
Watermark = Callable[[np.ndarray], np.ndarray]  # samples -> samples of the same length
CancelGeneration = Callable[[str], None]
SegmentsEnded = Callable[[list[str]], None]  # every segment's finish reason, once per stream

SAMPLE_RATE = np.array([C.SAMPLE_RATE], dtype=np.int32)
# How long a stream that ends waits for its rest's csm_prepare call still in flight (its
# normalization stops after NORMALIZE_BUDGET_SECONDS).
REST_WAIT_S = C.NORMALIZE_BUDGET_SECONDS + 3.0
# The inputs a rest's csm_prepare request carries of the stream's: the text and how to speak
# it (an adapter voice's default speaker comes with VOICE_ID), never the audio.
REST_INPUTS = ("TEXT", "NORMALIZE", "SENTENCE_SEGMENTS", "VOICE_ID", "SPEAKER")
LOG = logging.getLogger("csm_triton")


class ResponseSender(Protocol):
    """Where one stream's responses go (csm_triton.triton.adapter.StreamSender in the server)."""

    def send(self, outputs: Arrays) -> None: ...

    def finish(self, outputs: Arrays | None = None) -> None: ...

    def fail(self, error: BaseException) -> None: ...

    def is_cancelled(self) -> bool: ...


def new_stream_id() -> str:
    return f"csm-stream-{uuid.uuid4().hex}"


@dataclass
class StreamPipeline:
    prepare: Prepare
    generate: Generate
    decode: Decode
    watermark: Watermark
    cancel_generation: CancelGeneration
    # A small first chunk gives a short time to first audio; larger ones after it cost
    # fewer decoder calls. csm_lm cuts the chunks; the pipeline only asks for the sizes.
    first_chunk_frames: int = C.STREAM_FIRST_CHUNK_FRAMES
    chunk_frames: int = C.STREAM_CHUNK_FRAMES
    left_context_frames: int = C.STREAM_LEFT_CONTEXT_FRAMES
    log_error: Callable[[str], None] = LOG.error
    segments_ended: SegmentsEnded = lambda reasons: None
    continuations: ContinuationStore | None = None  # the tails of texts that arrive in pieces
    # Where the rests of long texts are prepared while their heads are spoken: a few at a
    # time (csm_prepare has two instances), the others wait their turn.
    rest_workers: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(4, thread_name_prefix="csm-prepare-rest")
    )

    def run(
        self,
        prepare_inputs: Arrays,
        sampling: Arrays,
        sender: ResponseSender,
        stream_id: str | None = None,
        continue_from: str | None = None,
    ) -> None:
        """Streams one utterance to `sender` and ends it with exactly one final response.
        `continue_from`: None for a text on its own; "" for the first piece of a text
        that arrives in pieces, or the CONTINUATION of the piece before."""
        stream_id = stream_id or new_stream_id()
        try:
            final = self._stream(prepare_inputs, sampling, sender, stream_id, continue_from)
        except Exception as error:  # noqa: BLE001 - every failure ends the stream with its message
            self._end(sender, stream_id, error)
        except BaseException as error:  # the process is going down: still one final, then let it go
            self._end(sender, stream_id, error)
            raise
        else:
            self._end(sender, stream_id, None, final)

    def _stream(
        self,
        prepare_inputs: Arrays,
        sampling: Arrays,
        sender: ResponseSender,
        stream_id: str,
        continue_from: str | None = None,
    ) -> Arrays | None:
        """Streams every segment; the final response's outputs, or None when the client left."""
        if continue_from is not None and self.continuations is None:
            raise ValueError("this stream pipeline keeps no continuations")
        # An unknown id is refused before any work; a known one is used up here.
        tail = self.continuations.take(continue_from) if continue_from else None
        prepared = self.prepare({**prepare_inputs, "head_only": np.array([True])})
        # A long text comes back as segments (core.segments): generated one after the
        # other, each with the previous one's codes as context, and streamed back to
        # back through one decoder, so the joins between segments are chunk joins.
        chain = SegmentChain.from_prepared(prepared)
        rest = self._prepare_rest(prepare_inputs, prepared)
        try:
            if rest is not None:
                chain.rest = lambda: rest.result()
            chain.chained = continue_from is not None
            if tail is not None:
                chain.continue_from(tail)
            request_max_frames = validation.sampling_from_inputs(sampling).max_frames
            decoder = StreamDecoder(
                self.decode, self.left_context_frames, history=None if tail is None else tail.decoder_history
            )

            def generate(index: int, lm_inputs: Arrays) -> tuple[np.ndarray, str | None] | None:
                lm_inputs = {
                    **lm_inputs,
                    "first_chunk_frames": np.array([self.first_chunk_frames], np.int32),
                    "chunk_frames": np.array([self.chunk_frames], np.int32),
                }
                # Segment 0 keeps the stream's id (csm_lm's request id, named by a cancel).
                segment_id = stream_id if index == 0 else f"{stream_id}-{index}"
                return self._stream_segment(lm_inputs, segment_id, decoder, sender)

            # A client that left between segments starts no other.
            if not chain.speak(sampling, request_max_frames, generate, stop=sender.is_cancelled):
                return None
            try:  # counted in the metrics; a failure there is no reason to fail the stream
                self.segments_ended(chain.finish_reasons())
            except Exception as error:  # noqa: BLE001
                self.log_error(f"csm_tts_stream: could not count the segments of {stream_id}: {error}")
            final = {"AUDIO": np.zeros(0, np.float32), "SAMPLE_RATE": SAMPLE_RATE, **chain.final_outputs()}
            if "normalized_text" in prepared:  # each segment as spoken (csm_prepare's normalization)
                spoken = [prepared["normalized_text"]]
                if rest is not None and rest.done() and rest.exception() is None:
                    spoken.append(rest.result()["normalized_text"])
                final["NORMALIZED_TEXT"] = np.concatenate([np.asarray(t, dtype=object).reshape(-1) for t in spoken])
            if continue_from is not None:
                tail_id = self.continuations.put(chain.tail(decoder.history))
                final["CONTINUATION"] = np.array([tail_id.encode()], dtype=object)
            return final
        finally:
            # The rest's csm_prepare call must not outlive this request: once the request
            # has ended, a server that stops unloads this model, and a BLS answer reaching
            # an unloaded model aborts Triton 2.51 (see calls.STOP_DRAIN_S).
            if rest is not None and not rest.cancel():  # one not started yet is dropped
                futures.wait([rest], timeout=REST_WAIT_S)

    def _prepare_rest(self, prepare_inputs: Arrays, head: Arrays):
        """The rest of a long text's segments, asked for now (a Future), or None."""
        pieces = head.get("rest_pieces", ())
        spoken = head.get("rest_spoken_pieces", ())
        if not len(pieces) and not len(spoken):
            return None
        # What the rest's segments depend on: not the voice's or the context's audio.
        rest_inputs = {
            **{name: value for name, value in prepare_inputs.items() if name in REST_INPUTS},
            "pieces": np.asarray(pieces, dtype=object),
            "spoken_pieces": np.asarray(spoken, dtype=object),
            "budget_every_segment": np.array([True]),
        }
        return self.rest_workers.submit(self.prepare, rest_inputs)

    def _stream_segment(
        self, lm_inputs: Arrays, stream_id: str, decoder: StreamDecoder, sender: ResponseSender
    ) -> tuple[np.ndarray, str | None] | None:
        """One generation streamed to `sender`: its codes and finish reason, or None when
        the client left."""
        chunks = iter(self.generate(lm_inputs, stream_id))
        generated: list[np.ndarray] = []
        exhausted = False
        reason = None
        try:
            # Checked before each pull (a pull waits for the next chunk to be generated)
            # and after it (no decoding for a client that left meanwhile).
            while not sender.is_cancelled():
                try:
                    codes = next(chunks)
                except StopIteration as stop:  # the generator's return value: csm_lm's reason
                    exhausted, reason = True, stop.value
                    break
                except Exception as error:
                    # A failure csm_lm told on its final response ended the generation: a
                    # cancel would only be one more call (to a stub that may be exiting).
                    exhausted = getattr(error, "generation_ended", False)
                    raise
                if sender.is_cancelled():
                    break
                generated.append(np.asarray(codes))
                sender.send({"AUDIO": self.watermark(decoder.push(codes)), "SAMPLE_RATE": SAMPLE_RATE})
        finally:
            if not exhausted:
                self._stop_generation(chunks, stream_id)
        if not exhausted:
            return None
        codes = np.concatenate(generated) if generated else np.zeros((0, C.NUM_CODEBOOKS), np.int64)
        return codes, reason

    def _stop_generation(self, chunks: Iterator[np.ndarray], stream_id: str) -> None:
        """Best effort: a failure here must not hide the stream's own outcome; the LM's
        frame cap ends a generation that could not be cancelled."""
        try:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        except Exception as error:  # noqa: BLE001
            self.log_error(f"csm_tts_stream: could not close the code stream of {stream_id}: {error}")
        try:
            self.cancel_generation(stream_id)
        except Exception as error:  # noqa: BLE001
            self.log_error(f"csm_tts_stream: could not cancel {stream_id}: {error}")

    def _end(
        self, sender: ResponseSender, stream_id: str, error: BaseException | None, final: Arrays | None = None
    ) -> None:
        # One attempt only: a final call that raised (client gone) may have reached the
        # client or not, and a second final would break the protocol if it had.
        try:
            if error is None:
                if final is None:
                    sender.finish()
                else:
                    sender.finish(final)
            else:
                sender.fail(error)
        except Exception as final_error:  # noqa: BLE001
            self.log_error(f"csm_tts_stream: could not end {stream_id}: {final_error}")
