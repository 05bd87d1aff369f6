"""Depthwise convolutions on NHWC maps: ``x + depthwise_conv(x)`` position encodings (DaViT CPE, CPVT/Twins PEG)
and the plain depthwise conv of LePE branches (PPMA, BiFormer)."""
import torch
import torch.nn as nn


class ConvPosEnc(nn.Module):
    """Residual depthwise convolution on an NHWC map ``[B, H, W, C]``.

    The permute to NCHW is a strided view (channels-last memory), so no copy is made around the
    convolution. The conv is named ``proj``, as in DaViT and Twins checkpoints.
    """

    def __init__(self, dim: int, kernel_size: int = 3, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Conv2d(
            dim, dim, kernel_size, 1, kernel_size // 2, groups=dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class DepthwiseConvNHWC(nn.Module):
    """Depthwise k x k conv (with bias) applied to an NHWC map ``[B, H, W, C]`` (the permutes are channels-last
    views); the conv is named ``conv``."""

    def __init__(self, dim: int, kernel_size: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
