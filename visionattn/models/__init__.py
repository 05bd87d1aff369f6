"""visionattn model families; importing this package registers every model in timm."""
from . import agent, biformer, cnn_attention, convit, davit, flatten, nat, ppma, twins  # noqa: F401
