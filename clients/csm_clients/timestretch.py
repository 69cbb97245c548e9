"""`speed`: speech made faster or slower without changing its pitch.

FFmpeg's `atempo` filter, through PyAV's filter graphs (the FFmpeg bundled in PyAV's
wheel, which the gateway's encoders use for every format: no system FFmpeg). PyAV is the
client distribution's `speed` extra, imported only when a stretch is made (MissingExtra
names the extra when it is absent); check_speed and needs_stretch need nothing. It
is a WSOLA-class time-stretch (overlapping windows re-placed at the new tempo where the
waveforms line up best), so the voice keeps its pitch and formants; resampling would
shift them by the same factor. One atempo takes 0.5-2.0, so 0.25-0.5 and 2.0-4.0 chain
two, each taking the square root of the factor (both stages then work near the middle
of their range). The cost is linear in the audio's length: 1-3 ms of one core per
second of input on this project's CPUs, ~8 at 0.25, whose output is 4x as long
(loadtest/results/speed_cpu.md).

`TimeStretcher` is the streaming form: one filter graph per request, chunks pushed as
they are generated, `flush()` at the end, so the output is one continuous stretch
rather than chunks stretched apart (which would click at every seam). atempo works on
its own internal windows whatever the frames pushed, so the concatenated output of any
chunking is the same samples as one whole push; `stretch()` is that single push.

atempo holds back its last window or so at the end of the input (~30 ms per stage):
`flush()` pushes a little silence behind the audio so its real tail comes out, and the
total is then cut to round(input / speed) samples, so the duration is exact.

speed == 1.0 never reaches here: callers skip the filter (`needs_stretch`), so the
audio is bit-identical to what it was without a speed.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction

import numpy as np

from csm_clients.errors import InvalidRequest, import_extra

__all__ = ["MAX_SPEED", "MIN_SPEED", "TimeStretcher", "check_speed", "needs_stretch", "require_av", "stretch"]

MIN_SPEED, MAX_SPEED = 0.25, 4.0  # OpenAI's range for `speed`
_ATEMPO_MIN, _ATEMPO_MAX = 0.5, 2.0  # what one atempo filter takes
# Silence pushed behind the audio at the end so atempo's held-back window comes out:
# far more than the ~800 samples each stage keeps, at 4.0 too (two stages).
_TAIL_PAD_SECONDS = 0.25
# Input is pushed in frames of at most this many samples (40 ms at 24 kHz). atempo sizes
# each output frame from its input frame and sends it only once full, which takes the
# next input frame: pushed whole, a 960 ms chunk would come out only when the next chunk
# arrives. In 40 ms frames a stream holds back at most ~160 ms of output (480 ms at 0.25,
# whose output is 4x as long), for ~1 ms more CPU per second of audio.
_FRAME_SAMPLES = 960


def check_speed(value, field: str = "speed") -> float:
    """`value` as a float in [MIN_SPEED, MAX_SPEED]; InvalidRequest naming `field`
    otherwise (a bool, a string, NaN and infinities included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequest(f"{field}: must be a number, got {value!r}")
    speed = float(value)
    if not math.isfinite(speed) or not MIN_SPEED <= speed <= MAX_SPEED:
        raise InvalidRequest(f"{field}: must be in [{MIN_SPEED:g}, {MAX_SPEED:g}], got {value!r}")
    return speed


def needs_stretch(speed: float | None) -> bool:
    """Whether `speed` changes anything: None and 1.0 leave the audio untouched."""
    return speed is not None and speed != 1.0


def require_av():
    """PyAV, which a stretch needs; MissingExtra (naming the `speed` extra) without it.
    The CLI calls it before sending, so a missing extra costs no synthesis."""
    return import_extra("av", "speed", "speed (time-stretch)")


def _stages(speed: float) -> list[float]:
    if _ATEMPO_MIN <= speed <= _ATEMPO_MAX:
        return [speed]
    return [math.sqrt(speed)] * 2  # 0.25 -> 0.5 x 0.5, 4.0 -> 2.0 x 2.0


class TimeStretcher:
    """Float32 mono chunks at `sample_rate` in, the same speech at `speed` out.

    `push(chunk)` returns the stretched samples ready so far (often fewer than
    chunk / speed: atempo keeps a window back), `flush()` the rest; together they are
    round(total input / speed) samples."""

    def __init__(self, speed: float, sample_rate: int):
        self.speed = check_speed(speed)
        self.sample_rate = int(sample_rate)
        self._samples_in = 0
        self._samples_out = 0
        self._flushed = False
        av = self._av = require_av()
        self._graph = av.filter.Graph()
        node = self._source = self._graph.add_abuffer(
            format="flt", sample_rate=self.sample_rate, layout="mono", time_base=Fraction(1, self.sample_rate)
        )
        for tempo in _stages(self.speed):
            stage = self._graph.add("atempo", f"tempo={tempo!r}")
            node.link_to(stage)
            node = stage
        # Pins what comes out: mono float32 at the input's rate, whatever atempo prefers.
        pinned = self._graph.add("aformat", f"sample_fmts=flt:channel_layouts=mono:sample_rates={self.sample_rate}")
        node.link_to(pinned)
        self._sink = self._graph.add("abuffersink")
        pinned.link_to(self._sink)
        self._graph.configure()

    def push(self, samples: np.ndarray) -> np.ndarray:
        if self._flushed:
            raise ValueError("the stretcher is flushed")
        samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        if samples.size:
            self._send(samples)
            self._samples_in += samples.size
        return self._take(self._drain())

    def flush(self) -> np.ndarray:
        """The rest of the stretched audio; the stretcher takes nothing after it."""
        if self._flushed:
            return np.zeros(0, np.float32)
        self._flushed = True
        if self._samples_in == 0:
            return np.zeros(0, np.float32)
        self._send(np.zeros(int(_TAIL_PAD_SECONDS * self.sample_rate), np.float32))
        self._source.push(None)  # end of stream: atempo lets its window go
        tail = self._take(self._drain())
        short = self.expected_samples - self._samples_out
        if short > 0:  # not seen on any tested input (the pad covers it): never end early
            tail = np.concatenate([tail, np.zeros(short, np.float32)])
            self._samples_out += short
        return tail

    @property
    def expected_samples(self) -> int:
        """What the whole output holds once flushed: round(samples in / speed)."""
        return round(self._samples_in / self.speed)

    def _send(self, samples: np.ndarray) -> None:
        for start in range(0, samples.size, _FRAME_SAMPLES):
            frame = self._av.AudioFrame.from_ndarray(
                samples[None, start : start + _FRAME_SAMPLES], format="flt", layout="mono"
            )
            frame.sample_rate = self.sample_rate
            frame.time_base = Fraction(1, self.sample_rate)
            frame.pts = self._samples_in + start
            self._source.push(frame)

    def _drain(self) -> np.ndarray:
        parts = []
        while True:
            try:
                frame = self._sink.pull()
            except (self._av.BlockingIOError, self._av.EOFError):
                break
            parts.append(frame.to_ndarray().reshape(-1))
        return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)

    def _take(self, samples: np.ndarray) -> np.ndarray:
        """Samples up to the expected total (the pad's stretched silence is cut off)."""
        room = self.expected_samples - self._samples_out if self._flushed else samples.size
        samples = samples[: max(0, room)]
        self._samples_out += samples.size
        return samples


def stretch(samples: np.ndarray, sample_rate: int, speed: float) -> np.ndarray:
    """A whole clip at `speed` (the same samples a TimeStretcher gives, pushed in one go);
    speed 1.0 returns `samples` itself, untouched."""
    if not needs_stretch(check_speed(speed)):
        return samples
    stretcher = TimeStretcher(speed, sample_rate)
    head = stretcher.push(samples)
    return np.concatenate([head, stretcher.flush()])
