"""Attention and token-mixing layers shared by the visionattn families."""
