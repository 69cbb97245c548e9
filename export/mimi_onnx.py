"""Export the checkpoint's Mimi codec (encoder and decoder) to ONNX and prove it matches torch.

The graphs take dynamic batch and time axes and fixed tensor names that the model
repository's configs and clients depend on:

    encoder: input_values float32 [batch, 1, samples] -> audio_codes  int64   [batch, 32, frames]
    decoder: audio_codes  int64   [batch, 32, frames] -> audio_values float32 [batch, 1, samples]

Only the codec's weights are read from the checkpoint (`codec_model.*`), never the
1B language model's.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from tqdm import tqdm
from transformers import CsmConfig, MimiModel
from transformers.models.mimi.modeling_mimi import MimiConv1d, MimiEuclideanCodebook
from transformers.utils import logging as transformers_logging

from csm_triton import constants as C
from export.checkpoint import CheckpointError

ENCODER_INPUT = "input_values"
ENCODER_OUTPUT = "audio_codes"
DECODER_INPUT = "audio_codes"
DECODER_OUTPUT = "audio_values"

# Example shapes traced at export time. Both must be >= 2: dynamo specializes a size-1
# dimension to a constant (silently for the decoder's batch), so the graph would only
# accept batch 1.
EXPORT_EXAMPLE_BATCH = 2
EXPORT_EXAMPLE_SECONDS = 2.0

# The CSM checkpoint stores the codec under this prefix (`CsmForConditionalGeneration.codec_model`).
CODEC_PREFIX = "codec_model."


class ParityError(Exception):
    """The ONNX codec disagrees with torch beyond the thresholds in constants.

    `figures` holds every measurement, as `check_mimi_parity` would have returned them."""

    def __init__(self, message: str, figures: dict):
        super().__init__(message)
        self.figures = figures


def load_codec(checkpoint_dir: str | Path) -> MimiModel:
    """Mimi from a CSM checkpoint, reading only the `codec_model.*` tensors (~79 M
    parameters for the real model): the language model's ~1.4 B are skipped by name
    and never read from disk, so this costs no more than loading Mimi alone."""
    codec_config = CsmConfig.from_pretrained(checkpoint_dir).codec_config
    # transformers reports every skipped language-model tensor as "unexpected" in a
    # long warning; missing codec tensors are checked below instead.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        codec, loading_info = MimiModel.from_pretrained(
            checkpoint_dir,
            config=codec_config,
            key_mapping={"^" + re.escape(CODEC_PREFIX): ""},
            attn_implementation="eager",  # the exporters handle eager attention, and it keeps Mimi's sliding window
            dtype=torch.float32,
            output_loading_info=True,
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    if loading_info["missing_keys"]:
        missing = sorted(loading_info["missing_keys"])
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} lacks {len(missing)} codec tensors, e.g. {CODEC_PREFIX}{missing[0]}"
        )
    return codec.eval()


class MimiEncoderGraph(nn.Module):
    """Audio -> codes, the part of `MimiModel.encode` that is exported."""

    def __init__(self, codec: MimiModel):
        super().__init__()
        self.codec = codec

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(input_values).audio_codes


class MimiDecoderGraph(nn.Module):
    """Codes -> audio, the part of `MimiModel.decode` that is exported."""

    def __init__(self, codec: MimiModel):
        super().__init__()
        self.codec = codec

    def forward(self, audio_codes: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(audio_codes).audio_values


def _conv1d_forward_with_int_padding(self: MimiConv1d, hidden_states: torch.Tensor, padding_cache=None) -> torch.Tensor:
    """`MimiConv1d.forward` with its padding computed from Python ints.

    The original keeps stride and kernel as tensor buffers and rounds with
    `torch.ceil`, which the exporter sees as a data-dependent size (the encoder fails
    with GuardOnDataDependentSymNode). For a length L >= 1 the original's
    ceil(L / s) - 1 frames equal (L - 1) // s, which stays integer arithmetic on the
    symbolic length. Not written as -((-a) // s): ONNX integer division truncates
    toward zero, so that ceiling is wrong for negative operands.
    """
    if padding_cache is not None:
        raise ValueError("streaming (padding_cache) is not part of the exported codec")
    kernel_size = (self.conv.kernel_size[0] - 1) * self.conv.dilation[0] + 1
    stride = self.conv.stride[0]
    padding_total = kernel_size - stride
    length = hidden_states.shape[-1]
    frames = (length - 1) // stride
    extra_padding = frames * stride + kernel_size - padding_total - length
    if self.causal:
        paddings = (padding_total, extra_padding)
    else:
        padding_right = padding_total // 2
        paddings = (padding_total - padding_right, padding_right + extra_padding)
    return self.conv(self._pad1d(hidden_states, paddings, mode=self.pad_mode))


@contextlib.contextmanager
def exportable_mimi() -> Iterator[None]:
    """Patches `MimiConv1d` with integer padding while the exporter traces; the
    original method is restored on exit, so torch inference elsewhere is untouched."""
    original = MimiConv1d.forward
    MimiConv1d.forward = _conv1d_forward_with_int_padding
    try:
        yield
    finally:
        MimiConv1d.forward = original


def _cache_codebook_embeddings(codec: MimiModel) -> None:
    # `embed` is computed lazily and cached on first use; computed during tracing, the
    # cache assignment happens inside the exporter. Computed here, it is a constant.
    for module in codec.modules():
        if isinstance(module, MimiEuclideanCodebook):
            module.embed  # noqa: B018 (property with a side effect: fills the cache)


def _export_graph(
    module: nn.Module, example: torch.Tensor, input_name: str, output_name: str, time_axis: str, path: Path
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {0: torch.export.Dim("batch"), 2: torch.export.Dim(time_axis)}
    torch.onnx.export(
        module,
        (example,),
        str(path),
        dynamo=True,
        opset_version=C.ONNX_OPSET,
        input_names=[input_name],
        output_names=[output_name],
        dynamic_shapes={input_name: dynamic},
        external_data=False,  # one self-contained file per model (Mimi is far below ONNX's 2 GB limit)
        verbose=False,  # the caller's tqdm bar reports progress
    )


@torch.no_grad()
def export_mimi(checkpoint_dir: str | Path, encoder_path: str | Path, decoder_path: str | Path) -> None:
    """Writes the checkpoint's Mimi encoder and decoder as ONNX files."""
    with tqdm(total=3, desc="Mimi to ONNX", unit="step") as progress:
        progress.set_postfix_str("loading codec")
        codec = load_codec(checkpoint_dir)
        _cache_codebook_embeddings(codec)
        progress.update()
        frames = int(EXPORT_EXAMPLE_SECONDS * C.FRAME_RATE_HZ)
        example_audio = torch.from_numpy(pseudo_speech(EXPORT_EXAMPLE_SECONDS, EXPORT_EXAMPLE_BATCH, seed=0))
        example_codes = torch.randint(
            0,
            C.CODEBOOK_SIZE,
            (EXPORT_EXAMPLE_BATCH, C.NUM_CODEBOOKS, frames),
            generator=torch.Generator().manual_seed(0),
        )
        with exportable_mimi():
            progress.set_postfix_str("encoder")
            _export_graph(
                MimiEncoderGraph(codec).eval(),
                example_audio,
                ENCODER_INPUT,
                ENCODER_OUTPUT,
                "samples",
                Path(encoder_path),
            )
            progress.update()
            progress.set_postfix_str("decoder")
            _export_graph(
                MimiDecoderGraph(codec).eval(),
                example_codes,
                DECODER_INPUT,
                DECODER_OUTPUT,
                "frames",
                Path(decoder_path),
            )
            progress.update()


def pseudo_speech(seconds: float, batch: int, seed: int) -> np.ndarray:
    """Deterministic speech-like audio, float32 [batch, 1, samples]: syllable-rate bursts
    of harmonic chirps (gliding pitch, like intonation) over a little noise. Silence or
    pure tones would leave most of Mimi's codebooks untested."""
    rng = np.random.default_rng(seed)
    samples = int(round(seconds * C.SAMPLE_RATE))
    t = np.arange(samples) / C.SAMPLE_RATE
    clips = np.empty((batch, 1, samples), dtype=np.float32)
    for index in range(batch):
        pitch_start, pitch_end = rng.uniform(90, 260, size=2)
        pitch = pitch_start + (pitch_end - pitch_start) * t / max(seconds, 1e-9)
        phase = 2 * np.pi * np.cumsum(pitch) / C.SAMPLE_RATE
        voiced = sum(np.sin(harmonic * phase) / harmonic for harmonic in range(1, 6))
        syllable_rate = rng.uniform(3, 6)
        envelope = np.clip(np.sin(2 * np.pi * syllable_rate * t + rng.uniform(0, np.pi)), 0, None) ** 2
        noise = rng.standard_normal(samples)
        clips[index, 0] = 0.3 * envelope * voiced + 0.02 * noise
    return clips


def _session(path: str | Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_mimi_parity(
    checkpoint_dir: str | Path,
    encoder_path: str | Path,
    decoder_path: str | Path,
    seconds: Sequence[float] = C.PARITY_CLIP_SECONDS,
    batch_sizes: Sequence[int] = C.PARITY_BATCH_SIZES,
) -> dict:
    """Runs torch and onnxruntime on the same pseudo-speech clips for every (seconds,
    batch): the encoders' code agreement and the decoders' max abs difference (both
    decoding the torch encoder's codes). Returns the figures as a JSON-able dict;
    raises ParityError, naming the worst case, when a threshold in constants is missed."""
    codec = load_codec(checkpoint_dir)
    encoder, decoder = _session(encoder_path), _session(decoder_path)
    cases: list[dict] = []
    figures = {
        "decoder_max_abs_diff_limit": C.DECODER_MAX_ABS_DIFF,
        "encoder_min_code_agreement_limit": C.ENCODER_MIN_CODE_AGREEMENT,
        "cases": cases,
    }
    grid = [(clip_seconds, batch) for clip_seconds in seconds for batch in batch_sizes]
    for index, (clip_seconds, batch) in enumerate(tqdm(grid, desc="Mimi parity", unit="case")):
        audio = pseudo_speech(clip_seconds, batch, seed=index)
        started = time.perf_counter()
        torch_codes = codec.encode(torch.from_numpy(audio)).audio_codes
        torch_audio = codec.decode(torch_codes).audio_values.numpy()
        torch_seconds = time.perf_counter() - started
        torch_codes = torch_codes.numpy()
        started = time.perf_counter()
        (onnx_codes,) = encoder.run([ENCODER_OUTPUT], {ENCODER_INPUT: audio})
        (onnx_audio,) = decoder.run([DECODER_OUTPUT], {DECODER_INPUT: torch_codes})
        onnx_seconds = time.perf_counter() - started
        # A wrong shape (a frozen batch axis, an off-by-one frame count) needs no figures.
        for name, path, onnx_out, torch_out in (
            ("encoder", encoder_path, onnx_codes, torch_codes),
            ("decoder", decoder_path, onnx_audio, torch_audio),
        ):
            if onnx_out.shape != torch_out.shape:
                raise ParityError(
                    f"Mimi {name} ONNX {path} gave shape {list(onnx_out.shape)} for {clip_seconds:g} s batch "
                    f"{batch}, torch {list(torch_out.shape)}",
                    figures,
                )
        mismatched = int(np.count_nonzero(onnx_codes != torch_codes))
        cases.append(
            {
                "seconds": clip_seconds,
                "batch": batch,
                "frames": int(torch_codes.shape[-1]),
                "encoder_code_agreement": 1.0 - mismatched / torch_codes.size,
                "encoder_mismatched_codes": mismatched,
                "decoder_max_abs_diff": float(np.max(np.abs(onnx_audio - torch_audio))),
                "torch_seconds": round(torch_seconds, 3),
                "onnx_seconds": round(onnx_seconds, 3),
            }
        )

    worst_decoder = max(cases, key=lambda case: case["decoder_max_abs_diff"])
    worst_encoder = min(cases, key=lambda case: case["encoder_code_agreement"])
    figures["decoder_max_abs_diff"] = worst_decoder["decoder_max_abs_diff"]
    figures["encoder_code_agreement"] = worst_encoder["encoder_code_agreement"]
    if not worst_decoder["decoder_max_abs_diff"] <= C.DECODER_MAX_ABS_DIFF:
        raise ParityError(
            f"Mimi decoder ONNX {decoder_path} differs from torch: max abs diff "
            f"{worst_decoder['decoder_max_abs_diff']:.3g} at {worst_decoder['seconds']:g} s batch "
            f"{worst_decoder['batch']} (limit {C.DECODER_MAX_ABS_DIFF:g})",
            figures,
        )
    if not worst_encoder["encoder_code_agreement"] >= C.ENCODER_MIN_CODE_AGREEMENT:
        raise ParityError(
            f"Mimi encoder ONNX {encoder_path} disagrees with torch: code agreement "
            f"{worst_encoder['encoder_code_agreement']:.4%} at {worst_encoder['seconds']:g} s batch "
            f"{worst_encoder['batch']} (minimum {C.ENCODER_MIN_CODE_AGREEMENT:.2%})",
            figures,
        )
    return figures
