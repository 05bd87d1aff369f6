"""Self-attention inside non-overlapping windows, and the window partition it is built on.

* :func:`window_partition` / :func:`window_reverse`: an NHWC map to ``(B * nW, wh * ww, C)`` window
  tokens and back, with bottom/right zero padding to whole windows and an optional cyclic shift (Swin).
* :class:`WindowAttention`: plain softmax attention in square windows, no position bias, no shift
  (DaViT spatial attention, Twins LSA).
* :class:`SwinWindowAttention`: Swin W-MSA / SW-MSA on window tokens, with a learned relative position
  bias; :func:`shift_window_mask` gives the mask of the shifted windows.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models._features_fx import register_notrace_function, register_notrace_module

from ._na_backends import table_cache
from .fused_linear import fused_linear
from .padding import crop_to, exporting, pad_to_multiple
from .weight_init import init_trunc_normal_

__all__ = [
    'window_partition', 'window_reverse', 'shift_window_mask', 'relative_position_index', 'WindowAttention',
    'SwinWindowAttention',
]

Pair = Tuple[int, int]


def _padded(size: int, multiple: int) -> int:
    """``size`` rounded up to a multiple of ``multiple`` (ceil-div form: symbolic sizes stay short)."""
    return (size + multiple - 1) // multiple * multiple


@register_notrace_function  # the padding and shift depend on the (symbolic) map size
def window_partition(x: torch.Tensor, window: Pair, shift: Pair = (0, 0)) -> torch.Tensor:
    """NHWC ``[B, H, W, C]`` -> ``[B * nW, wh * ww, C]`` tokens of ``window = (wh, ww)`` windows.

    The map is zero-padded bottom/right to whole windows, then rolled by ``-shift`` (Swin's cyclic
    shift, after the padding as in Swin's detection backbone). Windows are in raster order per image,
    tokens in raster order per window.
    """
    B, H, W, C = x.shape
    wh, ww = window
    Hp, Wp = _padded(H, wh), _padded(W, ww)
    if exporting() or Hp > H or Wp > W:
        x = F.pad(x, [0, 0, 0, Wp - W, 0, Hp - H])
    if shift[0] > 0 or shift[1] > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nh, nw = x.shape[1] // wh, x.shape[2] // ww
    return x.reshape(B, nh, wh, nw, ww, C).transpose(2, 3).reshape(B * nh * nw, wh * ww, C)


@register_notrace_function  # the crop and shift depend on the (symbolic) map size
def window_reverse(windows: torch.Tensor, window: Pair, shift: Pair, B: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition` for a batch of ``B`` ``H x W`` maps: windows -> NHWC ``[B, H, W, C]``.

    ``B`` is given, not derived from the window count: a derived batch is a size expression a dynamic-shape
    export cannot simplify (the graph then fails at another input size), and an empty batch has no -1.
    """
    wh, ww = window
    Hp, Wp = _padded(H, wh), _padded(W, ww)
    nh, nw = Hp // wh, Wp // ww
    C = windows.shape[-1]
    x = windows.reshape(B, nh, nw, wh, ww, C).transpose(2, 3).reshape(B, Hp, Wp, C)
    if shift[0] > 0 or shift[1] > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return crop_to(x, H, W)


def _shift_regions(length: int, size: int, shift: int, device: torch.device) -> torch.Tensor:
    """Swin's slices ``(0, -size), (-size, -shift), (-shift, None)`` of a padded axis as labels 0 / 1 / 2."""
    i = torch.arange(length, device=device)
    label = (i >= length - size).long()
    if shift > 0:
        label = label + (i >= length - shift).long()
    return label


def _build_shift_window_mask(Hp: int, Wp: int, window: Pair, shift: Pair, device: torch.device) -> torch.Tensor:
    """See :func:`shift_window_mask`; ``Hp x Wp`` is the padded map."""
    wh, ww = window
    label = _shift_regions(Hp, wh, shift[0], device)[:, None] * 3 + _shift_regions(Wp, ww, shift[1], device)[None, :]
    nh, nw = Hp // wh, Wp // ww
    label = label.reshape(nh, wh, nw, ww).transpose(1, 2).reshape(nh * nw, wh * ww)
    mask = torch.zeros(nh * nw, wh * ww, wh * ww, device=device)
    return mask.masked_fill(label[:, None, :] != label[:, :, None], -100.)


_cached_shift_window_mask = table_cache(32)(_build_shift_window_mask)


def shift_window_mask(H: int, W: int, window: Pair, shift: Pair, device: torch.device) -> torch.Tensor:
    """``[nW, N, N]`` additive mask (0 / -100, Swin's values) of the windows :func:`window_partition`
    makes of an ``H x W`` map with this ``window`` and ``shift``.

    Tokens that the cyclic shift brought together from different regions of the (padded) map do not
    attend to each other; padded tokens are not masked (Swin detection, timm). Cached per size and device.
    """
    Hp, Wp = _padded(H, window[0]), _padded(W, window[1])
    if torch.jit.is_scripting():
        return _build_shift_window_mask(Hp, Wp, window, shift, device)
    if exporting():  # symbolic sizes cannot key a cache; the ops are traced instead
        return _build_shift_window_mask(Hp, Wp, window, shift, device)
    return _cached_shift_window_mask(Hp, Wp, window, shift, device)


def _build_relative_position_index(window: Pair, table_window: Pair, device: torch.device) -> torch.Tensor:
    """See :func:`relative_position_index`."""
    wh, ww = window
    th, tw = table_window
    rows = torch.arange(wh, device=device).repeat_interleave(ww)
    cols = torch.arange(ww, device=device).repeat(wh)
    dr = rows[:, None] - rows[None, :] + th - 1
    dc = cols[:, None] - cols[None, :] + tw - 1
    return (dr * (2 * tw - 1) + dc).reshape(-1)


_cached_relative_position_index = table_cache(64)(_build_relative_position_index)


def relative_position_index(window: Pair, table_window: Pair, device: torch.device) -> torch.Tensor:
    """Flat ``[N * N]`` index (``N = wh * ww``) into Swin's ``(2th - 1) * (2tw - 1)`` bias table of a
    ``table_window = (th, tw)`` window, for query ``i`` and key ``j`` of a ``window = (wh, ww)`` no larger.

    Entry ``(i, j)`` addresses the offset ``query - key`` (Swin's ``relative_position_index``); a smaller
    window uses the centre of the table, the biases of the offsets it has. Cached per size and device.
    """
    if torch.jit.is_scripting():
        return _build_relative_position_index(window, table_window, device)
    if exporting():
        return _build_relative_position_index(window, table_window, device)
    return _cached_relative_position_index(window, table_window, device)


# A leaf for torch.fx feature extraction: the padding branches on the (symbolic) map size.
@register_notrace_module
class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping ``window_size``^2 windows.

    Input/output NHWC ``[B, H, W, C]``. Maps that are not multiples of the window are zero-padded
    bottom/right *before* ``qkv`` (padded tokens take part in the attention, unmasked, as in the
    official DaViT and the Twins detection code) and cropped afterwards. No relative position bias,
    no shift. Attention runs through ``scaled_dot_product_attention``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'dim={dim} must be divisible by num_heads={num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        # the partition inline, not window_partition / window_reverse: sizes taken from the padded tensor keep
        # a dynamic-size export valid at other sizes (Twins' test fails with the sizes recomputed from H, W)
        x = pad_to_multiple(x, ws, channels_last=True)
        Hp, Wp = x.shape[1], x.shape[2]
        nh, nw = Hp // ws, Wp // ws
        windows = x.reshape(B, nh, ws, nw, ws, C).transpose(2, 3).reshape(B * nh * nw, ws * ws, C)
        # explicit sizes, no -1: a reshape cannot infer a dimension of an empty (batch 0) tensor
        qkv = fused_linear(windows, self.qkv.weight, self.qkv.bias)
        qkv = qkv.reshape(B * nh * nw, ws * ws, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        out = out.transpose(1, 2).reshape(B, nh, nw, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        # per-token projection, after the crop
        return self.proj_drop(fused_linear(crop_to(out, H, W), self.proj.weight, self.proj.bias))


class SwinWindowAttention(nn.Module):
    """Swin W-MSA / SW-MSA on window tokens: softmax attention + learned relative position bias.

    ``forward(x, H, W, mask)`` takes ``[B * nW, H * W, C]`` tokens of ``H x W`` windows (from
    :func:`window_partition`) and returns the same shape; ``mask`` is ``None`` or the ``[nW, N, N]``
    additive :func:`shift_window_mask` of the windows of one image. Parameters keep Swin's names:
    ``qkv``, ``relative_position_bias_table`` ``[(2wh - 1) * (2ww - 1), heads]`` for
    ``window_size = (wh, ww)`` (trunc_normal 0.02), ``proj``. Windows smaller than ``window_size``
    (maps smaller than the window) use the centre of the table. The relative position index is not a
    buffer (the official persistent one is dropped on load): it is cached per window size.

    Bias and mask go to ``scaled_dot_product_attention`` as one float mask, with the windows of an
    image merged into the head axis so the mask broadcasts over the batch without a copy.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Pair, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'dim={dim} must be divisible by num_heads={num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.window_size = (int(window_size[0]), int(window_size[1]))
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads, **dd))
        init_trunc_normal_(self.relative_position_bias_table, std=.02)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f'window_size={self.window_size}, num_heads={self.num_heads}'

    def position_bias(self, H: int, W: int) -> torch.Tensor:
        """``[heads, N, N]`` relative position bias of an ``H x W`` window (at most ``window_size``)."""
        index = relative_position_index((H, W), self.window_size, self.relative_position_bias_table.device)
        N = H * W
        return self.relative_position_bias_table.index_select(0, index).reshape(N, N, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, H: int, W: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        Bw, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        bias = self.position_bias(H, W)
        nW = 1
        if mask is not None:
            nW = mask.shape[0]
            bias = bias.unsqueeze(0) + mask.unsqueeze(1)                                  # [nW, h, N, N]
        B = Bw // nW
        # one GEMM for every window; q/k/v [B, nW * h, N, d], the mask [nW * h, N, N] broadcast over B
        qkv = fused_linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.reshape(B, nW, N, 3, h, d).permute(3, 0, 1, 4, 2, 5).reshape(3, B, nW * h, N, d).unbind(0)
        attn_mask = bias.reshape(nW * h, N, N).to(q.dtype)
        if torch.is_grad_enabled() and q.device.type == 'cpu':
            # CPU SDPA with a float mask takes its math path under autograd (an -inf-safe softmax costing extra
            # passes over the logits): matmul -> softmax -> matmul directly is faster to train
            attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1) + attn_mask, dim=-1)
            out = F.dropout(attn, self.attn_drop, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask.expand(B, nW * h, N, N),
                dropout_p=self.attn_drop if self.training else 0., scale=self.scale)
        if exporting():  # the exporter decomposes SDPA into ops with another output layout than the traced kernel
            out = out.clone(memory_format=torch.contiguous_format)
        out = out.reshape(Bw, h, N, d).transpose(1, 2).reshape(Bw, N, C)
        return self.proj_drop(fused_linear(out, self.proj.weight, self.proj.bias))
