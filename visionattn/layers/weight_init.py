"""Weight initialisers shared by the layers and the model builders."""
import torch
from timm.layers import trunc_normal_

__all__ = ['init_trunc_normal_']


def init_trunc_normal_(tensor: torch.Tensor, std: float = 1., a: float = -2., b: float = 2.) -> torch.Tensor:
    """timm's ``trunc_normal_(tensor, mean=0, std, a, b)`` in place; a ``meta`` tensor (no values, a model built
    under ``torch.device('meta')``) is returned untouched: its draw would only trace timm's clamp through the slow
    Python meta kernels, about 3 ms per Linear."""
    return tensor if tensor.is_meta else trunc_normal_(tensor, std=std, a=a, b=b)
