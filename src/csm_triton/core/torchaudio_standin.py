"""The three `torchaudio.transforms` that resemble-perth imports, on torch.stft/istft.

No torchaudio wheel exists for torch 2.13, and Perth imports
`Spectrogram, InverseSpectrogram, TimeStretch` at module level. These classes
reproduce torchaudio's defaults as Perth uses them (center=True, reflect padding,
one-sided, no normalisation) and register their buffers under torchaudio's names
and shapes, because Perth loads its checkpoint strictly:
`ap.spectrogram.window` (n_fft,), `ap.inv_spectrogram.window` (n_fft,),
`ap.stretch.phase_advance` (n_freq, 1).

`installed_if_missing()` puts them in `sys.modules` only while Perth is imported,
and only when the real torchaudio cannot be imported; afterwards nothing else
sees a `torchaudio` module (a GPU image with real torchaudio never uses this file).
"""

from __future__ import annotations

import contextlib
import math
import sys
import types
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = ["InverseSpectrogram", "Spectrogram", "TimeStretch", "installed_if_missing"]


class Spectrogram(nn.Module):
    """Complex STFT (torchaudio's `power=None`), frames centred with reflect padding."""

    def __init__(
        self,
        n_fft: int = 400,
        win_length: int | None = None,
        hop_length: int | None = None,
        window_fn: Callable[..., torch.Tensor] = torch.hann_window,
        power: float | None = None,
        normalized: bool = False,
    ) -> None:
        super().__init__()
        if power is not None or normalized:
            raise NotImplementedError("the torchaudio stand-in only implements power=None, normalized=False")
        self.n_fft = n_fft
        self.win_length = win_length or n_fft
        self.hop_length = hop_length or self.win_length // 2
        self.register_buffer("window", window_fn(self.win_length))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        shape = waveform.shape
        spec = torch.stft(
            waveform.reshape(-1, shape[-1]),
            self.n_fft,
            self.hop_length,
            self.win_length,
            self.window,
            center=True,
            pad_mode="reflect",
            onesided=True,
            return_complex=True,
        )
        return spec.reshape(shape[:-1] + spec.shape[-2:])


class InverseSpectrogram(nn.Module):
    """Inverse of `Spectrogram` by overlap-add (torch.istft)."""

    def __init__(
        self,
        n_fft: int = 400,
        win_length: int | None = None,
        hop_length: int | None = None,
        window_fn: Callable[..., torch.Tensor] = torch.hann_window,
        normalized: bool = False,
    ) -> None:
        super().__init__()
        if normalized:
            raise NotImplementedError("the torchaudio stand-in only implements normalized=False")
        self.n_fft = n_fft
        self.win_length = win_length or n_fft
        self.hop_length = hop_length or self.win_length // 2
        self.register_buffer("window", window_fn(self.win_length))

    def forward(self, spectrogram: torch.Tensor, length: int | None = None) -> torch.Tensor:
        if not spectrogram.is_complex():
            raise ValueError("InverseSpectrogram expects a complex spectrogram")
        shape = spectrogram.shape
        signal = torch.istft(
            spectrogram.reshape(-1, shape[-2], shape[-1]),
            self.n_fft,
            self.hop_length,
            self.win_length,
            self.window,
            center=True,
            normalized=False,
            onesided=True,
            length=length,
            return_complex=False,
        )
        return signal.reshape(shape[:-2] + signal.shape[-1:])


class TimeStretch(nn.Module):
    """Only the `phase_advance` buffer that Perth's checkpoint holds: Perth builds a
    TimeStretch but never calls it (its one call is commented out in resemble-perth
    1.0.1), so there is no phase vocoder here and calling it raises
    NotImplementedError (nn.Module's missing `forward`)."""

    def __init__(self, hop_length: int | None = None, n_freq: int = 201) -> None:
        super().__init__()
        n_fft = (n_freq - 1) * 2
        hop_length = hop_length or n_fft // 2
        self.register_buffer("phase_advance", torch.linspace(0, math.pi * hop_length, n_freq)[..., None])


def _real_torchaudio_imports() -> bool:
    try:
        import torchaudio.transforms  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install (missing .so, ABI) counts as absent
        return False
    return True


@contextlib.contextmanager
def installed_if_missing() -> Iterator[bool]:
    """While active, `import torchaudio.transforms` works; yields True when the
    stand-in (not the real torchaudio) is what it finds."""
    if _real_torchaudio_imports():
        yield False
        return
    package = types.ModuleType("torchaudio")
    transforms = types.ModuleType("torchaudio.transforms")
    transforms.Spectrogram, transforms.InverseSpectrogram, transforms.TimeStretch = (
        Spectrogram,
        InverseSpectrogram,
        TimeStretch,
    )
    package.transforms = transforms
    package.__csm_standin__ = True
    sys.modules["torchaudio"], sys.modules["torchaudio.transforms"] = package, transforms
    try:
        yield True
    finally:
        for name, module in (("torchaudio", package), ("torchaudio.transforms", transforms)):
            if sys.modules.get(name) is module:
                del sys.modules[name]
