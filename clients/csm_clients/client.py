"""VoiceCloner (blocking; async_client.AsyncVoiceCloner: asyncio): the same calls over gRPC or HTTP.

Both share one definition of every call (`_Calls`, here); they differ only in how a request
travels. gRPC is the default: binary tensors and real streams. Over HTTP, streaming
uses Triton's `generate_stream` (server-sent events). The wire helpers both use are in
transport.py; the admin token's lookup in admin_token.py. Each client reads the server's
limits (csm_tts's config) once, on first use, and checks every request against them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpc
import tritonclient.http as http
from tritonclient.utils import InferenceServerException

from csm_clients import calls
from csm_clients.adapters import AdapterFiles, read_adapter_folder
from csm_clients.audio import AudioSource, Reference, Speech, read_audio
from csm_clients.conversation import Turn
from csm_clients.errors import from_triton
from csm_clients.limits import DEFAULT_LIMITS, Limits
from csm_clients.streams import SpeechStream, joined
from csm_clients.transport import config_request, infer_inputs, stream_over_grpc, stream_over_sse

__all__ = ["DEFAULT_URLS", "VoiceCloner"]

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
DEFAULT_TIMEOUT_S = 300.0  # a long utterance on a busy server; per request


class _Calls:
    """Every call a client offers. `_run` and `_stream` move a request, `_with_limits`
    hands over the server's limits; in the async client they return a coroutine and an
    async iterator, so each method here returns whatever the transport does, unchanged."""

    protocol: str
    admin_token: str | None
    timeout: float
    _module: Any  # tritonclient.grpc / .http (or their .aio)
    _limits: Limits | None = None  # the server's, once read (limits())

    def _configure(self, url: str | None, protocol: str, admin_token: str | None, timeout: float) -> None:
        if protocol not in DEFAULT_URLS:
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.protocol, self.url = protocol, url or DEFAULT_URLS[protocol]
        self.admin_token, self.timeout = admin_token, timeout

    def synthesize(
        self,
        text: str,
        *,
        voice: str | Reference | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        max_audio_seconds: float | None = None,
        speaker: int | None = None,
        context: Sequence[Turn] | None = None,
        normalize: bool | None = None,
        sentence_segments: bool | None = None,
    ):
        """Text (up to 20,000 characters; the server splits a long one) -> Speech (24 kHz,
        watermarked). `voice`: a stored voice id, an inline Reference, or None for the
        model's default voice; None sampling values take the server's defaults.
        `speaker`: the speaker id of the text (default 0); `context`: earlier turns
        (`Turn`s, oldest first, stored voices before clips) the model conditions on.
        `normalize` False: spoken as written; `sentence_segments` True: each sentence its
        own segment, so `segment_times` time sentences (calls.tts_inputs).

        A text the server splits into segments (over its SEGMENT_MAX_CHARS) may pass
        csm_tts's 120 s in one response, so it is collected from csm_tts_stream instead:
        the same Speech, with the stream's finish reasons."""
        options = dict(
            voice=voice,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            max_audio_seconds=max_audio_seconds,
            speaker=speaker,
            context=context,
            normalize=normalize,
            sentence_segments=sentence_segments,
        )

        def send(limits: Limits):
            if isinstance(text, str) and len(text) > limits.SEGMENT_MAX_CHARS:
                return self._collect(self.stream(text, **options))
            return self._run(calls.synthesize(text, limits=limits, **options))

        return self._with_limits(send)

    def clone_voice_from_file(
        self, reference_audio: AudioSource, reference_transcript: str | None, target_text: str, **sampling
    ):
        """Speak `target_text` in the voice of a clip (any soundfile format) and its transcript."""
        return self.synthesize(
            target_text, voice=Reference.from_file(reference_audio, reference_transcript), **sampling
        )

    def stream(
        self,
        text: str,
        *,
        voice: str | Reference | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        max_audio_seconds: float | None = None,
        speaker: int | None = None,
        context: Sequence[Turn] | None = None,
        continue_from: str | None = None,
        normalize: bool | None = None,
        sentence_segments: bool | None = None,
    ):
        """Like synthesize, yielding Speech chunks as they are generated (a long text's
        segments back to back, past csm_tts's 120 s); stopping early cancels the
        generation on the server. Bad input raises InvalidRequest here, before any chunk.
        `continue_from`: a text sent in pieces, each spoken as the next segments of one
        long text: "" for the first piece, then the previous stream's `continuation`."""
        return self._stream_type(
            self._stream(
                lambda limits: calls.tts_inputs(
                    text,
                    voice,
                    temperature=temperature,
                    top_k=top_k,
                    seed=seed,
                    max_audio_seconds=max_audio_seconds,
                    speaker=speaker,
                    context=context,
                    continue_from=continue_from,
                    normalize=normalize,
                    sentence_segments=sentence_segments,
                    limits=limits,
                )
            )
        )

    def register_voice(
        self,
        voice_id: str,
        reference_audio: AudioSource | Reference,
        transcript: str | None,
        *,
        owner: str | None = None,
    ):
        """Store a voice (needs the admin token) -> the stored voice's description.
        `reference_audio`: a file, or a Reference already read (its transcript is
        replaced by `transcript`); `owner`: whose voice it is (a gateway's key id)."""
        if isinstance(reference_audio, Reference):
            reference = Reference(reference_audio.samples, reference_audio.sample_rate, transcript)
        else:
            reference = Reference.from_file(reference_audio, transcript)
        return self._run(calls.register_voice(voice_id, reference, owner))

    def register_adapter(
        self,
        voice_id: str,
        folder: str | Path | AdapterFiles,
        *,
        default_speaker: int | None = None,
        reference_audio: AudioSource | Reference | None = None,
        transcript: str | None = None,
        owner: str | None = None,
    ):
        """Store a LoRA adapter as a voice (needs the admin token) -> its description (kind
        "adapter", rank, lora_alpha, target_modules, base_model_sha256, size_bytes ...).
        `folder`: the adapter folder `make finetune` wrote (OUT/adapter) or its run folder
        (its manifest.json goes along), or the AdapterFiles read from one.
        `default_speaker`: the speaker id it speaks as; `reference_audio` + `transcript`:
        an optional clip of its own."""
        reference = None
        if isinstance(reference_audio, Reference):
            reference = Reference(reference_audio.samples, reference_audio.sample_rate, transcript)
        elif reference_audio is not None:
            reference = Reference.from_file(reference_audio, transcript)

        def send(limits: Limits):
            files = folder if isinstance(folder, AdapterFiles) else read_adapter_folder(folder, limits)
            options = dict(default_speaker=default_speaker, reference=reference, owner=owner)
            return self._run(calls.register_adapter(voice_id, files, **options))

        return self._with_limits(send)

    def list_voices(self):
        """[{voice_id, kind, transcript, duration_seconds, created_at, owner, ...}, ...]; an
        adapter voice adds rank, lora_alpha, target_modules, stacks, base_model_sha256,
        base_hash_checked, size_bytes and default_speaker."""
        return self._run(calls.list_voices())

    def delete_voice(self, voice_id: str, *, owner: str | None = None):
        """Remove a stored voice (needs the admin token) -> its description. With
        `owner`, only a voice of that owner is removed."""
        return self._run(calls.delete_voice(voice_id, owner))

    def detect_watermark(self, audio: Speech | np.ndarray | AudioSource, sample_rate: int | None = None):
        """Watermark score in [0, 1] of a Speech, samples (with `sample_rate`) or an audio file:
        a float with `.watermarked`, the server's decision (calls.WatermarkScore)."""
        if isinstance(audio, Speech):
            audio, sample_rate = audio.audio, audio.sample_rate
        elif not isinstance(audio, np.ndarray):
            audio, sample_rate = read_audio(audio)
        elif sample_rate is None:
            raise ValueError("detect_watermark: give the sample_rate of the samples")
        return self._run(calls.detect_watermark(audio, sample_rate))

    def _request(self, call: calls.Call) -> dict[str, Any]:
        """tritonclient's infer() arguments for a call."""
        # Headers: a fresh dict per request (tritonclient.http adds its own keys to it).
        headers = {calls.ADMIN_TOKEN_HEADER: self.admin_token} if call.admin and self.admin_token else {}
        if call.owner:
            headers[calls.VOICE_OWNER_HEADER] = call.owner
        timeout = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        return dict(model_name=call.model, inputs=infer_inputs(self._module, call.inputs), headers=headers, **timeout)

    def _with_limits(self, send: Callable[[Limits], Any]) -> Any:  # send(the server's limits)
        raise NotImplementedError

    def _run(self, call: calls.Call) -> Any:
        raise NotImplementedError

    def _stream(self, inputs: Callable[[Limits], dict[str, np.ndarray]]) -> Any:  # inputs(the server's limits)
        raise NotImplementedError

    def _collect(self, stream: SpeechStream) -> Any:
        raise NotImplementedError


class VoiceCloner(_Calls):
    """Blocking client. gRPC calls may be made from several threads at once; an HTTP
    client serves one call at a time (make one per thread)."""

    _stream_type = SpeechStream

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        *,
        admin_token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ):
        self._configure(url, protocol, admin_token, timeout)
        self._module = grpc if protocol == "grpc" else http
        self._client = (
            grpc.InferenceServerClient(self.url)
            if protocol == "grpc"
            else http.InferenceServerClient(self.url, connection_timeout=timeout, network_timeout=timeout)
        )

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready())
        except (InferenceServerException, OSError):
            return False

    def limits(self) -> Limits:
        """The server's limits (csm_tts's config), read once; the documented ones
        (DEFAULT_LIMITS) while the server cannot be asked, and asked again next time."""
        if self._limits is None:
            try:
                self._limits = Limits.from_model_config(
                    self._client.get_model_config(**config_request(self.protocol, self.timeout))
                )
            except (InferenceServerException, OSError):
                return DEFAULT_LIMITS  # the request that follows fails the same way, or the server checks it
        return self._limits

    def _with_limits(self, send: Callable[[Limits], Any]) -> Any:
        return send(self.limits())

    def _run(self, call: calls.Call) -> Any:
        try:
            result = self._client.infer(**self._request(call))
        except (InferenceServerException, OSError) as error:
            raise from_triton(error, self.url) from None
        return call.parse(result)

    def _stream(self, inputs: Callable[[Limits], dict[str, np.ndarray]]) -> Iterator[Speech]:
        inputs = inputs(self.limits())  # checked now: bad input raises here, before any chunk
        over = stream_over_sse if self.protocol == "http" else stream_over_grpc
        return over(self.url, inputs, self.timeout)

    def _collect(self, stream: SpeechStream) -> Speech:
        return joined(list(stream), stream)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> VoiceCloner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
