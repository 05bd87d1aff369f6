"""visionattn: vision-attention backbones registered in timm under the ``visionattn_`` prefix."""
from . import models  # noqa: F401  (registers every model in timm)

__version__ = "0.1.0"
