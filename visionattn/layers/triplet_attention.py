"""Triplet Attention, "Rotate to Attend" (Misra et al., WACV 2021).

Input and output are NCHW ``[B, C, H, W]``. Three Z-pool gates (:class:`~visionattn.layers.cbam.SpatialGate`)
each see the input with one axis pooled away: the official code rotates the tensor so that the
pooled axis is dim 1 (``permute(0, 2, 1, 3)`` for the C-W branch ``ChannelGateH``, ``permute(0, 3, 2, 1)``
for the H-C branch ``ChannelGateW``, none for the H-W branch ``SpatialGate``), gates it and rotates back;
the output is the mean of the three gated tensors.

Here the rotations are never materialised: pooling ``x`` over H (W) gives exactly the C-W (H-C) map the
rotated gate pools, and the three small maps (the 1/3 folded in) are broadcast back onto ``x`` in three
passes, ``x * a_hw`` then two in-place ``addcmul_``. Sub-module names are the official ones (``MODELS/triplet_attention.py``,
the names of the released checkpoints): ``ChannelGateH``, ``ChannelGateW``, ``SpatialGate``, each with
``spatial.{conv,bn}``.
"""
import torch
import torch.nn as nn

from .cbam import SpatialGate, _reject_unknown, zpool

__all__ = ['TripletAttention']


class TripletAttention(nn.Module):
    """Triplet Attention.

    Args:
        channels: accepted for timm's attention-layer contract (``attn_layer(channels)``); the module
            has no channel-dependent parameters (3 gates x (2 k^2 + 2) parameters).
        kernel_size: gate kernel (official code: 7; the README also reports k=3 checkpoints).
        no_spatial: drop the H-W branch and average the two rotated ones (official option).
    """

    _abbr_ = 'triplet_attention'  # name in mmdet ResNet blocks (mmcv plugin abbreviation) = the official one

    def __init__(
            self,
            channels: int = 0,
            kernel_size: int = 7,
            no_spatial: bool = False,
            device=None,
            dtype=None,
            **kwargs,
    ):
        super().__init__()
        _reject_unknown('TripletAttention', kwargs)
        dd = dict(device=device, dtype=dtype)
        self.ChannelGateH = SpatialGate(kernel_size, **dd)
        self.ChannelGateW = SpatialGate(kernel_size, **dd)
        # official ResNet init: BN weights whose name contains 'SpatialGate' start at 0
        self.SpatialGate = None if no_spatial else SpatialGate(kernel_size, 0.0, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = 0.5 if self.SpatialGate is None else 1.0 / 3.0  # the mean, folded into the small maps
        # the C-W gate sees [B, 2, C, W] (H pooled), the H-C gate [B, 2, H, C] (W pooled), as rotated officially
        a_cw = self.ChannelGateH.gate(zpool(x, 2)).transpose(1, 2) * weight                        # [B, C, 1, W]
        a_hc = self.ChannelGateW.gate(zpool(x, 3).transpose(2, 3)).permute(0, 3, 2, 1) * weight    # [B, C, H, 1]
        if self.SpatialGate is None:
            out = x * a_cw
        else:
            out = x * (self.SpatialGate.gate(zpool(x, 1)) * weight)                                 # [B, 1, H, W]
            out = out.addcmul_(x, a_cw)  # keep the result: fx's dead-code pass drops an unused in-place call
        return out.addcmul_(x, a_hc)
