"""Attention backends and KV caches: how a model runs over a block of tree nodes."""
