"""AsyncVoiceCloner: client.VoiceCloner's calls (client._Calls) for asyncio, many requests at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http.aio as http_aio
from tritonclient.utils import InferenceServerException

from csm_clients import calls
from csm_clients.audio import Speech
from csm_clients.client import DEFAULT_TIMEOUT_S, _Calls
from csm_clients.errors import from_triton
from csm_clients.limits import DEFAULT_LIMITS, Limits
from csm_clients.streams import AsyncSpeechStream, joined
from csm_clients.transport import config_request, infer_inputs, stream_over_sse, stream_step

__all__ = ["AsyncVoiceCloner"]


class AsyncVoiceCloner(_Calls):
    """asyncio client for many requests at once: `await cloner.synthesize(...)`,
    `async for chunk in cloner.stream(...)`. Create it inside the running loop."""

    _stream_type = AsyncSpeechStream

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        *,
        admin_token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ):
        self._configure(url, protocol, admin_token, timeout)
        self._module = grpc_aio if protocol == "grpc" else http_aio
        self._connection = None

    @property
    def _client(self):
        # Made on first use, inside the running loop (aiohttp and grpc.aio bind to it).
        if self._connection is None:
            self._connection = (
                grpc_aio.InferenceServerClient(self.url)
                if self.protocol == "grpc"
                else http_aio.InferenceServerClient(self.url, conn_timeout=self.timeout)
            )
        return self._connection

    async def is_ready(self) -> bool:
        try:
            return bool(await self._client.is_server_ready())
        except (InferenceServerException, OSError):
            return False

    async def limits(self) -> Limits:
        """VoiceCloner.limits(), awaited."""
        if self._limits is None:
            try:
                self._limits = Limits.from_model_config(
                    await self._client.get_model_config(**config_request(self.protocol, self.timeout))
                )
            except (InferenceServerException, OSError):
                return DEFAULT_LIMITS
        return self._limits

    async def _with_limits(self, send: Callable[[Limits], Any]) -> Any:
        return await send(await self.limits())

    async def _run(self, call: calls.Call) -> Any:
        try:
            result = await self._client.infer(**self._request(call))
        except (InferenceServerException, OSError) as error:
            raise from_triton(error, self.url) from None
        return call.parse(result)

    async def _stream(self, inputs: Callable[[Limits], dict[str, np.ndarray]]) -> AsyncIterator[Speech]:
        inputs = inputs(await self.limits())  # checked before the first chunk
        if self.protocol == "http":  # the blocking SSE reader, one chunk at a time off the loop
            chunks = stream_over_sse(self.url, inputs, self.timeout)
            try:
                while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                    yield chunk
            finally:
                chunks.close()  # stopping early closes the connection: Triton cancels the generation
            return

        async def request():
            yield {
                "model_name": calls.STREAM_MODEL,
                "inputs": infer_inputs(grpc_aio, inputs),
                "enable_empty_final_response": True,
            }

        answers = self._client.stream_infer(request(), stream_timeout=self.timeout)
        finished = False
        try:
            async for result, error in answers:
                chunk, finished = stream_step(result, error, self.url)
                if chunk is not None:
                    yield chunk
                if finished:
                    break
        finally:
            if not finished:
                answers.cancel()

    async def _collect(self, stream: AsyncSpeechStream) -> Speech:
        return joined([chunk async for chunk in stream], stream)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def __aenter__(self) -> AsyncVoiceCloner:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
