"""Channel ("channel-group") self-attention of DaViT (Ding et al., ECCV 2022).

Tokens attend over channels instead of positions: inside each of ``num_heads`` channel groups of
``head_dim`` channels, a ``head_dim x head_dim`` affinity is computed over *all* N tokens, so the
cost is linear in N and every output channel sees the whole image.

Role order and scale follow the released code (and its checkpoints), not the paper's notation:
``q, k, v`` are the three chunks of ``qkv`` in that order, ``k`` is scaled by ``head_dim ** -0.5``,
the affinity is ``A = softmax(k^T v)`` (softmax over its last dim), and the **q chunk acts as the
values**: ``out = (A q^T)^T = q A^T``. Writing ``softmax(q^T k) v^T`` instead gives different
outputs for the released weights.

Two exact evaluations of the same function are provided:

* :func:`channel_attention` -- the literal one: project q, k, v for every token, then the two
  small per-head products.
* :func:`folded_channel_attention` -- every step after ``qkv`` is linear in the tokens except the
  softmax over a ``d x d`` matrix, so with ``x~ = [x, 1]`` (bias as an extra input channel):
  ``k_h^T v_h = Wk~_h (x~^T x~) Wv~_h^T`` and ``proj(q A^T) = x~ (Wp blockdiag(A) Wq~)^T + b_p``.
  It needs one ``C x C`` Gram matrix per image and one ``N x C x C`` product instead of four
  ``N x C x C`` projections and the ``[N, 3C]`` activations, which is ~2-3x fewer FLOPs whenever
  the tokens outnumber the channels (DaViT stages 1-2 at 224^2, and more at detection sizes).
  It agrees with the literal form to fp32 round-off, but that round-off is 2-4x larger (the Gram
  products sum large terms that cancel), so it is opt-in (``ChannelAttention(fold=True)``).
"""
from typing import Optional

import torch
import torch.nn as nn
from timm.models._features_fx import register_notrace_module

from .fused_linear import fused_linear

__all__ = ['ChannelAttention', 'channel_attention', 'folded_channel_attention']


def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """DaViT channel attention on token-major tensors (the literal form).

    Args:
        q, k, v: ``[B, N, heads, head_dim]`` (views into one ``qkv`` projection are fine).
        scale: multiplies ``k`` (``head_dim ** -0.5`` in DaViT).

    Returns:
        ``[B, N, heads, head_dim]``: ``out[b, n, h, i] = sum_j q[b, n, h, j] * A[b, h, i, j]``
        with ``A[b, h] = softmax_j(scale * k[b, :, h]^T @ v[b, :, h])``.
    """
    # k^T v per head: [B, heads, d, d]; the scale goes on the d x d product: (k * s)^T v == s (k^T v)
    attn = torch.einsum('bnhi,bnhj->bhij', k, v).mul(scale).softmax(dim=-1)
    # q plays the values: out = q A^T, produced directly in token-major layout
    return torch.einsum('bnhj,bhij->bnhi', q, attn)


def folded_channel_attention(
        x: torch.Tensor,
        qkv_weight: torch.Tensor,
        qkv_bias: Optional[torch.Tensor],
        proj_weight: torch.Tensor,
        proj_bias: Optional[torch.Tensor],
        num_heads: int,
        scale: float,
) -> torch.Tensor:
    """``proj(channel_attention(qkv(x)))`` for ``x: [B, N, C]`` without materialising q, k, v.

    Exactly the function of :class:`ChannelAttention` (same role order and scale); see the module
    docstring for the algebra. Returns ``[B, N, C]``.
    """
    B, N, C = x.shape
    d = C // num_heads
    if qkv_bias is None:
        qkv_bias = qkv_weight.new_zeros(3 * C)
    # augmented Gram matrix of x~ = [x, 1]: [[x^T x, x^T 1], [1^T x, N]]
    s = x.sum(1, keepdim=True)                                            # [B, 1, C]
    gram = torch.cat([
        torch.cat([torch.bmm(x.transpose(1, 2), x), s.transpose(1, 2)], 2),
        torch.cat([s, s.new_full((B, 1, 1), float(N))], 2),
    ], 1)                                                                 # [B, C+1, C+1]
    w_aug = torch.cat([qkv_weight, qkv_bias.unsqueeze(1)], 1)             # [3C, C+1]
    wq, wk, wv = w_aug.reshape(3, num_heads, d, C + 1).unbind(0)          # [heads, d, C+1] each
    # A_h = softmax(scale * k_h^T v_h),  k_h^T v_h = Wk~_h G Wv~_h^T
    kg = torch.matmul(wk.reshape(C, C + 1), gram).reshape(B, num_heads, d, C + 1)
    attn = torch.matmul(kg, wv.transpose(1, 2)).mul(scale).softmax(dim=-1)  # [B, heads, d, d]
    # y = Wp (A_h q_h)_h + bp = (Wp blockdiag(A) Wq~) x~ + bp
    aq = torch.matmul(attn, wq).reshape(B, C, C + 1)                     # blockdiag(A) Wq~
    m = torch.matmul(proj_weight, aq)                                    # [B, C, C+1]
    bias = m[:, :, C]
    if proj_bias is not None:
        bias = bias + proj_bias
    return torch.baddbmm(bias.unsqueeze(1), x, m[:, :, :C].transpose(1, 2))


@register_notrace_module  # FX leaf: the evaluation form is chosen from the (symbolic) token count
class ChannelAttention(nn.Module):
    """DaViT channel attention over channels-last tokens.

    Input/output ``[B, ..., C]`` (e.g. NHWC ``[B, H, W, C]`` or ``[B, N, C]``); all dims between the
    batch and the channels are tokens. ``qkv`` and ``proj`` are named as in the DaViT checkpoints.

    Args:
        dim: channels.
        num_heads: channel groups.
        qkv_bias: bias on ``qkv``.
        proj_drop: dropout after ``proj``.
        fold: evaluate with :func:`folded_channel_attention` when the tokens are at least as many
            as the channels (fewer FLOPs, same function, 2-4x the fp32 round-off of the literal form);
            the default ``False`` always uses the literal form.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            fold: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'dim={dim} must be divisible by num_heads={num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fold = fold
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, shortcut: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``proj(attention(x))``, plus ``shortcut`` (same shape as ``x``) when given.

        Passing the residual lets it be fused into the output projection at inference.
        """
        shape = x.shape
        B, C = shape[0], shape[-1]
        # flatten, not reshape(B, -1, C): the token count of an empty (batch 0) tensor cannot be inferred
        x = x.flatten(1, -2)
        N = x.shape[1]
        fuse_residual = shortcut is not None and not (self.training and self.proj_drop.p > 0)
        residual = shortcut.reshape(x.shape) if fuse_residual and shortcut is not None else None
        if self.fold and N >= C:
            out = folded_channel_attention(
                x, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias, self.num_heads, self.scale)
            if residual is not None:
                out = out.add_(residual)  # baddbmm's backward does not need its output
        else:
            qkv = fused_linear(x, self.qkv.weight, self.qkv.bias).reshape(B, N, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.unbind(2)
            out = channel_attention(q, k, v, self.scale).reshape(x.shape)
            out = fused_linear(out, self.proj.weight, self.proj.bias, residual=residual)
        out = self.proj_drop(out).reshape(shape)
        if shortcut is not None and not fuse_residual:
            out = shortcut + out
        return out
