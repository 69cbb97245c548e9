"""Thin clients for the CSM-1B voice-cloning service on Triton.

Needs only tritonclient, numpy, soundfile and soxr (never torch):

    from csm_clients import VoiceCloner
    with VoiceCloner("localhost:8001") as tts:
        tts.clone_voice_from_file("me.wav", "What the clip says.", "Hello in my voice.").save("hello.wav")

`csm-tts` is the command line (csm_clients.cli). Optional extras: `speed` (PyAV, for
--speed's time-stretch) and `pipe` (websockets, for `csm-tts pipe`). The REST gateway on
:7860 that uses this client is a server (csm_servers.gateway, in the csm-triton
distribution).
"""

from csm_clients.async_client import AsyncVoiceCloner
from csm_clients.audio import MODEL_SAMPLE_RATE, Reference, Speech, read_audio
from csm_clients.client import VoiceCloner
from csm_clients.conversation import Turn
from csm_clients.errors import CsmClientError, InvalidRequest, PermissionDenied, ServerError, ServerUnavailable
from csm_clients.streams import AsyncSpeechStream, SpeechStream

__all__ = [
    "AsyncSpeechStream",
    "AsyncVoiceCloner",
    "CsmClientError",
    "InvalidRequest",
    "MODEL_SAMPLE_RATE",
    "PermissionDenied",
    "Reference",
    "ServerError",
    "ServerUnavailable",
    "Speech",
    "SpeechStream",
    "Turn",
    "VoiceCloner",
    "read_audio",
]
