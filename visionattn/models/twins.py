"""twins family (being written)."""
