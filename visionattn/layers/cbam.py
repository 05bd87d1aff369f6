"""CBAM (Woo et al., ECCV 2018) and the Z-pool gate it shares with Triplet Attention.

Input and output are NCHW. The sub-module names are those of the official code
(``Jongchan/attention-module``, ``MODELS/cbam.py``), so its checkpoints load without renaming
inside the module: ``ChannelGate.mlp.{1,3}`` and ``SpatialGate.spatial.{conv,bn}``.

Differences from timm's ``CbamModule`` (which is not the paper's module): the MLP has biases, the
spatial gate pools ``[max, mean]`` in that order, its BatchNorm has momentum 0.01 and starts with
weight 0 (so the gate starts at sigmoid(0) = 0.5), as the official ``ResidualNet`` initialises it.
"""
from typing import Optional

import torch
import torch.nn as nn

from .reduce import max_over, mean_over

torch.fx.wrap('max_over')  # leaves for torch.fx.symbolic_trace too (timm's tracer knows them already)
torch.fx.wrap('mean_over')

__all__ = ['CBAM', 'ChannelGate', 'SpatialGate', 'ConvBN', 'zpool']


def zpool(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``cat([max, mean])`` over ``dim``, stacked at dim 1 (the official ``ChannelPool`` / Z-pool).

    ``x`` is ``[B, C, H, W]``; pooling over ``dim`` 1, 2 or 3 gives ``[B, 2, H, W]``,
    ``[B, 2, C, W]`` or ``[B, 2, C, H]`` (max first, then mean).
    """
    return torch.stack((max_over(x, [dim]), mean_over(x, [dim])), dim=1)


class ConvBN(nn.Module):
    """The official gates' ``BasicConv``: Conv2d(2 -> 1, k x k, pad k // 2, no bias) + BatchNorm2d(1,
    eps 1e-5, momentum 0.01), no activation. The BN weight starts at ``bn_weight_init``."""

    def __init__(self, kernel_size: int = 7, bn_weight_init: float = 1.0, device=None, dtype=None):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size={kernel_size!r}: expected a positive odd int (the gate keeps the map size)')
        dd = dict(device=device, dtype=dtype)
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False, **dd)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01, **dd)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SpatialGate(nn.Module):
    """Z-pool gate: ``x * sigmoid(BN(conv(cat[max_c x, mean_c x])))`` on ``[B, C, H, W]``.

    CBAM's spatial gate; Triplet Attention runs it on three rotations of the input.
    """

    def __init__(self, kernel_size: int = 7, bn_weight_init: float = 1.0, device=None, dtype=None):
        super().__init__()
        self.spatial = ConvBN(kernel_size, bn_weight_init, device=device, dtype=dtype)

    def gate(self, pooled: torch.Tensor) -> torch.Tensor:
        """``sigmoid(BN(conv(pooled)))``: ``[B, 2, P, Q]`` Z-pooled maps -> ``[B, 1, P, Q]`` weights."""
        return torch.sigmoid(self.spatial(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(zpool(x, 1))


class ChannelGate(nn.Module):
    """CBAM channel gate on ``[B, C, H, W]``: ``x * sigmoid(mlp(avg_hw x) + mlp(max_hw x))`` with one
    shared MLP ``Flatten -> Linear(C, C/r) -> ReLU -> Linear(C/r, C)`` (with biases; official
    indices ``mlp.1`` / ``mlp.3``)."""

    def __init__(self, channels: int, reduction: int = 16, device=None, dtype=None):
        super().__init__()
        if not isinstance(reduction, int) or reduction < 1 or channels // reduction < 1:
            raise ValueError(f'reduction={reduction!r}: expected an int in [1, channels={channels}]')
        dd = dict(device=device, dtype=dtype)
        hidden = channels // reduction
        self.mlp = nn.Sequential(
            nn.Flatten(), nn.Linear(channels, hidden, **dd), nn.ReLU(), nn.Linear(hidden, channels, **dd))
        for i in (1, 3):  # official ResidualNet init: biases 0, weights torch's default
            nn.init.zeros_(self.mlp[i].bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The ``[B, C]`` channel weights (one MLP call on the stacked avg- and max-pooled vectors)."""
        b = x.shape[0]
        both = self.mlp(torch.cat((mean_over(x, [2, 3]), max_over(x, [2, 3])), dim=0))
        return torch.sigmoid(both[:b] + both[b:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)[:, :, None, None]


class CBAM(nn.Module):
    """Convolutional Block Attention Module on ``[B, C, H, W]``: channel gate, then spatial gate.

    Args:
        channels: input channels (timm's attention-layer contract: ``attn_layer(channels, **kw)``).
        reduction: MLP reduction ratio r (hidden width ``channels // r``; official 16).
        kernel_size: spatial-gate kernel (official 7).
        no_spatial: channel gate only (official option).
        inplace: when gradients are off, scale the input tensor in place instead of allocating two
            new maps (the models in :mod:`visionattn.models.cnn_attention` set it, where the input
            is a block's private intermediate). Never used when autograd records.
        rd_ratio: timm's name for ``1 / reduction`` (``create_attn`` passes it for SE-style
            modules); overrides ``reduction`` when given.
    """

    _abbr_ = 'cbam'  # name in mmdet ResNet blocks (mmcv plugin abbreviation) = the official block attribute

    def __init__(
            self,
            channels: int,
            reduction: int = 16,
            kernel_size: int = 7,
            no_spatial: bool = False,
            inplace: bool = False,
            rd_ratio: Optional[float] = None,
            device=None,
            dtype=None,
            **kwargs,
    ):
        super().__init__()
        _reject_unknown('CBAM', kwargs)
        if rd_ratio is not None:
            if not 0 < rd_ratio <= 1:
                raise ValueError(f'rd_ratio={rd_ratio!r}: expected a ratio in (0, 1] (1 / reduction)')
            reduction = round(1 / rd_ratio)
        self.inplace = inplace
        self.ChannelGate = ChannelGate(channels, reduction, device=device, dtype=dtype)
        # official init: the spatial BN weight is 0, so the spatial gate starts at 0.5 everywhere
        self.SpatialGate = None if no_spatial else SpatialGate(kernel_size, 0.0, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inplace = self.inplace and not torch.is_grad_enabled()
        ch = self.ChannelGate.attention(x)[:, :, None, None]
        y = x.mul_(ch) if inplace else x * ch
        if self.SpatialGate is None:
            return y
        sp = self.SpatialGate.gate(zpool(y, 1))
        return y.mul_(sp) if inplace else y * sp


def _reject_unknown(name: str, kwargs: dict) -> None:
    """timm's block builders pass ``act_layer`` / ``gate_layer`` to attention layers; the paper modules have
    neither (their nonlinearities are fixed), anything else is an error."""
    unknown = sorted(k for k in kwargs if k not in ('act_layer', 'gate_layer'))
    if unknown:
        raise TypeError(f'{name}: unexpected keyword arguments {unknown}')
