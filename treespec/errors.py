"""Every error treespec raises on purpose, in one hierarchy (the bottom of the layering: this
module imports nothing from treespec, so any module can raise these).

    TreespecError                      catch this to catch every treespec error
    ├── ArgumentError   (ValueError)   a bad argument of generate / stream; .argument names it
    ├── ConfigError     (ValueError)   a config value that cannot be used; .key names it
    │   └── TreeShapeError             a tree that cannot be built (widths, preset, topology)
    │       └── TreeConfigError        a tree-policy setting (dynamic, adaptive, lookup, overlap)
    ├── ModelLoadError  (RuntimeError) a model spec that cannot be resolved or loaded
    │   ├── UnsupportedModelError (ValueError)       a model a backend cannot drive
    │   ├── IncompatibleTokenizersError (ValueError) target and draft vocabularies differ
    │   ├── IncompatibleModelsError (ValueError)     draft scores ids the target does not
    │   └── WeightsError                             fetching or verifying a GGUF failed
    └── CacheError      (RuntimeError) a cached file or a KV cache cannot be used
        ├── WeightsError
        └── CacheFullError                           a forward would overrun a KV cache

The builtin second bases keep `except ValueError` / `except RuntimeError` working for code
written before the hierarchy. Every message names the argument, key or file, and the fix.
"""

from __future__ import annotations

__all__ = [
    "ArgumentError", "CacheError", "CacheFullError", "ConfigError", "IncompatibleModelsError",
    "IncompatibleTokenizersError", "ModelLoadError", "TreeConfigError", "TreeShapeError", "TreespecError",
    "UnsupportedModelError", "WeightsError",
]  # fmt: skip


class TreespecError(Exception):
    """Base of every error treespec raises on purpose; the message says what to do."""


class ArgumentError(TreespecError, ValueError):
    """A bad argument of `generate` / `stream`; `argument` is its name, so a caller with its own
    names for them (the benchmark's config keys) can report its own key."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


class ConfigError(TreespecError, ValueError):
    """A config value that cannot be used; the message names the key (`key`, when known)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class TreeShapeError(ConfigError):
    """A tree that cannot be built (bad widths, an unknown preset, an invalid topology)."""


class TreeConfigError(TreeShapeError):
    """A tree-policy setting that cannot be used; `key` names the field ('depth', 'widths[1]')."""

    def __init__(self, key: str, message: str):
        super().__init__(message, key)


class ModelLoadError(TreespecError, RuntimeError):
    """A model spec could not be resolved or loaded; the message lists what would work."""


class UnsupportedModelError(ModelLoadError, ValueError):
    """A model a backend cannot drive (the message says what to do instead)."""


class IncompatibleTokenizersError(ModelLoadError, ValueError):
    """Target and draft tokenizers disagree, so draft token ids cannot be fed to the target."""


class IncompatibleModelsError(ModelLoadError, ValueError):
    """Target and draft models cannot be paired (the draft scores ids the target does not)."""


class CacheError(TreespecError, RuntimeError):
    """A cached file (or a KV cache) cannot be used; the message names it and the fix."""


class WeightsError(ModelLoadError, CacheError):
    """Fetching or verifying a GGUF file failed; the message says what to do about it."""


class CacheFullError(CacheError):
    """A forward would write past the end of a KV cache."""
