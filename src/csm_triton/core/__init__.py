"""Speech logic: validation, audio, prompts, voices, stream decoding, watermarking.

No Triton, no tritonclient, no FastAPI here (tests/unit/test_layers.py checks it).
"""
