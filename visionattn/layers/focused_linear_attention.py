"""Focused linear attention (FLatten, Han et al., ICCV 2023, arXiv:2308.00442).

For tokens ``(B, N, C)`` of one ``H x W`` window in raster order, with ``k`` already carrying its
learned absolute position encoding, the official computation (post-2024-05 normalisation) is:

1. ``q, k <- ReLU(.) + 1e-6``, then divided by ``softplus(scale)`` (a ``(1, 1, C)`` parameter);
2. focusing with ``p = 3`` over all ``C`` channels (before the head split):
   ``x <- x**p * ||x|| / ||x**p||``;
3. heads split, ``z = 1 / (q . mean_N(k) + 1e-6)``, ``kv = (k / sqrt(N))^T (v / sqrt(N))``,
   ``out = (q @ kv) * z``;
4. rank restoration: ``out += dwc(v)`` where ``v`` is seen as ``(B * heads, d, H, W)`` and ``dwc`` is
   one depthwise ``k x k`` conv of ``d = C / heads`` channels shared by every head.

Steps 1-3 run in float32 (autocast off), so bf16/fp16 inputs neither overflow the cube nor lose the
normaliser; the result is returned in the input dtype.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models._features_fx import register_notrace_function, register_notrace_module

from .conv_pos_enc import depthwise_conv2d
from .fused_linear import fused_linear
from .padding import exporting

__all__ = ['focused_linear_attention', 'resample_grid_tokens', 'FocusedLinearAttention', 'FocusedLinearBranch']


@register_notrace_function  # the branch depends on the (symbolic) map size
def resample_grid_tokens(tokens: torch.Tensor, grid: Tuple[int, int], size: Tuple[int, int]) -> torch.Tensor:
    """A learned ``(1, gh * gw, C)`` encoding on the ``grid`` resampled bilinearly to ``size`` (unchanged when equal).

    Bilinear without antialiasing and ``align_corners=False``, as the official PVT ``_get_pos_embed``.
    """
    if grid[0] == size[0] and grid[1] == size[1] and not exporting():  # exported: the size stays symbolic
        return tokens
    return resample_abs_pos_embed(
        tokens, new_size=[size[0], size[1]], old_size=[grid[0], grid[1]], num_prefix_tokens=0,
        interpolation='bilinear', antialias=False)


class _Focus(torch.autograd.Function):
    """:func:`_focus` with a closed-form backward that saves only ``x`` and two norms per token.

    With ``y = (ReLU(x) + 1e-6) / s``, ``u = y**p``, ``a = ||y||``, ``b = ||u||``, ``r = a / b`` and ``out = r u``,
    for an output gradient ``g`` and ``c = g . u`` per token::

        dL/dy = p r y**(p-1) g - p (c r / b**2) y**(2p-1) + (c / (a b)) y
        dL/dx = dL/dy / s  where x > 0,      dL/ds = -sum(dL/dy * y / s)

    ``y`` and ``u`` are recomputed in backward (a few passes instead of autograd's saved chain of seven maps).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, p: int) -> torch.Tensor:
        y = torch.addcmul(1e-6 / s, F.relu(x), s.reciprocal())
        a = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        u = y.pow_(p)
        b = torch.linalg.vector_norm(u, dim=-1, keepdim=True)
        ctx.save_for_backward(x, s, a, b)
        ctx.p = p
        return u.mul_(a / b)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, s, a, b = ctx.saved_tensors
        p = ctx.p
        y = torch.addcmul(1e-6 / s, F.relu(x), s.reciprocal())
        y_pm1 = y.pow(p - 1)
        u = y_pm1 * y
        c = torch.einsum('...i,...i->...', g, u).unsqueeze(-1)           # g . u per token (a batched dot)
        r = a / b
        dy = (g * (p * r)).mul_(y_pm1)                                     # p r y^(p-1) g
        dy.addcmul_(u.mul_(y_pm1), c * (-p * r / b ** 2))                 # - p (c r / b^2) y^(2p-1)
        dy.addcmul_(y, c / (a * b))                                       # + (c / (a b)) y
        ds = None
        if ctx.needs_input_grad[1]:
            ds = -(dy * y).sum(dim=tuple(range(dy.ndim - 1)), keepdim=True).reshape(s.shape) / s
        # ReLU's backward as one op (a multiply by the boolean x > 0 costs four times as long)
        dx = torch.ops.aten.threshold_backward(dy.div_(s), x, 0) if ctx.needs_input_grad[0] else None
        return dx, ds, None


@torch.jit.ignore
def _focus_trained(x: torch.Tensor, scale: torch.Tensor, focusing_factor: int) -> torch.Tensor:
    return _Focus.apply(x, scale, focusing_factor)


def _focus(x: torch.Tensor, scale: torch.Tensor, focusing_factor: int) -> torch.Tensor:
    """ReLU + 1e-6, divide by ``scale``, then ``x**p`` rescaled to the norm of ``x`` over the last dim.

    ``(ReLU(x) + 1e-6) / s`` is computed as one ``addcmul``; without autograd the rest runs in place (each pass
    over a fresh map costs as much again in allocation and first touch as in arithmetic), with autograd
    through :class:`_Focus` (TorchScript: plain autograd).
    """
    if not torch.jit.is_scripting() and torch.is_grad_enabled():
        return _focus_trained(x, scale, focusing_factor)
    y = torch.addcmul(1e-6 / scale, F.relu(x), scale.reciprocal())
    norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    y = y.pow(focusing_factor)
    ratio = norm / torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    return y * ratio if torch.is_grad_enabled() else y.mul_(ratio)


def _linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                      num_heads: int, focusing_factor: int) -> torch.Tensor:
    """Steps 1-3 in float32 (float64 inputs stay float64): ``(B, N, C)`` q/k/v -> ``(B, N, C)``.

    ``(k / sqrt(n))^T (v / sqrt(n))`` is computed as ``(k^T v) / n``: equal up to rounding, and in float32 the
    official pre-scaling (which keeps half precision from overflowing) is not needed. The tokens stay in their
    ``(B, N, C)`` layout: each head's products read its ``d`` channels as a strided ``(B, N, d)`` view (a valid
    batched-matmul operand), and the heads' outputs are concatenated once, so no head-major copy of q / k / v is
    made in either direction (they were a fifth of a FLatten-Swin-T layer's training step).
    """
    B, N, C = q.shape
    n = k.shape[1]
    d = C // num_heads
    dt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype  # float64 stays float64
    s = F.softplus(scale.to(dt))
    q = _focus(q.to(dt), s, focusing_factor)
    k = _focus(k.to(dt), s, focusing_factor)
    k_mean = k.mean(dim=1).unflatten(-1, (num_heads, d, 1)).unbind(1)                     # h x (B, d, 1)
    qs = q.unflatten(-1, (num_heads, d)).unbind(2)                                         # h x (B, N, d)
    ks = k.unflatten(-1, (num_heads, d)).unbind(2)
    vs = v.to(dt).unflatten(-1, (num_heads, d)).unbind(2)
    grad = torch.is_grad_enabled()
    outs: List[torch.Tensor] = []
    for i in range(num_heads):
        z = torch.matmul(qs[i], k_mean[i]).add_(1e-6).reciprocal_()                      # (B, N, 1)
        kv = torch.matmul(ks[i].transpose(1, 2), vs[i]).mul_(1. / n)                     # (B, d, d)
        out = torch.matmul(qs[i], kv)
        outs.append(out * z if grad else out.mul_(z))
    return outs[0] if num_heads == 1 else torch.cat(outs, dim=-1)


@torch.jit.ignore
def _linear_attention_autocast_off(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                                   num_heads: int, focusing_factor: int) -> torch.Tensor:
    """:func:`_linear_attention` with autocast disabled (it would run the matmuls in half precision again)."""
    device_type = q.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return _linear_attention(q, k, v, scale, num_heads, focusing_factor)
    with torch.autocast(q.device.type, enabled=False):
        return _linear_attention(q, k, v, scale, num_heads, focusing_factor)


def focused_linear_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: torch.Tensor,
        dwc_weight: torch.Tensor,
        dwc_bias: Optional[torch.Tensor],
        num_heads: int,
        grid: Tuple[int, int],
        focusing_factor: int = 3,
) -> torch.Tensor:
    """Focused linear attention of ``(B, N, C)`` tokens of ``B`` windows of ``grid = (H, W)`` -> ``(B, N, C)``.

    ``k`` already includes its position encoding; ``scale`` is the raw ``(1, 1, C)`` parameter
    (softplus applied here); ``dwc_weight`` / ``dwc_bias`` those of the shared depthwise ``k x k`` conv
    over ``C / num_heads`` channels (padding ``k // 2``). No output projection.
    """
    B, N, C = q.shape
    H, W = grid
    if torch.jit.is_scripting():
        out = _linear_attention(q, k, v, scale, num_heads, focusing_factor)
    else:
        out = _linear_attention_autocast_off(q, k, v, scale, num_heads, focusing_factor)
    # the conv shared by the heads as one depthwise conv over all C channels (its d-channel weight repeated per
    # head) on the contiguous channels-last (B, C, H, W) view of v: tokens stay in place, and oneDNN's depthwise
    # conv and its backward take about twice as long on strided or NCHW-contiguous input
    v_img = v.reshape(B, H, W, C).contiguous().permute(0, 3, 1, 2)
    bias = None if dwc_bias is None else dwc_bias.repeat(num_heads)
    rank = depthwise_conv2d(v_img, dwc_weight.repeat(num_heads, 1, 1, 1), bias)
    return out.to(q.dtype) + rank.permute(0, 2, 3, 1).reshape(B, N, C)


@register_notrace_module  # FX leaf: encodings resampled and autocast checked on the (symbolic) input
class FocusedLinearAttention(nn.Module):
    """FLatten token mixer for ``(B, N, C)`` tokens of an ``H x W`` map or window (PVT, PVTv2, Swin).

    Parameters keep the official names: ``qkv`` (or ``q`` + ``kv`` with ``separate_q_kv=True``, the
    PVT form), ``scale`` ``(1, 1, dim)``, ``positional_encoding`` ``(1, gh * gw, dim)`` for the
    training ``grid_size``, ``dwc`` and ``proj``. At another ``(H, W)`` the encoding is resampled
    bilinearly on the fly. There is no attention matrix, so ``attn_drop`` has nothing to act on
    (accepted for the hosts' common mixer signature, as the official module ignores it too).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            qkv_bias: bool = True,
            separate_q_kv: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            focusing_factor: int = 3,
            kernel_size: int = 5,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'dim={dim} must be divisible by num_heads={num_heads}')
        self.num_heads = num_heads
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.focusing_factor = focusing_factor
        head_dim = dim // num_heads
        # exactly one of the two forms exists; the other attribute is None (TorchScript prunes that branch)
        self.qkv = None if separate_q_kv else nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd) if separate_q_kv else None
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd) if separate_q_kv else None
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim, **dd)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim, **dd))
        self.positional_encoding = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], dim, **dd))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        if self.qkv is not None:
            q, k, v = fused_linear(x, self.qkv.weight, self.qkv.bias).reshape(B, N, 3, C).unbind(2)
        else:
            assert self.q is not None and self.kv is not None
            q = fused_linear(x, self.q.weight, self.q.bias)
            k, v = fused_linear(x, self.kv.weight, self.kv.bias).reshape(B, N, 2, C).unbind(2)
        k = k + resample_grid_tokens(self.positional_encoding, self.grid_size, (H, W))
        x = focused_linear_attention(q, k, v, self.scale, self.dwc.weight, self.dwc.bias, self.num_heads, (H, W), self.focusing_factor)
        return self.proj_drop(fused_linear(x, self.proj.weight, self.proj.bias))


@register_notrace_module  # FX leaf, as FocusedLinearAttention
class FocusedLinearBranch(nn.Module):
    """FLatten-CSwin branch: focused linear attention of given q / k / v plus LePE, no projections.

    ``forward(q, k, v, H, W)`` takes ``(B', N, C)`` tokens of ``B'`` windows of ``H x W`` (CSwin's
    stripes, or the whole map) and returns ``(B', N, C)`` = attention + ``dwc(v)`` + ``get_v(v)``
    (``get_v``: LePE, depthwise 3x3 over all ``C`` channels). ``scale`` / ``positional_encoding``
    as in :class:`FocusedLinearAttention`; the focusing runs over the branch width ``C``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            focusing_factor: int = 3,
            kernel_size: int = 5,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'dim={dim} must be divisible by num_heads={num_heads}')
        self.num_heads = num_heads
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.focusing_factor = focusing_factor
        head_dim = dim // num_heads
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim, **dd)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim, **dd))
        self.positional_encoding = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], dim, **dd))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = q.shape
        k = k + resample_grid_tokens(self.positional_encoding, self.grid_size, (H, W))
        x = focused_linear_attention(q, k, v, self.scale, self.dwc.weight, self.dwc.bias, self.num_heads, (H, W), self.focusing_factor)
        lepe = self.get_v(v.transpose(1, 2).reshape(B, C, H, W)).reshape(B, C, N).transpose(1, 2)
        return x + lepe
