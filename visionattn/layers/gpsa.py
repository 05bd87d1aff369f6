"""Gated positional self-attention (GPSA), ConViT (d'Ascoli et al., ICML 2021, arXiv 2103.10697).

For a map of ``H x W`` tokens (N = H*W) and h heads::

    content    = softmax(q k^T / sqrt(d))                          [B, h, N, N]
    positional = softmax(pos_proj(rel_indices))                    [h, N, N]  (input independent)
    attn       = (1 - sigmoid(g)) * content + sigmoid(g) * positional,   g = gating_param  [h]
    attn       = attn / attn.sum(-1)                               (renormalisation, as the official code)
    out        = proj(attn @ v)

``rel_indices[n, m] = [dx, dy, dx^2 + dy^2]`` with ``dx = x_m - x_n``, ``dy = y_m - y_n`` (key minus query,
row-major token order). The positional attention does not depend on the input, so it is computed once per
forward as ``[h, N, N]`` (the official code and timm build it as ``[B, h, N, N]``). It is not cached across
forwards, so gradients reach ``pos_proj`` and ``gating_param`` as usual; only the integer ``rel_indices``
are cached (non-persistent buffer, rebuilt when the grid changes).

Fast path (``fused_attn`` and no attention dropout): the content branch runs through
``scaled_dot_product_attention`` and the positional branch is one ``bmm`` per head over the whole batch::

    out = a * SDPA(q, k, v) + P' @ v,   a = (1 - s) / r,   P' = s * positional / r
    r   = (1 - s) + s * positional.sum(-1)

``r`` is the renormalising row sum, taking the content softmax's row sum as 1 (its exact value up to rounding).
The explicit path (attention dropout in training, or ``fused_attn`` off) materialises ``attn`` and follows the
official formula literally.

Input is NHWC ``[B, H, W, C]`` (the grid is read from the shape, any H and W) or NLC ``[B, N, C]`` (N must then
be a perfect square, as in the official code). The output has the input's shape.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import use_fused_attn

__all__ = ['GPSA', 'gpsa_rel_indices', 'gpsa_local_init_weight']


def gpsa_rel_indices(
        height: int,
        width: int,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``[N, N, 3]`` relative offsets ``[dx, dy, dx^2 + dy^2]`` (key minus query) of an ``height x width`` grid."""
    ys = torch.arange(height, device=device, dtype=torch.float32)
    xs = torch.arange(width, device=device, dtype=torch.float32)
    grid_y = ys.view(-1, 1).expand(height, width).reshape(-1)  # row-major token order
    grid_x = xs.view(1, -1).expand(height, width).reshape(-1)
    dx = grid_x.view(1, -1) - grid_x.view(-1, 1)  # [query, key]
    dy = grid_y.view(1, -1) - grid_y.view(-1, 1)
    rel = torch.stack([dx, dy, dx * dx + dy * dy], dim=-1)
    if dtype is not None:
        rel = rel.to(dtype=dtype)
    return rel


def gpsa_local_init_weight(num_heads: int, locality_strength: float = 1.0) -> torch.Tensor:
    """The ``[num_heads, 3]`` ``pos_proj.weight`` of ConViT's locality initialisation.

    Heads form a k x k grid (k = floor(sqrt(num_heads))); the head at grid position (h1, h2) is row
    ``h1 + k * h2`` and gets ``strength * [2 (h2 - c), 2 (h1 - c), -1]`` with centre c = (k - 1) / 2 for even k,
    k // 2 for odd k. Rows beyond k*k (a non-square head count) are returned as NaN: the caller keeps them.
    """
    k = int(num_heads ** .5)
    center = (k - 1) / 2 if k % 2 == 0 else k // 2
    weight = torch.full((num_heads, 3), float('nan'))
    for h1 in range(k):
        for h2 in range(k):
            weight[h1 + k * h2] = torch.tensor([2. * (h2 - center), 2. * (h1 - center), -1.])
    return weight * locality_strength


class GPSA(nn.Module):
    """Gated positional self-attention; state-dict keys ``gating_param, qk, v, proj, pos_proj`` as the official code."""

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            locality_strength: float = 1.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'GPSA: dim={dim} is not divisible by num_heads={num_heads}')
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.locality_strength = locality_strength
        self.fused_attn = use_fused_attn()

        self.gating_param = nn.Parameter(torch.ones(num_heads, **dd))
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.pos_proj = nn.Linear(3, num_heads, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        # cached [N, N, 3] relative indices of a (rel_height x rel_width) grid; not in the state dict
        self.register_buffer('rel_indices', torch.zeros(0, 0, 3, **dd), persistent=False)
        self.rel_height = 0
        self.rel_width = 0

    @torch.no_grad()
    def local_init(self) -> None:
        """ConViT's locality init: ``v`` = identity, ``pos_proj`` = Gaussian centred per head, bias 0, gate 1."""
        self.v.weight.copy_(torch.eye(self.dim))
        weight = gpsa_local_init_weight(self.num_heads, self.locality_strength).to(self.pos_proj.weight)
        keep = torch.isnan(weight)
        self.pos_proj.weight.copy_(torch.where(keep, self.pos_proj.weight * self.locality_strength, weight))
        self.pos_proj.bias.zero_()
        self.gating_param.fill_(1.)

    def init_weights(self) -> None:
        """Hook called by :class:`PlainBackbone` after the generic ViT init."""
        self.local_init()

    def init_non_persistent_buffers(self) -> None:
        """Rebuild the cached relative indices (timm's hook, e.g. after materialising a meta-device model)."""
        if self.rel_height > 0:
            self._set_rel_indices(self.rel_height, self.rel_width)

    def _set_rel_indices(self, height: int, width: int) -> None:
        w = self.qk.weight
        self.rel_indices = gpsa_rel_indices(height, width, device=w.device, dtype=w.dtype)
        self.rel_height = height
        self.rel_width = width

    def get_rel_indices(self, height: int, width: int) -> torch.Tensor:
        """``[N, N, 3]`` relative indices for the grid, rebuilt when the grid, device or dtype changes."""
        w = self.qk.weight
        rel = self.rel_indices
        if (height != self.rel_height or width != self.rel_width or rel.device != w.device
                or rel.dtype != w.dtype or (rel.is_inference() and torch.is_grad_enabled())):
            # a tensor made in inference mode cannot be saved for backward: rebuild it outside inference mode
            self._set_rel_indices(height, width)
        return self.rel_indices

    def positional_attention(self, height: int, width: int) -> torch.Tensor:
        """``[h, N, N]`` softmax of the positional scores (input independent; differentiable in pos_proj)."""
        scores = self.pos_proj(self.get_rel_indices(height, width))  # [N, N, h]
        return scores.permute(2, 0, 1).softmax(dim=-1)

    def _grid(self, x: torch.Tensor) -> Tuple[int, int]:
        if x.ndim == 4:
            return x.shape[1], x.shape[2]
        n = x.shape[1]
        side = int(math.sqrt(n) + 0.5)
        if side * side != n:
            raise ValueError(
                f'GPSA: {n} tokens do not form a square grid; pass NHWC [B, H, W, C] input for non-square maps')
        return side, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        height, width = self._grid(x)
        B, C = shape[0], shape[-1]
        N = height * width
        h, d = self.num_heads, self.head_dim
        x = x.reshape(B, N, C)

        q, k = self.qk(x).reshape(B, N, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, N, d]
        v = self.v(x)  # [B, N, C]
        pos = self.positional_attention(height, width)  # [h, N, N]
        gate = torch.sigmoid(self.gating_param)  # [h]

        if self.fused_attn and not (self.training and self.attn_drop.p > 0.):
            gate = gate.view(h, 1)
            row_sum = (1. - gate) + gate * pos.sum(dim=-1)  # [h, N]
            content_w = ((1. - gate) / row_sum).transpose(0, 1).reshape(1, N, h, 1)
            pos_w = pos * (gate / row_sum).unsqueeze(-1)  # [h, N, N]
            content = F.scaled_dot_product_attention(q, k, v.view(B, N, h, d).transpose(1, 2), scale=self.scale)
            # positional branch: per head, [N, N] @ [N, B*d] over the whole batch at once
            v_heads = v.view(B, N, h, d).permute(2, 1, 0, 3).reshape(h, N, B * d)
            positional = torch.bmm(pos_w, v_heads).view(h, N, B, d).permute(2, 1, 0, 3)  # [B, N, h, d]
            out = torch.addcmul(positional, content.transpose(1, 2), content_w)
        else:
            gate = gate.view(1, h, 1, 1)
            content = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            attn = (1. - gate) * content + gate * pos.unsqueeze(0)
            attn = attn / attn.sum(dim=-1, keepdim=True)
            attn = self.attn_drop(attn)
            out = (attn @ v.view(B, N, h, d).transpose(1, 2)).transpose(1, 2)

        out = self.proj(out.reshape(B, N, C))
        out = self.proj_drop(out)
        return out.reshape(shape)

    @torch.jit.ignore
    def get_attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Explicit ``[B, h, N, N]`` gated, renormalised attention (for analysis; no dropout)."""
        height, width = self._grid(x)
        B, C = x.shape[0], x.shape[-1]
        N = height * width
        x = x.reshape(B, N, C)
        q, k = self.qk(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        content = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        gate = torch.sigmoid(self.gating_param).view(1, -1, 1, 1)
        attn = (1. - gate) * content + gate * self.positional_attention(height, width).unsqueeze(0)
        return attn / attn.sum(dim=-1, keepdim=True)
