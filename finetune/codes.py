"""Each clip encoded once by the checkpoint's own Mimi, cached on disk.

The cache key is the clip's source bytes (sha256) and the codec's weights (sha256 of
every Mimi tensor in name order), so a second run over the same data starts training at
once, and a different codec never reuses stale codes. Files are written atomically: a
killed run leaves either a whole entry or none.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch

from csm_triton import constants as C
from csm_triton.core.files import atomic_write

# Clips of similar length are encoded together. Each clip is first zero-padded to whole
# frames (1920 samples): then more zeros on the right leave its codes unchanged (Mimi's
# encoder is causal), so a batch gives exactly what each padded clip gives alone. Without
# that, the last, partial frame depends on the padding: Mimi's convs pad every layer's
# activations with zeros, where batch padding leaves biased activations (measured: the
# last frame differs, every earlier one is equal).
ENCODE_BATCH_SIZE = 8
# Part of the cache folder's name: entries made under another padding rule are not reused.
CACHE_FORMAT = "v1-frame-aligned"


def codec_sha256(codec: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(codec.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def frame_aligned(audio: np.ndarray) -> np.ndarray:
    """`audio` zero-padded to whole frames: the input whose codes the cache holds."""
    padded = np.zeros(encoded_frames(audio.size) * C.SAMPLES_PER_FRAME, dtype=np.float32)
    padded[: audio.size] = audio
    return padded


def encoded_frames(samples: int) -> int:
    """Frames Mimi gives for `samples` at 24 kHz: ceil(samples / 1920), what CsmProcessor counts."""
    return -(-samples // C.SAMPLES_PER_FRAME)


class CodeCache:
    def __init__(self, folder: str | Path, codec: torch.nn.Module):
        self.codec = codec.eval()
        self.codec_sha256 = codec_sha256(codec)
        self.folder = Path(folder).expanduser() / f"{self.codec_sha256[:16]}-{CACHE_FORMAT}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def _path(self, audio_sha256: str) -> Path:
        return self.folder / f"{audio_sha256}.npy"

    def _read(self, path: Path) -> np.ndarray | None:
        try:
            codes = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None  # absent or damaged: encoded again
        return codes if codes.ndim == 2 and codes.shape[1] == C.NUM_CODEBOOKS else None

    @torch.no_grad()
    def _encode(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        longest = max(encoded_frames(audio.size) for audio in batch) * C.SAMPLES_PER_FRAME
        values = torch.zeros(len(batch), 1, longest)
        for row, audio in enumerate(batch):
            values[row, 0, : audio.size] = torch.from_numpy(audio)
        codes = self.codec.encode(values).audio_codes  # [batch, 32, frames]
        return [
            codes[row, :, : encoded_frames(audio.size)].T.contiguous().numpy().astype(np.int16)
            for row, audio in enumerate(batch)
        ]

    def codes_for(self, clips, *, progress=None) -> list[np.ndarray]:
        """[frames, 32] int16 codes for each clip, in order."""
        result: list[np.ndarray | None] = [None] * len(clips)
        todo = []
        for index, clip in enumerate(clips):
            cached = self._read(self._path(clip.audio_sha256))
            if cached is not None and cached.shape[0] == encoded_frames(clip.audio.size):
                result[index] = cached
                self.hits += 1
            else:
                todo.append(index)
        todo.sort(key=lambda i: clips[i].audio.size)
        for start in range(0, len(todo), ENCODE_BATCH_SIZE):
            chunk = todo[start : start + ENCODE_BATCH_SIZE]
            for index, codes in zip(chunk, self._encode([clips[i].audio for i in chunk])):
                buffer = io.BytesIO()
                np.save(buffer, codes, allow_pickle=False)
                with atomic_write(self._path(clips[index].audio_sha256), durable=False) as out:
                    out.write(buffer.getvalue())
                result[index] = codes
                self.misses += 1
            if progress is not None:
                progress(len(chunk))
        return result  # type: ignore[return-value]
