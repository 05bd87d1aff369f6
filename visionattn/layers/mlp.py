"""The transformer MLP shared by the hosts and families: fc1 -> [depthwise 3x3 conv] -> exact GELU -> fc2."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fused_linear import fused_linear, gelu_mlp

__all__ = ['GeluMlp']


class GeluMlp(nn.Module):
    """fc1 -> [dwconv] -> GELU (exact) -> dropout -> fc2 -> dropout (+ ``shortcut``) on ``(..., C)`` tokens.

    Parameter names as timm's ``Mlp`` (``fc1``, ``fc2``), plus ``dwconv`` (PVTv2's depthwise 3x3 conv over the
    map between fc1 and GELU; the input is then an NHWC map). At CPU fp32 inference fc1 (+ GELU) and fc2
    (+ ``shortcut``) each run as one oneDNN op (:func:`fused_linear`; no bias copy, GELU in the epilogue).
    ``recompute_gelu``: under autograd the GELU output is recomputed in backward instead of kept
    (:func:`gelu_mlp`; less memory, one more GELU pass); otherwise training runs the plain ops.
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0., dwconv: bool = False,
                 recompute_gelu: bool = False, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.fc1 = nn.Linear(dim, hidden_dim, **dd)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim, **dd) if dwconv else None
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim, **dd)
        self.drop2 = nn.Dropout(drop)
        self.recompute_gelu = recompute_gelu

    def forward(self, x: torch.Tensor, shortcut: Optional[torch.Tensor] = None) -> torch.Tensor:
        dropping = self.training and self.drop1.p > 0.
        if self.dwconv is None and not dropping and (self.recompute_gelu or not torch.is_grad_enabled()):
            return gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, residual=shortcut)
        if self.dwconv is None:
            x = F.gelu(self.fc1(x))
        else:
            # the NCHW view of an NHWC tensor has channels-last strides: the conv keeps them, no copies
            x = fused_linear(x, self.fc1.weight, self.fc1.bias)
            x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            x = F.gelu(x) if torch.is_grad_enabled() else torch.ops.aten.gelu_(x)
        if dropping:
            x = self.drop2(self.fc2(self.drop1(x)))
            return x if shortcut is None else x + shortcut
        return fused_linear(x, self.fc2.weight, self.fc2.bias, residual=shortcut)
