"""Error types of the core. Every message says what the user can do about it.

Pages catch :class:`ProbingError` and show its message with ``st.error``; the CLI prints it
and exits with status 2. Anything else is a bug and is allowed to surface as a traceback.
"""
from __future__ import annotations


class ProbingError(Exception):
    """Base class: a problem the user can fix (bad input, missing network, full disk)."""


class ModelError(ProbingError):
    """A model cannot be found, downloaded or loaded."""


class OfflineError(ModelError):
    """Something needs the internet and this machine cannot reach the hub."""


class DatasetError(ProbingError):
    """A dataset cannot be read, is empty, too large, or lacks a column."""


class HookError(ProbingError):
    """A hook name does not exist for this model."""


class StoreError(ProbingError):
    """The activation store cannot be read or written (full disk, no permission, bad key)."""


class LabelError(ProbingError):
    """A label specification is invalid or gives an unusable target."""


class ProbeError(ProbingError):
    """A probe cannot be fit on the data given (too few samples, one class, bad α/C)."""


class InputError(ProbingError):
    """A prompt, layer, head or other argument is out of range or empty."""
