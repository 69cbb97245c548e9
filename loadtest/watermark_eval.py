"""How well watermark_detect's decision separates marked speech from everything else.

    python -m loadtest.watermark_eval [--quick] [--seed 0] [--out loadtest/results]

Builds a clean corpus at run time (espeak-ng speech in many languages, voices and
rates; tones, chords, chirps, noise colours, clicks, music-like synthesis, hiss, hum;
all 24 kHz, 2-6 s), marks the speech with `Watermarker.apply` as the `watermark` model
marks csm_tts output, puts every clip through each transform a clip meets on its way
to a checker (resampling to 16 kHz and back, +-6 dB, white noise at 20 dB SNR, MP3 and
Opus at 64 kbit/s, trimming to 2 s), and scores it with `WatermarkDetector` — the
same code watermark_detect runs. Writes the ROC points, the FPR/TPR table at the
served threshold, the threshold this corpus alone would pick, the corpus composition,
the machine, the commit and the command to `watermark_eval.{md,json,png}`.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csm_triton import constants as C
from csm_triton.core.audio import read_audio_file, resample

SR = C.SAMPLE_RATE

# --- the clean corpus -----------------------------------------------------------------

# Two sentences per language, long enough for 6 s at the fastest rate.
SENTENCES = {
    "en-us": "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun. "
    "Please call Stella and ask her to bring these things with her from the store.",
    "en-gb": "She sells sea shells by the sea shore, and the shells she sells are surely sea shells. "
    "A large rose-tree stood near the entrance of the garden.",
    "en-gb-scotland": "It was a bright cold day in April, and the clocks were striking thirteen. "
    "Nobody expected the weather to turn so quickly over the hills.",
    "de": "Der schnelle braune Fuchs springt über den faulen Hund und läuft dann in den Wald. "
    "Morgen fahren wir mit dem Zug nach Berlin und besuchen unsere Freunde.",
    "fr-fr": "Le vif renard brun saute par-dessus le chien paresseux, puis disparaît dans la forêt. "
    "Demain matin, nous irons au marché acheter du pain et des fruits.",
    "es": "El veloz murciélago hindú comía feliz cardillo y kiwi, mientras la cigüeña tocaba el saxofón. "
    "Mañana iremos a la playa si el tiempo lo permite.",
    "it": "Quel vituperabile xenofobo zelante assaggia il whisky ed esclama alleluja. "
    "Domani andremo in montagna a camminare tra i boschi.",
    "pt-br": "Um pequeno jabuti xereta viu dez cegonhas felizes voando sobre o rio. "
    "Amanhã vamos visitar a nossa avó no interior.",
    "nl": "De snelle bruine vos springt over de luie hond en rent dan het bos in. "
    "Morgen gaan we met de fiets naar het strand.",
    "pl": "Pchnąć w tę łódź jeża lub ośm skrzyń fig, a potem odpocząć nad rzeką. "
    "Jutro pojedziemy pociągiem do Krakowa.",
    "ru": "Съешь же ещё этих мягких французских булок да выпей чаю. Завтра мы поедем за город и будем гулять в лесу.",
    "cs": "Příliš žluťoučký kůň úpěl ďábelské ódy a pak odběhl do lesa. "
    "Zítra pojedeme vlakem do Prahy navštívit přátele.",
    "sv": "Flygande bäckasiner söka hwila på mjuka tuvor, sedan flyger de vidare. "
    "I morgon ska vi åka till skärgården med båten.",
    "fi": "Törkylempijävongahdus on suomen kielen pangrammi, jota harva osaa lausua. "
    "Huomenna menemme mökille saunomaan ja uimaan.",
    "tr": "Pijamalı hasta yağız şoföre çabucak güvendi ve yola çıktılar. "
    "Yarın sabah erkenden deniz kenarına gideceğiz.",
    "hi": "मैं हिंदी बोल सकता हूँ और मुझे यह भाषा बहुत पसंद है। कल हम बाज़ार जाएँगे और ताज़ी सब्ज़ियाँ खरीदेंगे।",
    "cmn": "我们明天早上去公园散步，然后一起吃午饭。今天的天气非常好，阳光明媚，适合出去玩。",
    "el": "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία και μετά πηγαίνω στη θάλασσα. Αύριο θα πάμε στο βουνό με τους φίλους μας.",
    "hu": "Árvíztűrő tükörfúrógép, ezt minden magyar gyerek ismeri. Holnap elmegyünk a Balatonra fürödni.",
    "vi": "Tôi yêu tiếng Việt vì nó rất hay và giàu cảm xúc. Ngày mai chúng ta sẽ đi chợ mua rau và trái cây.",
}
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "croak")
RATES_WPM = (120, 165, 210, 250)


@dataclass(frozen=True)
class Clip:
    kind: str  # speech, tone, chord, chirp, noise, click, music, hiss, hum
    name: str
    audio: np.ndarray  # float32 [samples] at 24 kHz


class CorpusError(RuntimeError):
    """A tool the corpus needs (espeak-ng) is missing or failed."""


def espeak(text: str, voice: str, rate_wpm: int, pitch: int, folder: Path) -> np.ndarray:
    """espeak-ng speech at 24 kHz (it speaks at 22.05 kHz)."""
    if shutil.which("espeak-ng") is None:
        raise CorpusError("espeak-ng is missing: apt-get install -y espeak-ng (make setup-test installs it)")
    wav = folder / "speech.wav"
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(rate_wpm), "-p", str(pitch), "-w", str(wav), text],
        check=True,
        capture_output=True,
        timeout=60,
    )
    samples, rate = read_audio_file(wav)
    return resample(samples, rate, SR)


def _seconds(rng: np.random.Generator, low: float = 2.0, high: float = 6.0) -> float:
    return float(rng.uniform(low, high))


def _time(seconds: float) -> np.ndarray:
    return np.arange(int(seconds * SR)) / SR


def _level(audio: np.ndarray, rng: np.random.Generator, low_db: float = -30.0, high_db: float = -6.0) -> np.ndarray:
    """Scaled to a random peak between low_db and high_db dBFS."""
    peak = float(np.max(np.abs(audio))) or 1.0
    return (audio / peak * 10 ** (rng.uniform(low_db, high_db) / 20)).astype(np.float32)


def _fade(audio: np.ndarray, seconds: float = 0.01) -> np.ndarray:
    ramp = min(int(seconds * SR), audio.size // 2)
    if ramp:
        window = np.linspace(0.0, 1.0, ramp)
        audio = audio.copy()
        audio[:ramp] *= window
        audio[-ramp:] *= window[::-1]
    return audio


def _wave(shape: str, phase: np.ndarray) -> np.ndarray:
    """phase in cycles."""
    if shape == "sine":
        return np.sin(2 * np.pi * phase)
    if shape == "square":
        return np.sign(np.sin(2 * np.pi * phase))
    if shape == "saw":
        return 2 * (phase % 1.0) - 1
    return 2 * np.abs(2 * (phase % 1.0) - 1) - 1  # triangle


def _coloured_noise(rng: np.random.Generator, samples: int, exponent: float) -> np.ndarray:
    """Noise whose power falls as f^-exponent (0 white, 1 pink, 2 brown, -1 blue)."""
    spectrum = np.fft.rfft(rng.standard_normal(samples))
    freqs = np.fft.rfftfreq(samples, 1 / SR)
    freqs[0] = freqs[1]
    spectrum *= freqs ** (-exponent / 2)
    return np.fft.irfft(spectrum, samples)


def speech_clips(rng: np.random.Generator, count: int, folder: Path) -> list[Clip]:
    languages = sorted(SENTENCES)
    clips = []
    for index in range(count):
        language = languages[index % len(languages)]
        variant = VARIANTS[int(rng.integers(len(VARIANTS)))]
        rate = RATES_WPM[(index // len(languages)) % len(RATES_WPM)]
        pitch = int(rng.integers(25, 75))
        audio = espeak(SENTENCES[language], f"{language}+{variant}", rate, pitch, folder)
        start = int(rng.integers(0, max(1, audio.size - 6 * SR) // 2 + 1))
        audio = audio[start : start + int(_seconds(rng) * SR)]
        # espeak-ng speaks at full scale; a TTS service's output peaks lower, and +6 dB
        # should clip some clips, not all.
        audio = _level(audio, rng, -12.0, -2.0)
        clips.append(Clip("speech", f"{language}+{variant} {rate}wpm p{pitch}", audio))
    return clips


def tone_clips(rng: np.random.Generator, count: int) -> list[Clip]:
    clips = []
    freqs = np.geomspace(50, 8000, count)
    for index, freq in enumerate(freqs):
        shape = ("sine", "sine", "square", "saw", "triangle")[index % 5]
        t = _time(_seconds(rng))
        audio = _fade(_level(_wave(shape, freq * t + rng.random()), rng))
        clips.append(Clip("tone", f"{shape} {freq:.0f} Hz", audio))
    return clips


def chord_clips(rng: np.random.Generator, count: int) -> list[Clip]:
    clips = []
    for index in range(count):
        t = _time(_seconds(rng))
        if index == 0:
            freqs = [110.0, 220.0]  # the two mixed tones
        elif index % 3 == 1:  # a major or minor triad, maybe with its octave
            root = 55 * 2 ** (rng.integers(0, 48) / 12)
            steps = [0, 4 if rng.random() < 0.5 else 3, 7] + ([12] if rng.random() < 0.5 else [])
            freqs = [root * 2 ** (s / 12) for s in steps]
        else:  # any 2-5 tones
            freqs = list(np.exp(rng.uniform(np.log(50), np.log(8000), int(rng.integers(2, 6)))))
        audio = sum(rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * (f * t + rng.random())) for f in freqs)
        clips.append(Clip("chord", "+".join(f"{f:.0f}" for f in freqs) + " Hz", _fade(_level(audio, rng))))
    return clips


def chirp_clips(rng: np.random.Generator, count: int) -> list[Clip]:
    clips = []
    for index in range(count):
        seconds = _seconds(rng)
        t = _time(seconds)
        style = ("linear", "log", "vibrato", "siren")[index % 4]
        low, high = sorted(np.exp(rng.uniform(np.log(50), np.log(8000), 2)))
        if rng.random() < 0.5:
            low, high = high, low  # downward
        if style == "linear":
            phase = low * t + (high - low) * t**2 / (2 * seconds)
        elif style == "log":
            k = (high / low) ** (1 / seconds)
            phase = low * (k**t - 1) / np.log(k)
        elif style == "vibrato":  # a held note with 4-7 Hz vibrato, like a voice's
            centre, rate, depth = float(np.sqrt(low * high)), rng.uniform(4, 7), rng.uniform(0.01, 0.06)
            phase = centre * t - centre * depth / (2 * np.pi * rate) * np.cos(2 * np.pi * rate * t)
        else:  # siren: pitch swings back and forth
            centre, rate = float(np.sqrt(low * high)), rng.uniform(0.3, 3)
            depth = min(0.5, abs(np.log(high / low)) / 2)
            phase = np.cumsum(centre * np.exp(depth * np.sin(2 * np.pi * rate * t))) / SR
        clips.append(Clip("chirp", f"{style} {low:.0f}->{high:.0f} Hz", _fade(_level(np.sin(2 * np.pi * phase), rng))))
    return clips


def noise_clips(rng: np.random.Generator, count: int) -> list[Clip]:
    colours = {"white": 0.0, "pink": 1.0, "brown": 2.0, "blue": -1.0}
    clips = []
    for index in range(count):
        colour = list(colours)[index % len(colours)]
        samples = int(_seconds(rng) * SR)
        audio = _coloured_noise(rng, samples, colours[colour])
        if index % 5 == 4:  # noise in bursts (rain on a window, a fan switching)
            gate = np.repeat(rng.random(samples // 2400 + 1) < 0.5, 2400)[:samples]
            audio = audio * gate
        clips.append(Clip("noise", f"{colour}{' bursts' if index % 5 == 4 else ''}", _fade(_level(audio, rng))))
    return clips


def click_clips(rng: np.random.Generator, count: int) -> list[Clip]:
    clips = []
    for index in range(count):
        samples = int(_seconds(rng) * SR)
        audio = np.zeros(samples)
        if index % 3 == 2:  # random (Geiger counter, crackle)
            rate = rng.uniform(2, 60)
            positions = np.flatnonzero(rng.random(samples) < rate / SR)
            label = f"random {rate:.0f}/s"
        else:  # a metronome / clock tick
            rate = rng.uniform(0.5, 20)
            positions = (np.arange(0, samples / SR, 1 / rate) * SR).astype(int)
            label = f"regular {rate:.1f}/s"
        width = int(rng.integers(1, 48))
        pulse = np.hanning(width + 2)[1:-1] * (rng.choice([-1, 1]) if index % 2 else 1)
        for position in positions:
            end = min(samples, position + width)
            audio[position:end] += pulse[: end - position]
        clips.append(Clip("click", f"{label}, {width} samples", _level(audio, rng, -20, -1)))
    return clips


def _note(freq: float, seconds: float, rng: np.random.Generator, timbre: str) -> np.ndarray:
    t = _time(seconds)
    if timbre == "pluck":  # decaying harmonics (guitar, piano-ish)
        audio = sum(np.sin(2 * np.pi * k * freq * t) * np.exp(-t * (3 + 2 * k)) / k for k in range(1, 8))
    elif timbre == "organ":
        audio = sum(np.sin(2 * np.pi * k * freq * t) / k for k in (1, 2, 3, 4, 6, 8))
        audio = audio * np.minimum(1, t / 0.02) * np.minimum(1, (seconds - t) / 0.05)
    elif timbre == "bell":  # FM
        audio = np.sin(2 * np.pi * freq * t + 3 * np.exp(-2 * t) * np.sin(2 * np.pi * 1.4 * freq * t)) * np.exp(-3 * t)
    else:  # "bowed": harmonics with vibrato and a slow attack
        vibrato = 0.01 * np.sin(2 * np.pi * 5.5 * t)
        phase = np.cumsum(freq * (1 + vibrato)) / SR
        audio = sum(np.sin(2 * np.pi * k * phase) / k**1.5 for k in range(1, 10))
        audio = audio * np.minimum(1, t / 0.15) * np.minimum(1, (seconds - t) / 0.1)
    return audio


def _drum(kind: str, rng: np.random.Generator) -> np.ndarray:
    t = _time(0.25)
    if kind == "kick":
        return np.sin(2 * np.pi * np.cumsum(50 + 120 * np.exp(-t * 30)) / SR) * np.exp(-t * 12)
    if kind == "snare":
        return (rng.standard_normal(t.size) * 0.7 + np.sin(2 * np.pi * 190 * t)) * np.exp(-t * 25)
    return np.diff(rng.standard_normal(t.size + 1)) * np.exp(-t * 60)  # hat


def music_clips(rng: np.random.Generator, count: int) -> list[Clip]:
    clips = []
    timbres = ("pluck", "organ", "bell", "bowed")
    for index in range(count):
        seconds = _seconds(rng)
        samples = int(seconds * SR)
        audio = np.zeros(samples + SR)
        style = ("melody", "chords", "drums", "band")[index % 4]
        tempo = rng.uniform(70, 180)  # beats per minute
        beat = 60 / tempo
        timbre = timbres[int(rng.integers(len(timbres)))]
        root = 110 * 2 ** (rng.integers(-12, 13) / 12)
        scale = np.array([0, 2, 4, 5, 7, 9, 11, 12])
        position = 0.0
        while position < seconds:
            start = int(position * SR)
            if style in ("melody", "band"):
                length = beat * rng.choice([0.5, 1, 1, 2])
                note = _note(root * 2 ** (rng.choice(scale) / 12 + 1), length, rng, timbre)
                audio[start : start + note.size] += note[: audio.size - start]
            if style == "chords" or (style == "band" and int(position / beat) % 4 == 0):
                length = beat * (4 if style == "band" else 2)
                chord_root = root * 2 ** (rng.choice([0, 5, 7, 9]) / 12)
                for step in (0, 4, 7):
                    note = 0.5 * _note(chord_root * 2 ** (step / 12), length, rng, timbre)
                    audio[start : start + note.size] += note[: audio.size - start]
            if style in ("drums", "band"):
                for offset, kind in ((0.0, "kick"), (0.5, "hat"), (1.0, "snare"), (1.5, "hat")):
                    hit = int((position + offset * beat) * SR)
                    if hit < samples:
                        drum = _drum(kind, rng)
                        audio[hit : hit + drum.size] += drum[: audio.size - hit]
            position += {"melody": 0, "chords": beat * 2, "drums": beat * 2, "band": 0}[style] or length
        clips.append(Clip("music", f"{style} {timbre} {tempo:.0f} bpm", _fade(_level(audio[:samples], rng, -20, -3))))
    return clips


def hiss_clips(rng: np.random.Generator, count: int) -> list[Clip]:
    clips = []
    for index in range(count):
        samples = int(_seconds(rng) * SR)
        audio = _coloured_noise(rng, samples, 0.0)
        if index % 2:  # tape hiss: the highs only
            spectrum = np.fft.rfft(audio)
            spectrum[np.fft.rfftfreq(samples, 1 / SR) < 3000] *= 0.05
            audio = np.fft.irfft(spectrum, samples)
        rms_db = rng.uniform(-65, -35)
        audio = audio / np.sqrt(np.mean(audio**2)) * 10 ** (rms_db / 20)
        clips.append(
            Clip("hiss", f"{'tape' if index % 2 else 'white'} {rms_db:.0f} dBFS rms", audio.astype(np.float32))
        )
    return clips


def hum_clips(rng: np.random.Generator, count: int) -> list[Clip]:
    clips = []
    for index in range(count):
        mains = (50.0, 60.0)[index % 2]
        t = _time(_seconds(rng))
        audio = sum(rng.uniform(0.1, 1) / k * np.sin(2 * np.pi * k * mains * t + rng.random() * 6) for k in range(1, 8))
        audio = audio + 0.05 * _coloured_noise(rng, t.size, 1.0) / 10
        clips.append(Clip("hum", f"{mains:.0f} Hz mains hum", _fade(_level(audio, rng, -40, -10))))
    return clips


# Clips per kind: the full corpus (>= 200 clean clips) and --quick.
COMPOSITION = {
    "full": {
        "speech": 120,
        "tone": 30,
        "chord": 20,
        "chirp": 20,
        "noise": 24,
        "click": 15,
        "music": 28,
        "hiss": 12,
        "hum": 6,
    },
    "quick": {"speech": 8, "tone": 3, "chord": 2, "chirp": 2, "noise": 3, "click": 2, "music": 3, "hiss": 1, "hum": 1},
}


def build_corpus(composition: dict[str, int], seed: int) -> list[Clip]:
    """The clean corpus: every clip float32, 24 kHz, 2-6 s, deterministic given the seed."""
    rng = np.random.default_rng(seed)
    makers = {
        "tone": tone_clips,
        "chord": chord_clips,
        "chirp": chirp_clips,
        "noise": noise_clips,
        "click": click_clips,
        "music": music_clips,
        "hiss": hiss_clips,
        "hum": hum_clips,
    }
    clips = []
    with tempfile.TemporaryDirectory() as folder:
        clips += speech_clips(rng, composition.get("speech", 0), Path(folder))
    for kind, maker in makers.items():
        clips += maker(rng, composition.get(kind, 0))
    return clips


# --- what a clip meets on its way to a checker -------------------------------------------

# libsndfile maps a compression level in [0, 1] to a bitrate; these give 64 kbit/s at
# 24 kHz mono (MP3: MPEG-2 layer III, constant bitrate; Opus: its target bitrate is
# 6 + (1 - level) * 250 kbit/s). The report carries the bitrate actually measured.
MP3_64K_LEVEL = 0.6
OPUS_64K_LEVEL = 1 - (64_000 - 6_000) / 250_000
TRIM_SECONDS = 2.0
NOISE_SNR_DB = 20.0


def encoded(audio: np.ndarray, codec: str) -> tuple[np.ndarray, int]:
    """Through an MP3 or Ogg/Opus file at 64 kbit/s and back: (samples, bits in the file)."""
    import soundfile

    buffer = io.BytesIO()
    if codec == "mp3":
        soundfile.write(
            buffer,
            audio,
            SR,
            format="MP3",
            subtype="MPEG_LAYER_III",
            compression_level=MP3_64K_LEVEL,
            bitrate_mode="CONSTANT",
        )
    else:
        soundfile.write(buffer, audio, SR, format="OGG", subtype="OPUS", compression_level=OPUS_64K_LEVEL)
    bits = len(buffer.getvalue()) * 8
    buffer.seek(0)
    decoded, rate = soundfile.read(buffer, dtype="float32")
    decoded = resample(decoded, rate, SR)
    # Keep the clip's length (MP3 frames pad the end) so trims and SNRs line up.
    decoded = decoded[: audio.size] if decoded.size >= audio.size else np.pad(decoded, (0, audio.size - decoded.size))
    return np.ascontiguousarray(decoded, dtype=np.float32), bits


def transform(audio: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """`audio` (24 kHz float32) after transform `name`, still 24 kHz float32 in [-1, 1]."""
    if name == "none":
        return audio
    if name == "resample 16 kHz":
        return resample(resample(audio, SR, 16_000), 16_000, SR)
    if name in ("+6 dB", "-6 dB"):
        gain = 10 ** ((6.0 if name == "+6 dB" else -6.0) / 20)
        return np.clip(audio * gain, -1.0, 1.0).astype(np.float32)  # a file clips at full scale
    if name == "white noise 20 dB SNR":
        power = float(np.mean(np.square(audio, dtype=np.float64)))
        noise = rng.standard_normal(audio.size) * np.sqrt(power / 10 ** (NOISE_SNR_DB / 10))
        return np.clip(audio + noise, -1.0, 1.0).astype(np.float32)
    if name in ("mp3 64 kbit/s", "opus 64 kbit/s"):
        return encoded(audio, name.split()[0])[0]
    if name == "trim to 2 s":
        length = int(TRIM_SECONDS * SR)
        start = int(rng.integers(0, max(0, audio.size - length) + 1))
        return audio[start : start + length]
    raise ValueError(f"unknown transform {name!r}")


TRANSFORMS = (
    "none",
    "resample 16 kHz",
    "+6 dB",
    "-6 dB",
    "white noise 20 dB SNR",
    "mp3 64 kbit/s",
    "opus 64 kbit/s",
    "trim to 2 s",
)


# --- the evaluation ------------------------------------------------------------------------

MAX_FPR = 0.01  # the target the threshold is calibrated to, under every transform
MIN_TPR = 0.99
ROC_THRESHOLDS = np.round(np.linspace(0.0, 1.0, 101), 2)


@dataclass
class Scored:
    kind: str
    name: str
    marked: bool
    transform: str
    score: float  # SCORE
    watermarked: bool  # WATERMARKED
    confidence: float  # Perth alone (after the noise floor), before the gate
    judgeable: bool


def _rate(flags: list[bool]) -> float:
    return float(np.mean(flags)) if flags else float("nan")


def evaluate(corpus: list[Clip], watermarker, seed: int, log=print) -> dict:
    """Every clean clip and every marked speech clip, under every transform."""
    marked = [Clip(c.kind, c.name, watermarker.apply(c.audio)) for c in corpus if c.kind == "speech"]
    items = [(clip, False) for clip in corpus] + [(clip, True) for clip in marked]
    scored: list[Scored] = []
    codec_bits: dict[str, list[float]] = {}
    for t_index, name in enumerate(TRANSFORMS):
        started = time.perf_counter()
        for index, (clip, is_marked) in enumerate(items):
            rng = np.random.default_rng([seed, t_index, index])
            if name in ("mp3 64 kbit/s", "opus 64 kbit/s"):
                audio, bits = encoded(clip.audio, name.split()[0])
                codec_bits.setdefault(name, []).append(bits / (clip.audio.size / SR) / 1000)
            else:
                audio = transform(clip.audio, name, rng)
            detection = watermarker.detect(audio, SR)
            scored.append(
                Scored(
                    clip.kind,
                    clip.name,
                    is_marked,
                    name,
                    detection.score,
                    detection.watermarked,
                    detection.confidence,
                    bool(detection.profile and detection.profile.judgeable),
                )
            )
        log(f"  {name}: {len(items)} clips in {time.perf_counter() - started:.1f} s")
    return {
        "scored": scored,
        "marked_clips": len(marked),
        "bitrate_kbps": {k: round(float(np.mean(v)), 1) for k, v in codec_bits.items()},
    }


def summarise(scored: list[Scored], threshold: float) -> list[dict]:
    rows = []
    for name in TRANSFORMS:
        clean = [s for s in scored if s.transform == name and not s.marked]
        marked = [s for s in scored if s.transform == name and s.marked]
        rows.append(
            {
                "transform": name,
                "fpr": _rate([s.score >= threshold for s in clean]),
                "tpr": _rate([s.score >= threshold for s in marked]),
                "perth_alone_fpr": _rate([s.confidence >= threshold for s in clean]),
                "perth_alone_tpr": _rate([s.confidence >= threshold for s in marked]),
                "clean_clips": len(clean),
                "marked_clips": len(marked),
                "false_positives": [f"{s.kind}: {s.name} ({s.score:.2f})" for s in clean if s.score >= threshold],
                "misses": [f"{s.name} ({s.score:.2f})" for s in marked if s.score < threshold],
                "marked_not_judged": sum(not s.judgeable for s in marked),
            }
        )
    return rows


def roc(scored: list[Scored]) -> dict[str, list[list[float]]]:
    """[threshold, FPR, TPR] per transform and pooled over all of them."""
    curves = {}
    for name in (*TRANSFORMS, "all"):
        subset = [s for s in scored if name in ("all", s.transform)]
        clean = np.array([s.score for s in subset if not s.marked])
        marked = np.array([s.score for s in subset if s.marked])
        curves[name] = [
            [float(t), round(float(np.mean(clean >= t)), 5), round(float(np.mean(marked >= t)), 5)]
            for t in ROC_THRESHOLDS
        ]
    return curves


def calibrated_threshold(curves: dict[str, list[list[float]]]) -> float | None:
    """The lowest threshold whose FPR is <= MAX_FPR under every transform."""
    for index, threshold in enumerate(ROC_THRESHOLDS):
        if all(curves[name][index][1] <= MAX_FPR for name in TRANSFORMS):
            return float(threshold)
    return None


def run(quick: bool, seed: int, log=print) -> dict:
    import torch

    from csm_triton.core.watermark import Watermarker
    from loadtest.workload import commit, machine

    started = time.perf_counter()
    mode = "quick" if quick else "full"
    log(f"building the {mode} corpus (seed {seed})")
    corpus = build_corpus(COMPOSITION[mode], seed)
    watermarker = Watermarker("cpu")
    log(
        f"scoring {len(corpus)} clean clips and the marked speech under {len(TRANSFORMS)} transforms "
        f"({torch.get_num_threads()} torch threads)"
    )
    evaluation = evaluate(corpus, watermarker, seed, log)
    scored = evaluation["scored"]
    curves = roc(scored)
    calibrated = calibrated_threshold(curves)
    composition = {kind: sum(c.kind == kind for c in corpus) for kind in COMPOSITION[mode]}
    durations = [c.audio.size / SR for c in corpus]
    rows = summarise(scored, C.WATERMARK_THRESHOLD)
    return {
        "threshold": C.WATERMARK_THRESHOLD,
        "calibrated_threshold": calibrated,
        "calibrated": summarise(scored, calibrated) if calibrated is not None else None,
        "targets": {"max_fpr": MAX_FPR, "min_tpr": MIN_TPR},
        "rule": {
            "score": "Perth's confidence after the noise floor is removed if the clip is judgeable, else 0",
            "watermarked": "score >= threshold",
            "judgeable": f"speech-like (envelope std >= {C.WATERMARK_SPEECH_MIN_ENVELOPE_DB} dB, flatness spread >= {C.WATERMARK_SPEECH_MIN_FLATNESS_SPREAD}, rhythm < {C.WATERMARK_SPEECH_MAX_RHYTHM}) or "
            f"noise-like (mean flatness >= {C.WATERMARK_NOISE_MIN_FLATNESS})",
        },
        "table": rows,
        "roc": curves,
        "corpus": {
            "mode": mode,
            "seed": seed,
            "clean_clips": len(corpus),
            "composition": composition,
            "marked_clips": evaluation["marked_clips"],
            "seconds": [round(min(durations), 2), round(max(durations), 2)],
            "languages": len(SENTENCES),
            "voices": list(VARIANTS),
            "rates_wpm": list(RATES_WPM),
            "sample_rate": SR,
        },
        "codec_bitrate_kbps": evaluation["bitrate_kbps"],
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "commit": commit(),
        "command": " ".join(["python -m loadtest.watermark_eval", *map(shlex.quote, sys.argv[1:])]),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _percent(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.1f} %"


def markdown(report: dict) -> str:
    corpus = report["corpus"]
    lines = [
        "# Watermark detection: false and true positives per transform",
        "",
        f"- decision: `WATERMARKED = SCORE >= {report['threshold']}`; SCORE = "
        f"{report['rule']['score']}; judgeable = {report['rule']['judgeable']} (core/watermark.py)",
        f"- clean corpus ({corpus['mode']}, seed {corpus['seed']}): {corpus['clean_clips']} clips, "
        + ", ".join(f"{n} {k}" for k, n in corpus["composition"].items())
        + f"; {corpus['seconds'][0]}-{corpus['seconds'][1]} s at {corpus['sample_rate']} Hz; speech: espeak-ng in "
        f"{corpus['languages']} languages, voices {', '.join(corpus['voices'])}, {corpus['rates_wpm']} wpm",
        f"- marked: the {corpus['marked_clips']} speech clips through `Watermarker.apply` (as the `watermark` model "
        "marks csm_tts output)",
        "- codecs measured at " + ", ".join(f"{k}: {v} kbit/s" for k, v in report["codec_bitrate_kbps"].items()),
        f"- machine: {report['machine']}, {report['torch_threads']} torch thread(s); {report['seconds']} s",
        f"- commit `{report['commit']}`; command: `{report['command']}`",
        "",
        f"Targets: FPR <= {_percent(report['targets']['max_fpr'])}, TPR >= {_percent(report['targets']['min_tpr'])}. "
        "The rule's constants (src/csm_triton/constants.py) were chosen on the seed-0 corpus"
        + ("; this one is held out." if corpus["seed"] != 0 else "; this is that corpus."),
        "",
        "| transform | FPR | TPR | Perth alone: FPR | Perth alone: TPR | false positives | misses |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["table"]:
        lines.append(
            f"| {row['transform']} | {_percent(row['fpr'])} | {_percent(row['tpr'])} | "
            f"{_percent(row['perth_alone_fpr'])} | {_percent(row['perth_alone_tpr'])} | "
            f"{'; '.join(row['false_positives'][:4]) or '-'}{' ...' if len(row['false_positives']) > 4 else ''} | "
            f"{len(row['misses'])} |"
        )
    calibrated = report["calibrated_threshold"]
    lines += [
        "",
        f"This corpus alone would pick threshold {calibrated} (the lowest with FPR <= "
        f"{_percent(report['targets']['max_fpr'])} under every transform)."
        if calibrated is not None
        else "No threshold reaches the FPR target under every transform.",
    ]
    if report["calibrated"]:
        lines += [
            "At it: "
            + "; ".join(
                f"{r['transform']} FPR {_percent(r['fpr'])} TPR {_percent(r['tpr'])}" for r in report["calibrated"]
            )
            + "."
        ]
    lines += ["", "ROC points (threshold, FPR, TPR) for every transform are in watermark_eval.json (`roc`).", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(7, 5))
    for name, points in report["roc"].items():
        if name == "all":
            continue
        points = np.array(points)
        axis.plot(points[:, 1], points[:, 2], marker=".", markersize=3, label=name)
    axis.axvline(report["targets"]["max_fpr"], color="grey", linestyle=":", label="FPR 1 %")
    axis.set_xscale("symlog", linthresh=0.01)
    axis.set_xlim(0, 1)
    axis.set_xlabel("false-positive rate (clean clips)")
    axis.set_ylabel("true-positive rate (marked speech)")
    axis.set_title(f"watermark_detect SCORE, threshold {report['threshold']}")
    axis.legend(fontsize=8, loc="lower right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write(report: dict, out: Path, stem: str = "watermark_eval") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(markdown(report))
    if plot(report, out / f"{stem}.png"):
        paths.append(out / f"{stem}.png")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few clips of each kind (a test's end-to-end run)")
    parser.add_argument(
        "--seed", type=int, default=1, help="corpus seed (default 1; the rule's constants were chosen on seed 0)"
    )
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    report = run(args.quick, args.seed)
    for path in write(report, args.out, "watermark_eval_quick" if args.quick else "watermark_eval"):
        print(f"wrote {path}")
    for row in report["table"]:
        print(f"  {row['transform']:>22}: FPR {_percent(row['fpr']):>7}  TPR {_percent(row['tpr']):>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
