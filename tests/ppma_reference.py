"""Naive reference for PPMA (Polyline Path Masked Attention, NeurIPS 2025), used only by the tests.

This follows the official code (zhongchenzhao/PPMA, ``classification/models/PPMA.py`` and
``detection/ppma.py``) step by step, in plain and deliberately slow PyTorch. In whole mode the full
(B, n, L, L) polyline mask is built through (B, n, H, H, W, W) repeats, as the official code does.
Parameter and buffer names match the official ones, so an official state dict loads with
``strict=True``. Nothing in the library imports this file. It is only a fidelity oracle, to be run in
eval mode (no dropout, no drop path).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['PPMARef', 'VARIANTS', 'segment_sum_1d', 'rope_tables', 'theta_shift', 'whole_mask']


VARIANTS = {
    'PPMAViT_T': dict(embed_dims=[64, 128, 256, 512], depths=[2, 2, 8, 2], num_heads=[4, 4, 8, 16],
                      mlp_ratios=[3, 3, 3, 3], chunkwise=[True, True, False, False],
                      layerscales=[False, False, False, False], layer_init_values=1e-6),
    'PPMAViT_S': dict(embed_dims=[64, 128, 256, 512], depths=[3, 4, 18, 4], num_heads=[4, 4, 8, 16],
                      mlp_ratios=[4, 4, 3, 3], chunkwise=[True, True, True, False],
                      layerscales=[False, False, False, False], layer_init_values=1e-6),
    'PPMAViT_B': dict(embed_dims=[80, 160, 320, 512], depths=[4, 8, 25, 8], num_heads=[5, 5, 10, 16],
                      mlp_ratios=[4, 4, 3, 3], chunkwise=[True, True, True, False],
                      layerscales=[False, False, True, True], layer_init_values=1e-6),
}


# ----------------------------------------------------------------------------------------------
# functional pieces
# ----------------------------------------------------------------------------------------------

def segment_sum_1d(a: torch.Tensor) -> torch.Tensor:
    """S[..., i, j] = sum of a[..., t] for t = min(i, j)+1 .. max(i, j). Symmetric, 0 on the diagonal.

    Built as the official ``generate_structed_mask_1d`` does, from cumulative sums and a tril/triu split.
    """
    n = a.shape[-1]
    c = torch.cumsum(a, dim=-1)
    lower = c[..., :, None] - c[..., None, :]            # i >= j: c_i - c_j
    keep_lower = torch.tril(torch.ones(n, n, dtype=torch.bool, device=a.device), diagonal=0)
    lower = lower.masked_fill(~keep_lower, 0.0)
    upper = c[..., None, :] - c[..., :, None]            # i < j: c_j - c_i
    keep_upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=a.device), diagonal=1)
    upper = upper.masked_fill(~keep_upper, 0.0)
    return lower + upper


def rope_angle(head_dim: int) -> torch.Tensor:
    """1 / 10000 ** linspace(0, 1, d/2), each value repeated twice (interleaved pairs)."""
    base = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 2))
    return base[:, None].repeat(1, 2).reshape(-1)


def rope_tables(angle: torch.Tensor, h: int, w: int):
    """(sin, cos), each (h, w, d), for the 1-D raster position index = row * w + col."""
    pos = torch.arange(h * w).to(angle)
    phase = pos[:, None] * angle[None, :]
    return torch.sin(phase).reshape(h, w, -1), torch.cos(phase).reshape(h, w, -1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """rot(x)[2i] = -x[2i+1], rot(x)[2i+1] = x[2i] on the last dim."""
    even = x[..., 0::2]
    odd = x[..., 1::2]
    return torch.stack([-odd, even], dim=-1).flatten(-2)


def theta_shift(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotary embedding: x * cos + rot(x) * sin."""
    return x * cos + _rotate_pairs(x) * sin


def axial_masks(alpha: torch.Tensor, beta: torch.Tensor):
    """Per-row and per-column decay masks from alpha, beta (B, n, H, W).

    Returns mask_w (B, H, n, W, W) (row h: segment sums of alpha[:, :, h, :]) and
    mask_h (B, W, n, H, H) (column w: segment sums of beta[:, :, :, w]).
    """
    mask_w = segment_sum_1d(alpha.permute(0, 2, 1, 3))   # (B, H, n, W) -> (B, H, n, W, W)
    mask_h = segment_sum_1d(beta.permute(0, 3, 1, 2))    # (B, W, n, H) -> (B, W, n, H, H)
    return mask_w, mask_h


def whole_mask(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Full polyline mask (B, n, L, L), L = H*W, raster order.

    M[(h1, w1), (h2, w2)] = Mw[row h1][w1, w2] + Mh[col w2][h1, h2]; materialised, as in the official
    code, by repeating both axial masks to (B, n, H, H, W, W).
    """
    b, n, h, w = alpha.shape
    mask_w, mask_h = axial_masks(alpha, beta)
    mw = mask_w.permute(0, 2, 1, 3, 4)                   # (B, n, h1, w1, w2)
    mh = mask_h.permute(0, 2, 3, 4, 1)                   # (B, n, h1, h2, w2)
    mw = mw.unsqueeze(3).repeat(1, 1, 1, h, 1, 1)        # (B, n, h1, h2, w1, w2)
    mh = mh.unsqueeze(-2).repeat(1, 1, 1, 1, w, 1)       # (B, n, h1, h2, w1, w2)
    m = (mw + mh).permute(0, 1, 2, 4, 3, 5).contiguous()  # (B, n, h1, w1, h2, w2)
    return m.view(b, n, h * w, h * w)


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------

class DWConv2d(nn.Module):
    """Depthwise conv on an NHWC tensor (module holds ``conv``)."""

    def __init__(self, dim, kernel_size, padding):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, 1, padding, groups=dim)

    def forward(self, x):
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class RelPos(nn.Module):
    """Holds the persistent RoPE ``angle`` buffer (head_dim,)."""

    def __init__(self, embed_dim, num_heads):
        super().__init__()
        self.register_buffer('angle', rope_angle(embed_dim // num_heads))

    def forward(self, h, w):
        return rope_tables(self.angle, h, w)


class PathEmbed(nn.Module):
    """Token-dependent decays: alpha (horizontal) and beta (vertical), both (B, n, H, W), <= 0."""

    def __init__(self, embed_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.dt_bias = nn.Parameter(torch.zeros(num_heads))
        self.A_log = nn.Parameter(torch.zeros(num_heads))
        self.dt_linear = nn.Linear(embed_dim // num_heads, 2, bias=False)   # shared by all heads

    def forward(self, x):
        b, h, w, c = x.shape
        n = self.num_heads
        dt = self.dt_linear(x.reshape(b, h * w, n, c // n))   # (B, L, n, 2)
        a = -torch.exp(self.A_log)
        alpha = F.softplus(dt[..., 0] + self.dt_bias) * a      # (B, L, n)
        beta = F.softplus(dt[..., 1] + self.dt_bias) * a       # same dt_bias for both
        alpha = alpha.reshape(b, h, w, n).permute(0, 3, 1, 2)  # (B, n, H, W)
        beta = beta.reshape(b, h, w, n).permute(0, 3, 1, 2)
        return alpha, beta


class PolylineAttention(nn.Module):
    """Chunk (decomposed, criss-cross) or whole (full L x L) polyline masked attention, NHWC in/out."""

    def __init__(self, embed_dim, num_heads, chunk):
        super().__init__()
        self.chunk = chunk
        self.num_heads = num_heads
        self.key_dim = embed_dim // num_heads
        self.scaling = self.key_dim ** -0.5
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.lepe = DWConv2d(embed_dim, 5, 2)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.path_embed = PathEmbed(embed_dim, num_heads)

    def forward(self, x, sin, cos):
        b, h, w, c = x.shape
        n, d = self.num_heads, self.key_dim
        q = self.q_proj(x)
        k = self.k_proj(x) * self.scaling                    # k (not q) is scaled
        v = self.v_proj(x)
        lepe = self.lepe(v)

        def heads(t):                                        # (B, H, W, C) -> (B, n, H, W, d)
            return t.reshape(b, h, w, n, d).permute(0, 3, 1, 2, 4)

        q = theta_shift(heads(q), sin, cos)
        k = theta_shift(heads(k), sin, cos)
        v = heads(v)
        alpha, beta = self.path_embed(x)                     # from the normed block input

        if self.chunk:
            mask_w, mask_h = axial_masks(alpha, beta)        # (B, H, n, W, W), (B, W, n, H, H)
            q_row, k_row, v_row = (t.transpose(1, 2) for t in (q, k, v))                    # (B, H, n, W, d)
            q_col, k_col, v_col = (t.permute(0, 3, 1, 2, 4) for t in (q, k, v))             # (B, W, n, H, d)
            attn_w = torch.softmax(q_row @ k_row.transpose(-1, -2) + mask_w, dim=-1)        # (B, H, n, W, W)
            attn_h = torch.softmax(q_col @ k_col.transpose(-1, -2) + mask_h, dim=-1)        # (B, W, n, H, H)

            # rows first, then columns: A_h (A_w V)
            t = attn_w @ v_row                               # (B, H, n, W, d)
            t = attn_h @ t.permute(0, 3, 2, 1, 4)            # (B, W, n, H, d)
            out_wh = t.permute(0, 3, 1, 2, 4).reshape(b, h, w, c)
            # columns first, then rows: A_w (A_h V)
            t = attn_h @ v_col                               # (B, W, n, H, d)
            t = attn_w @ t.permute(0, 3, 2, 1, 4)            # (B, H, n, W, d)
            out_hw = t.permute(0, 1, 3, 2, 4).reshape(b, h, w, c)
            out = 0.5 * out_wh + 0.5 * out_hw
        else:
            mask = whole_mask(alpha, beta)                   # (B, n, L, L)
            qf, kf, vf = (t.flatten(2, 3) for t in (q, k, v))  # (B, n, L, d)
            logits = qf @ kf.transpose(-1, -2)
            attn = (0.5 * torch.softmax(logits + mask, dim=-1)
                    + 0.5 * torch.softmax(logits + mask.transpose(-1, -2), dim=-1))  # average probabilities
            out = (attn @ vf).transpose(1, 2).reshape(b, h, w, c)

        return self.out_proj(out + lepe)


class FFN(nn.Module):
    """fc1 -> GELU -> (x + dwconv3x3(x)) -> fc2, NHWC."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dwconv = DWConv2d(hidden, 3, 1)

    def forward(self, x):
        x = F.gelu(self.fc1(x))
        x = x + self.dwconv(x)
        return self.fc2(x)


class Block(nn.Module):
    def __init__(self, dim, num_heads, ffn_dim, chunk, layerscale, layer_init_values):
        super().__init__()
        self.layerscale = layerscale
        self.retention_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.retention = PolylineAttention(dim, num_heads, chunk)
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = FFN(dim, ffn_dim)
        self.pos = DWConv2d(dim, 3, 1)
        if layerscale:
            self.gamma_1 = nn.Parameter(layer_init_values * torch.ones(1, 1, 1, dim))
            self.gamma_2 = nn.Parameter(layer_init_values * torch.ones(1, 1, 1, dim))

    def forward(self, x, sin, cos):
        x = x + self.pos(x)
        a = self.retention(self.retention_layer_norm(x), sin, cos)
        if self.layerscale:
            a = self.gamma_1 * a
        x = x + a
        f = self.ffn(self.final_layer_norm(x))
        if self.layerscale:
            f = self.gamma_2 * f
        return x + f


class Downsample(nn.Module):
    """conv3x3 s2 (with bias) + BatchNorm2d, NHWC in/out."""

    def __init__(self, dim, out_dim):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x):
        return self.norm(self.reduction(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class Stage(nn.Module):
    def __init__(self, dim, out_dim, depth, num_heads, ffn_dim, chunk, layerscale, layer_init_values):
        super().__init__()
        self.Relpos = RelPos(dim, num_heads)
        self.blocks = nn.ModuleList([Block(dim, num_heads, ffn_dim, chunk, layerscale, layer_init_values)
                                     for _ in range(depth)])
        self.downsample = Downsample(dim, out_dim) if out_dim is not None else None

    def forward(self, x):
        """Returns (pre-downsample output, input of the next stage), both NHWC."""
        _, h, w, _ = x.shape
        sin, cos = self.Relpos(h, w)
        for blk in self.blocks:
            x = blk(x, sin, cos)
        y = self.downsample(x) if self.downsample is not None else x
        return x, y


class PatchEmbed(nn.Module):
    def __init__(self, in_chans, dim):
        super().__init__()
        half = dim // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.GELU(),
            nn.Conv2d(dim, dim, 3, 1, 1), nn.BatchNorm2d(dim),
        )

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)             # NHWC


class PPMARef(nn.Module):
    """Naive PPMA classifier with the official state_dict layout."""

    def __init__(self, embed_dims, depths, num_heads, mlp_ratios, chunkwise, layerscales,
                 layer_init_values=1e-6, num_classes=1000, in_chans=3, projection=1024):
        super().__init__()
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.layers = nn.ModuleList()
        for i in range(len(depths)):
            out_dim = embed_dims[i + 1] if i < len(depths) - 1 else None
            self.layers.append(Stage(embed_dims[i], out_dim, depths[i], num_heads[i],
                                     int(mlp_ratios[i] * embed_dims[i]), chunkwise[i], layerscales[i],
                                     layer_init_values))
        self.proj = nn.Linear(embed_dims[-1], projection)
        self.norm = nn.BatchNorm2d(projection)
        self.head = nn.Linear(projection, num_classes) if num_classes > 0 else nn.Identity()

    def backbone_outputs(self, x):
        """The 4 pre-downsample stage outputs, NHWC, before any output norm."""
        x = self.patch_embed(x)
        outs = []
        for layer in self.layers:
            o, x = layer(x)
            outs.append(o)
        return outs

    def forward_features(self, x):
        x = self.backbone_outputs(x)[-1]                     # last stage has no downsample
        x = self.proj(x)                                     # (B, H, W, P)
        x = self.norm(x.permute(0, 3, 1, 2)).flatten(2)      # (B, P, L)
        x = x * torch.sigmoid(x)                             # swish
        return x.mean(dim=-1)                                # (B, P)

    def forward(self, x):
        return self.head(self.forward_features(x))
