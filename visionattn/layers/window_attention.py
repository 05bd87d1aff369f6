"""Non-overlapping window self-attention without position bias (DaViT spatial, Twins LSA)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models._features_fx import register_notrace_module

from .padding import crop_to, pad_to_multiple


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
        x = pad_to_multiple(x, ws, channels_last=True)
        Hp, Wp = x.shape[1], x.shape[2]
        nh, nw = Hp // ws, Wp // ws
        # [B, nh, ws, nw, ws, C] -> [B*nh*nw, ws*ws, C]
        windows = x.reshape(B, nh, ws, nw, ws, C).transpose(2, 3).reshape(B * nh * nw, ws * ws, C)
        # explicit sizes, no -1: a reshape cannot infer a dimension of an empty (batch 0) tensor
        qkv = self.qkv(windows).reshape(B * nh * nw, ws * ws, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        out = out.transpose(1, 2).reshape(B, nh, nw, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        return self.proj_drop(self.proj(crop_to(out, H, W)))  # per-token projection, after the crop
