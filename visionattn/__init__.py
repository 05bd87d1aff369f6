"""visionattn: vision-attention backbones registered in timm under the ``visionattn_`` prefix."""
from typing import List

import timm

from . import models  # noqa: F401  (importing the families registers every model in timm)

__version__ = "0.1.0"


def list_models(pattern: str = '*', pretrained: bool = False) -> List[str]:
    """Names of the registered visionattn models matching ``pattern`` (``visionattn_`` is implied)."""
    if not pattern.startswith('visionattn_'):
        pattern = 'visionattn_' + pattern
    return timm.list_models(pattern, pretrained=pretrained)


def create_model(model_name: str, **kwargs):
    """``timm.create_model`` for a visionattn model, with a clear error for an unknown name."""
    if not timm.is_model(model_name):
        close = [m for m in list_models() if model_name.replace('visionattn_', '') in m][:5]
        raise ValueError(
            f'model_name={model_name!r} is not a registered model'
            + (f'; did you mean one of {close}?' if close else '; see visionattn.list_models()'))
    return timm.create_model(model_name, **kwargs)
