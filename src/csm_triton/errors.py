"""Exceptions shared by the package (no Triton import here)."""


class InvalidInput(ValueError):
    """A client error: answered as INVALID_ARG with this message, never a traceback."""
