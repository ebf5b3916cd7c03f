"""The token tree: its topology, acceptance profiles, the Sequoia optimizer and preset files."""
