"""Acceptance: which drafted path the target keeps. Pure functions, no model calls."""
