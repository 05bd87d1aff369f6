"""Channel ("channel-group") self-attention of DaViT (Ding et al., ECCV 2022).

Tokens attend over channels instead of positions: inside each of ``num_heads`` channel groups of
``head_dim`` channels, a ``head_dim x head_dim`` affinity is computed over *all* N tokens, so the
cost is linear in N and every output channel sees the whole image.

Role order and scale follow the released code (and its checkpoints), not the paper's notation:
``q, k, v`` are the three chunks of ``qkv`` in that order, ``k`` is scaled by ``head_dim ** -0.5``,
the affinity is ``A = softmax(k^T v)`` (softmax over its last dim), and the **q chunk acts as the
values**: ``out = (A q^T)^T = q A^T``. Writing ``softmax(q^T k) v^T`` instead gives different
outputs for the released weights.
"""
import torch
import torch.nn as nn

__all__ = ['ChannelAttention', 'channel_attention']


def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """DaViT channel attention on token-major tensors.

    Args:
        q, k, v: ``[B, N, heads, head_dim]`` (views into one ``qkv`` projection are fine).
        scale: multiplies ``k`` (``head_dim ** -0.5`` in DaViT).

    Returns:
        ``[B, N, heads, head_dim]``: ``out[b, n, h, i] = sum_j q[b, n, h, j] * A[b, h, i, j]``
        with ``A[b, h] = softmax_j(scale * k[b, :, h]^T @ v[b, :, h])``.
    """
    # k^T v per head: [B, heads, d, d]; the scale is applied to the d x d product (k * s)^T v == s (k^T v)
    attn = torch.einsum('bnhi,bnhj->bhij', k, v).mul_(scale).softmax(dim=-1)
    # q plays the values: out = q A^T, produced directly in token-major layout
    return torch.einsum('bnhj,bhij->bnhi', q, attn)


class ChannelAttention(nn.Module):
    """DaViT channel attention over channels-last tokens.

    Input/output ``[B, ..., C]`` (e.g. NHWC ``[B, H, W, C]`` or ``[B, N, C]``); all dims between the
    batch and the channels are tokens. ``qkv`` and ``proj`` are named as in the DaViT checkpoints.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
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
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        B, C = shape[0], shape[-1]
        qkv = self.qkv(x).reshape(B, -1, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)
        out = channel_attention(q, k, v, self.scale).reshape(shape)
        return self.proj_drop(self.proj(out))
