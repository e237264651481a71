"""The project's exception types: errors a user can cause, each with a message that says what to do.

They live in the runtime (which imports nothing else of ours) so that the training library, the
export toolchain and the device all raise and catch the same types.
"""
from __future__ import annotations


class EdgemetaError(Exception):
    """Base of every error a user can cause; the CLI prints its message without a traceback."""


class DataError(EdgemetaError):
    """A dataset, image or episode request that cannot be served (bad path, empty class, too few shots)."""


class ImageDecodeError(DataError):
    """An image file that will not decode or does not have the expected channels."""


class ImageTooLargeError(ImageDecodeError):
    """An image with more pixels than edgemeta decodes (EDGEMETA_MAX_PIXELS): a decompression bomb or a scan."""


class ConfigError(EdgemetaError):
    """An unknown backbone, algorithm or head, or an invalid option value."""


class CheckpointError(EdgemetaError):
    """A checkpoint that is missing, unreadable, not ours, or would need code execution to load."""


class BundleError(EdgemetaError):
    """A bundle whose manifest or files are missing, tampered with, or made for another device."""


class DependencyError(EdgemetaError):
    """An optional package (an extra) that this use needs is not installed; says how to install it."""


class StoreError(EdgemetaError):
    """An enrollment store that is missing, made for another bundle, or asked for something it lacks."""


class LabelError(StoreError):
    """A class label that cannot be stored: empty, too long, control characters, or reserved."""


class UnknownClassError(StoreError):
    """A class that is not enrolled."""


class ClassExistsError(StoreError):
    """A class that is already enrolled, where a new one was asked for."""


class BusyError(EdgemetaError):
    """The service is at a limit it waits on (the decode budget) for longer than it may: try again."""


class StorageError(StoreError):
    """The store could not be written (disk full, read-only, quota): nothing was changed."""
