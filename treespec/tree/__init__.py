"""The token tree: its topology, presets and the tree optimizer."""
