"""Drafting: the draft model expands each step's token tree."""
