"""davit family (being written)."""
