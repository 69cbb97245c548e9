"""The CSM generation engine: own loop, static KV slots, in-flight batching."""

from csm_triton.engine.engine import EngineConfig, GenerationEngine
from csm_triton.engine.lm import CsmLM
from csm_triton.engine.requests import FinishReason, FrameChunk, GenerationRequest, GenerationResult, RequestHandle

__all__ = [
    "CsmLM",
    "EngineConfig",
    "FinishReason",
    "FrameChunk",
    "GenerationEngine",
    "GenerationRequest",
    "GenerationResult",
    "RequestHandle",
]
