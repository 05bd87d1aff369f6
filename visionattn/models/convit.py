"""convit family (being written)."""
