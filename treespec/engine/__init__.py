"""The decode loop (draft, verify, accept, commit) and the public generate/stream API."""
