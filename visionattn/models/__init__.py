"""visionattn model families; importing this package registers every model in timm."""
from . import convit, davit, nat, twins  # noqa: F401
