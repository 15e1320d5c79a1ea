"""Which label an instance gets: zero-shot from CLIP, or learned from a project's annotations."""
