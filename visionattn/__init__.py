"""visionattn: vision-attention backbones registered in timm under the ``visionattn_`` prefix."""
import difflib
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
    """``timm.create_model`` for a visionattn model (``visionattn_*``, optionally with a pretrained tag).

    Any other name -- also one of timm's own models, e.g. ``'davit_tiny'``, which ``timm.create_model`` would
    build -- raises a ``ValueError`` that suggests the closest visionattn names.
    """
    models = list_models()
    if isinstance(model_name, str) and timm.models.get_arch_name(model_name) in models:
        return timm.create_model(model_name, **kwargs)
    close = []
    if isinstance(model_name, str):
        arch = timm.models.get_arch_name(model_name)
        if 'visionattn_' + arch in models:  # a timm-style name of a visionattn model, e.g. 'davit_tiny'
            close = ['visionattn_' + model_name]
        else:
            close = difflib.get_close_matches(
                arch if arch.startswith('visionattn_') else 'visionattn_' + arch, models, n=3, cutoff=0.85)
    if len(close) == 1:
        hint = f'did you mean {close[0]!r}?'
    elif close:
        hint = f'did you mean one of {close}?'
    else:
        hint = "expected a name from visionattn.list_models() (they start with 'visionattn_')"
    raise ValueError(f'model_name={model_name!r} is not a visionattn model; {hint}')
