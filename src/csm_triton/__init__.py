"""Sesame CSM-1B voice-cloning TTS served by NVIDIA Triton Inference Server.

All serving logic lives in this package; the `model.py` files in the model
repository are thin adapters over it.
"""

__version__ = "0.1.0"
