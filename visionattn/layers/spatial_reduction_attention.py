"""Spatial-reduction attention (PVT "SRA", Twins "GSA").

Queries come from every token; keys and values come from a map that a strided convolution
(kernel = stride = ``sr_ratio``) has shrunk, followed by a LayerNorm. With ``sr_ratio=1`` it is
plain global multi-head self-attention and the module has no ``sr``/``norm`` submodules, which
matches the official PVT and Twins checkpoints (their last stage has no ``sr``/``norm`` keys).
"""
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fused_linear import fused_linear


class SpatialReductionAttention(nn.Module):
    """Multi-head attention with spatially reduced keys/values, on an NHWC map ``[B, H, W, C]``.

    Submodules (official key names): ``q`` Linear(C, C), ``kv`` Linear(C, 2C), ``proj`` Linear(C, C)
    and, when ``sr_ratio > 1``, ``sr`` Conv2d(C, C, sr_ratio, stride=sr_ratio) and ``norm``
    (``norm_layer(C)``, LayerNorm with eps 1e-5 by default, as in PVT and Twins).

    Maps whose size is not a multiple of ``sr_ratio`` are reduced with floor division (the
    convolution drops the remainder), as in the official code. The output has the input's shape.
    Attention runs through ``scaled_dot_product_attention`` (scale ``head_dim ** -0.5``).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            sr_ratio: int = 1,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Optional[Callable[..., nn.Module]] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'dim={dim} must be divisible by num_heads={num_heads}')
        if sr_ratio < 1:
            raise ValueError(f'sr_ratio={sr_ratio} must be >= 1')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            norm_layer = norm_layer or nn.LayerNorm
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, **dd)
            self.norm = norm_layer(dim, **dd)
        else:
            # plain attributes (not submodules): no state_dict keys, and TorchScript can refine them
            self.sr = None
            self.norm = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q = fused_linear(x, self.q.weight, self.q.bias).reshape(B, H * W, self.num_heads, self.head_dim).transpose(1, 2)
        sr = self.sr
        norm = self.norm
        if sr is not None and norm is not None:
            # NHWC -> NCHW is a view with channels-last strides; the conv keeps that memory format,
            # so the permute back and the flatten are views as well.
            kv_in = sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).flatten(1, 2)
            kv_in = norm(kv_in)
        else:
            kv_in = x.reshape(B, H * W, C)
        # the key count given, not -1: a reshape cannot infer a dimension of an empty (batch 0) tensor
        kv = fused_linear(kv_in, self.kv.weight, self.kv.bias)
        kv = kv.reshape(B, kv_in.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        x = x.transpose(1, 2).reshape(B, H, W, C)
        return self.proj_drop(fused_linear(x, self.proj.weight, self.proj.bias))

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, sr_ratio={self.sr_ratio}'
