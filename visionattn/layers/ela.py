"""ELA, Efficient Local Attention (Xu & Wan, arXiv 2403.01123), as in the official ``Xuwei86/ELA_Code``.

Input and output are NCHW ``[B, C, H, W]``: ``x_h = mean_W x`` (``[B, C, H]``) and ``x_w = mean_H x``
(``[B, C, W]``) go through **one shared** ``Conv1d(C, C, k, pad k // 2, groups g, no bias)`` and one
shared ``GroupNorm(G, C)``, then a sigmoid; ``out = x * a_h[..., None] * a_w[..., None, :]``.

The paper's four settings (``variant``): T = (k 5, depthwise, GN 32), B = (7, depthwise, 16),
S = (5, C/8 groups, 16), L = (7, C/8 groups, 16); the official MobileNetV2 (``mbv2_ela72``) uses L.
timm's ``EfficientLocalAttn`` ('ela') is a different module (two separate depthwise convs, SiLU,
one-group norms, twice the parameters) and cannot load these weights.
"""
from typing import Optional

import torch
import torch.nn as nn

from .cbam import _reject_unknown
from .reduce import mean_over

torch.fx.wrap('mean_over')  # a leaf for torch.fx.symbolic_trace too

__all__ = ['ELA', 'ELA_VARIANTS']

#: variant -> (kernel size, channels per conv group (None = depthwise), GroupNorm groups)
ELA_VARIANTS = {'T': (5, None, 32), 'B': (7, None, 16), 'S': (5, 8, 16), 'L': (7, 8, 16)}


class ELA(nn.Module):
    """Efficient Local Attention.

    Args:
        channels: input channels C.
        variant: 'T', 'B', 'S' or 'L' (see :data:`ELA_VARIANTS`).
        kernel_size, groups, gn_groups: override the variant's conv kernel, conv groups (C for
            depthwise, C/8 for S/L) and GroupNorm groups. ``groups`` and ``gn_groups`` must divide C.
        inplace: when gradients are off, scale the input tensor in place (set by the models, where the
            input is a block's private intermediate). Never used when autograd records.
    """

    _abbr_ = 'ela'  # name in mmdet ResNet blocks (mmcv plugin abbreviation)

    def __init__(
            self,
            channels: int,
            variant: str = 'B',
            kernel_size: Optional[int] = None,
            groups: Optional[int] = None,
            gn_groups: Optional[int] = None,
            inplace: bool = False,
            device=None,
            dtype=None,
            **kwargs,
    ):
        super().__init__()
        _reject_unknown('ELA', kwargs)
        if variant not in ELA_VARIANTS:
            raise ValueError(f'variant={variant!r}: expected one of {sorted(ELA_VARIANTS)}')
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f'channels={channels!r}: expected a positive int')
        k, per_group, gn = ELA_VARIANTS[variant]
        kernel_size = k if kernel_size is None else kernel_size
        if groups is None:
            groups = channels if per_group is None else channels // per_group
        gn_groups = gn if gn_groups is None else gn_groups
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size={kernel_size!r}: expected a positive odd int (keeps the strip length)')
        if not isinstance(groups, int) or groups < 1 or channels % groups:
            raise ValueError(f'groups={groups!r}: expected a positive divisor of channels={channels} '
                             f'(ELA-{variant} conv groups)')
        if not isinstance(gn_groups, int) or gn_groups < 1 or channels % gn_groups:
            raise ValueError(f'gn_groups={gn_groups!r}: expected a positive divisor of channels={channels} '
                             f'(ELA-{variant} GroupNorm groups); pick another variant or pass gn_groups=')
        dd = dict(device=device, dtype=dtype)
        self.inplace = inplace
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, groups=groups,
                              bias=False, **dd)
        self.gn = nn.GroupNorm(gn_groups, channels, **dd)

    def strip_attention(self, strip: torch.Tensor) -> torch.Tensor:
        """``sigmoid(GN(conv(strip)))`` on a ``[B, C, L]`` strip."""
        return torch.sigmoid(self.gn(self.conv(strip)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_h = self.strip_attention(mean_over(x, [3])).unsqueeze(3)        # [B, C, H, 1]
        a_w = self.strip_attention(mean_over(x, [2])).unsqueeze(2)        # [B, C, 1, W]
        if self.inplace and not torch.is_grad_enabled():
            return x.mul_(a_h).mul_(a_w)
        return x * a_h * a_w
