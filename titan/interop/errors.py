"""Errors raised when weights cannot be read or converted; each message names the file or key."""


class ConversionError(ValueError):
    """Weights or a config that do not fit the requested conversion (wrong keys, shapes, options)."""


class CheckpointReadError(ConversionError):
    """A checkpoint file that cannot be read: missing, incomplete, truncated or corrupted."""

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")
