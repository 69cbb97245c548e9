"""The CSM generation engine: own loop, static KV slots, in-flight batching."""

from csm_triton.engine.engine import (
    EngineConfig,
    FinishReason,
    FrameChunk,
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
    RequestHandle,
)
from csm_triton.engine.lm import CsmLM

__all__ = [
    "CsmLM", "EngineConfig", "FinishReason", "FrameChunk", "GenerationEngine", "GenerationRequest",
    "GenerationResult", "RequestHandle",
]
