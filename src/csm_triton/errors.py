"""Exceptions shared by the package (no Triton import here)."""


class InvalidInput(ValueError):
    """A client error: answered as INVALID_ARG with this message, never a traceback."""


class PermissionDenied(Exception):
    """A write without the right admin token. Not an InvalidInput subclass (so input
    handlers never swallow it) and not the builtin PermissionError (an OSError: a
    file-system error must not reach a client as "permission denied")."""

    PREFIX = "permission denied: "

    def __init__(self, reason: str):
        super().__init__(reason if reason.startswith(self.PREFIX) else self.PREFIX + reason)
