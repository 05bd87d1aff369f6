"""Patch embeddings and downsamplers shared by the hierarchical hosts (NCHW in, NCHW out).

The norms run over the channels of the channels-last view and leave channels-last memory, so the
NHWC blocks of the following :class:`~visionattn.models._builder.Stage` read it without a copy.
"""
from typing import Callable

import torch
import torch.nn as nn

from visionattn.layers.padding import pad_to_multiple

__all__ = ['NormChannelsLast', 'SwinPatchEmbed', 'PatchMerging', 'ConvNormDownsample']


class NormChannelsLast(nn.Module):
    """Base of the stems and downsamplers: ``self.norm`` applied over the channels of an NCHW map."""

    def _norm_nchw(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SwinPatchEmbed(NormChannelsLast):
    """Swin / DiNAT_s stem: zero-pad to a multiple of the patch, Conv(k = s = patch), LayerNorm."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, norm_layer: Callable = nn.LayerNorm,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, **dd)
        self.norm = norm_layer(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm_nchw(self.proj(pad_to_multiple(x, self.patch_size)))


class PatchMerging(nn.Module):
    """Swin patch merging (Swin hosts, DiNAT_s): zero-pad odd sizes, gather each 2x2 neighbourhood in the order
    (0,0), (1,0), (0,1), (1,1) into 4C channels, LayerNorm(4C), Linear 4C -> 2C without bias."""

    def __init__(self, dim: int, out_dim: int, norm_layer: Callable = nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False, **dd)  # registered first, as the official module
        self.norm = norm_layer(4 * dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(x, 2).permute(0, 2, 3, 1)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x)).permute(0, 3, 1, 2)


class ConvNormDownsample(nn.Module):
    """Conv3x3/s2 (with bias) + BatchNorm2d (PPMA's ``PatchMerging``, BiFormer's downsamplers): NCHW -> NCHW
    in channels-last memory."""

    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None):
        super().__init__()
        self.reduction = nn.Conv2d(in_chs, out_chs, 3, 2, 1, device=device, dtype=dtype)
        self.norm = nn.BatchNorm2d(out_chs, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x)).contiguous(memory_format=torch.channels_last)
