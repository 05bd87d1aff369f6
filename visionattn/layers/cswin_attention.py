"""CSwin's cross-shaped window attention with LePE (Dong et al., "CSWin Transformer: A General
Vision Transformer Backbone with Cross-Shaped Windows", CVPR 2022, arXiv:2107.00652).

A CSwin block (``visionattn.models._cswin``) splits its ``qkv`` channels into two halves: one attends
within vertical stripes (full height x ``split`` columns), the other within horizontal stripes
(``split`` rows x full width); a block whose stripe covers the map ("last stage") has one full-width
branch over the whole map. The block cuts the stripes with :func:`stripe_partition` and puts them
back with :func:`stripe_reverse`; a branch (:class:`CSwinAttention` here, or another mixer such as
FLatten's ``FocusedLinearBranch``) only sees the q / k / v tokens of its windows.

Maps that are not multiples of the stripe are zero-padded symmetrically (top / left get ``pad // 2``)
before striping and cropped afterwards, with no mask, as the official CSwin segmentation backbone
does: padded tokens have q = k = v = 0 and take part in the softmax.
"""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models._features_fx import register_notrace_function

from .padding import exporting

__all__ = ['CSwinAttention', 'stripe_partition', 'stripe_reverse']


def _pad(length: int, split: int) -> int:
    """Total zero padding that makes ``length`` a multiple of ``split``."""
    return (length + split - 1) // split * split - length


@register_notrace_function  # the padding depends on the (symbolic) map size
def stripe_partition(x: torch.Tensor, split: int, vertical: bool) -> torch.Tensor:
    """``(B, H, W, *tail)`` map -> ``(B * n, h * w, *tail)`` stripes, raster order inside.

    Vertical stripes are ``H x split`` (``n`` along W), horizontal ones ``split x W`` (``n`` along H);
    the striped axis is first zero-padded symmetrically (``pad // 2`` before) to a multiple of
    ``split``. ``tail`` is any trailing shape (the block passes ``(3, C)``: q, k and v of a branch
    in one gather).
    """
    B, H, W = x.shape[0], x.shape[1], x.shape[2]
    tail = list(x.shape[3:])
    length = W if vertical else H
    p = _pad(length, split)
    if exporting() or p > 0:
        pad = [p // 2, p - p // 2, 0, 0] if vertical else [0, 0, p // 2, p - p // 2]
        x = F.pad(x, [0, 0] * len(tail) + pad)
    n = (length + p) // split
    if vertical:
        x = x.reshape([B, H, n, split] + tail).transpose(1, 2)
        return x.reshape([B * n, H * split] + tail)
    return x.reshape([B * n, split * W] + tail)


@register_notrace_function  # the crop depends on the (symbolic) map size
def stripe_reverse(x: torch.Tensor, H: int, W: int, split: int, vertical: bool) -> torch.Tensor:
    """Inverse of :func:`stripe_partition` for ``(B * n, h * w, C)`` stripes -> ``(B, H, W, C)``.

    The padding is cropped off (the result is then a view, not contiguous).
    """
    C = x.shape[-1]
    length = W if vertical else H
    p = _pad(length, split)
    n = (length + p) // split
    B = x.shape[0] // n  # explicit sizes: a reshape cannot infer -1 for an empty batch
    if vertical:
        x = x.reshape(B, n, H, split, C).transpose(1, 2).reshape(B, H, length + p, C)
    else:
        x = x.reshape(B, length + p, W, C)
    axis = 2 if vertical else 1
    if exporting():  # a slice from a symbolic start would fix the graph to the traced padding
        x = x.index_select(axis, torch.arange(p // 2, p // 2 + length, device=x.device))
    elif p > 0:
        x = x.narrow(axis, p // 2, length)
    return x


class CSwinAttention(nn.Module):
    """One CSwin branch: per-head softmax attention (scale ``head_dim ** -0.5``, SDPA) plus LePE.

    ``forward(q, k, v, H, W)`` takes ``(B', H * W, C)`` tokens of ``B'`` windows of ``H x W`` (stripes
    or the whole map, raster order; ``C = dim``, the branch width) and returns ``(B', H * W, C)`` =
    ``softmax(q k^T / sqrt(d)) v`` + ``get_v(v)``, where ``get_v`` (LePE, the official name) is a
    depthwise 3x3 conv over the ``C`` channels of each window (zero padding at window borders).
    No projections (they belong to the block). ``grid_size`` (the window at the training size) is
    accepted for the host's mixer-factory signature and not needed: nothing here is sized by it.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int] = (0, 0),
            attn_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim={dim} must be divisible by num_heads={num_heads}')
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, device=device, dtype=dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = q.shape
        lepe = self.get_v(v.transpose(1, 2).reshape(B, C, H, W)).reshape(B, C, N).transpose(1, 2)
        d = C // self.num_heads
        q = q.reshape(B, N, self.num_heads, d).transpose(1, 2)
        k = k.reshape(B, N, self.num_heads, d).transpose(1, 2)
        v = v.reshape(B, N, self.num_heads, d).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        return x.transpose(1, 2).reshape(B, N, C) + lepe
