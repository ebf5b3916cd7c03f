"""Draft heads: one decoder layer that drafts from the target's own features (docs/heads.md)."""

from treespec.heads.model import DraftHead, HeadMismatchError
from treespec.heads.store import load_head

__all__ = ["DraftHead", "HeadMismatchError", "load_head"]
