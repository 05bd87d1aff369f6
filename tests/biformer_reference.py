"""Naive reference for BiFormer (Bi-Level Routing Attention, CVPR 2023), used only by the tests.

This follows the official code (rayleizhu/BiFormer @ 1697bbbe: ``ops/bra_legacy.py``, ``ops/bra_nchw.py``,
``ops/torch/rrsda.py``, ``models/_common.py``, ``models/biformer.py``, ``models/biformer_stl.py``,
``models/biformer_stl_nchw.py`` and ``object_detection/models_mm/biformer_mm.py``) step by step, in plain
and deliberately slow PyTorch: the einops rearranges are spelled out as view/permute/reshape, and the
routed key/value regions are gathered with an expanded ``torch.gather`` that materialises ``topk`` copies,
as the official code does. Module and parameter names match the official ones, so an official state dict
loads with ``strict=True``. Nothing in the library imports this file, and it imports nothing from the
library. It is only a fidelity oracle, to be run in eval mode (no drop path).

Only the released configuration is covered: kv_downsample_mode 'identity', no routing parameters, no
differentiable or soft routing, pre-norm blocks, no MLP dwconv.

One extension that is not in the official code: ``BiFormerSTL`` accepts ``auto_pad`` (officially its
blocks never pass it, so BRA runs with auto_pad=False) so tests can run it at sizes that are not
multiples of ``n_win``. The default, False, is the official behaviour.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['BiLevelRoutingAttention', 'Attention', 'AttentionLePE', 'nchwBRA', 'nchwAttentionLePE',
           'regional_routing_attention', 'LayerNorm2d', 'Block', 'BiFormer', 'BiFormerSTL', 'nchwBiFormerSTL',
           'VARIANTS', 'build_reference', 'reference_backbone_outputs', 'build_extra_norms']


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------

class DropPath(nn.Module):
    """Per-sample stochastic depth (identity in eval mode)."""

    def __init__(self, p=0.):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0. or not self.training:
            return x
        keep = 1. - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (timm's LayerNorm2d, eps 1e-6)."""

    def __init__(self, num_channels, eps=1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _dwconv(dim, k):
    return nn.Conv2d(dim, dim, kernel_size=k, stride=1, padding=k // 2, groups=dim)


# ----------------------------------------------------------------------------------------------
# legacy BRA (ops/bra_legacy.py), NHWC
# ----------------------------------------------------------------------------------------------

class QKVLinear(nn.Module):
    """One Linear dim -> qk_dim + qk_dim + dim, rows ordered [q | k | v]; returns q and kv."""

    def __init__(self, dim, qk_dim, bias=True):
        super().__init__()
        self.dim = dim
        self.qk_dim = qk_dim
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, bias=bias)

    def forward(self, x):
        out = self.qkv(x)
        return out[..., :self.qk_dim], out[..., self.qk_dim:]


class BiLevelRoutingAttention(nn.Module):
    """Legacy BRA on NHWC input (the one behind every released T/S/B/STL checkpoint).

    scale = qk_dim ** -0.5 (full width, not head width); routing uses detached region means; LePE is a
    depthwise conv on v over the whole (padded) map; pad tokens from auto_pad are not masked.
    After each forward ``self.last_index`` holds the routing indices (N, n_win**2, topk).
    """

    def __init__(self, dim, num_heads=8, n_win=7, qk_dim=None, topk=4, side_dwconv=5, auto_pad=False,
                 qk_scale=None):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.qk_dim = qk_dim or dim
        assert self.qk_dim % num_heads == 0 and dim % num_heads == 0
        self.scale = qk_scale or self.qk_dim ** -0.5
        self.topk = topk
        self.auto_pad = auto_pad
        self.lepe = _dwconv(dim, side_dwconv) if side_dwconv > 0 else None
        self.qkv = QKVLinear(dim, self.qk_dim)
        self.wo = nn.Linear(dim, dim)
        self.last_index = None

    def forward(self, x, return_index=False):
        N, H_in, W_in, C = x.shape
        S = self.n_win
        pad_r = pad_b = 0
        if self.auto_pad:
            pad_r = (S - W_in % S) % S
            pad_b = (S - H_in % S) % S
            # zero pad the (normed) input, bottom / right, before the projection
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        else:
            assert H_in % S == 0 and W_in % S == 0
        _, H, W, _ = x.shape
        h, w = H // S, W // S
        p2, w2 = S * S, h * w
        cqk, m = self.qk_dim, self.num_heads

        # regions, row-major: n (j h) (i w) c -> n (j i) h w c
        x = x.view(N, S, h, S, w, C).permute(0, 1, 3, 2, 4, 5).reshape(N, p2, h, w, C)

        q, kv = self.qkv(x)                              # (N, p2, h, w, cqk), (N, p2, h, w, cqk + C)
        q_pix = q.reshape(N, p2, w2, cqk)
        kv_pix = kv.reshape(N, p2, w2, cqk + C)          # kv_down is the identity

        # region descriptors: plain means over the region (pad tokens included)
        q_win = q.mean([2, 3])
        k_win = kv[..., :cqk].mean([2, 3])

        # LePE on v, reassembled to the full (padded) NCHW map: n (j i) h w c -> n c (j h) (i w)
        v_map = kv[..., cqk:].reshape(N, S, S, h, w, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, H, W)
        if self.lepe is not None:
            lepe = self.lepe(v_map.contiguous()).permute(0, 2, 3, 1)   # (N, H, W, C)
        else:
            lepe = torch.zeros_like(v_map).permute(0, 2, 3, 1)

        # routing: no gradient, logits (q_r * scale) @ k_r^T, top-k (the softmax weights are unused)
        q_r, k_r = q_win.detach(), k_win.detach()
        logits = (q_r * self.scale) @ k_r.transpose(-2, -1)          # (N, p2, p2)
        _, r_idx = torch.topk(logits, k=self.topk, dim=-1)           # (N, p2, topk)
        self.last_index = r_idx

        # gather the routed regions, materialising topk copies of kv
        ckv = cqk + C
        k_ = self.topk
        sel = torch.gather(kv_pix.view(N, 1, p2, w2, ckv).expand(-1, p2, -1, -1, -1), dim=2,
                           index=r_idx.view(N, p2, k_, 1, 1).expand(-1, -1, -1, w2, ckv))
        k_sel, v_sel = sel[..., :cqk], sel[..., cqk:]                 # (N, p2, topk, w2, .)

        # heads, channel split "(m c)"
        k_sel = k_sel.reshape(N, p2, k_, w2, m, cqk // m).permute(0, 1, 4, 5, 2, 3).reshape(N * p2, m, cqk // m,
                                                                                            k_ * w2)
        v_sel = v_sel.reshape(N, p2, k_, w2, m, C // m).permute(0, 1, 4, 2, 3, 5).reshape(N * p2, m, k_ * w2,
                                                                                          C // m)
        q_pix = q_pix.reshape(N, p2, w2, m, cqk // m).permute(0, 1, 3, 2, 4).reshape(N * p2, m, w2, cqk // m)

        attn = torch.softmax((q_pix * self.scale) @ k_sel, dim=-1)   # (N p2, m, w2, topk w2)
        out = attn @ v_sel                                            # (N p2, m, w2, C/m)
        # (n j i) m (h w) c -> n (j h) (i w) (m c)
        out = out.reshape(N, S, S, m, h, w, C // m).permute(0, 1, 4, 2, 5, 3, 6).reshape(N, H, W, C)

        out = self.wo(out + lepe)
        if pad_r > 0 or pad_b > 0:
            out = out[:, :H_in, :W_in, :].contiguous()
        if return_index:
            return out, r_idx
        return out


class Attention(nn.Module):
    """Plain MHSA on NHWC (models/_common.py Attention, topk=-1): qkv no bias, scale head_dim ** -0.5."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, H, W, C = x.shape
        x = x.reshape(N, H * W, C)
        qkv = self.qkv(x).reshape(N, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(N, H * W, C)
        x = self.proj(x)
        return x.reshape(N, H, W, C)


class AttentionLePE(nn.Module):
    """MHSA + LePE on NHWC (stage 4, topk=-2): LePE is a dwconv of the attention INPUT x, added before proj."""

    def __init__(self, dim, num_heads=8, side_dwconv=5, qkv_bias=False, qk_scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.lepe = _dwconv(dim, side_dwconv) if side_dwconv > 0 else None

    def forward(self, x):
        N, H, W, C = x.shape
        x = x.reshape(N, H * W, C)
        qkv = self.qkv(x).reshape(N, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        x_map = x.reshape(N, H, W, C).permute(0, 3, 1, 2)
        if self.lepe is not None:
            lepe = self.lepe(x_map).permute(0, 2, 3, 1).reshape(N, H * W, C)
        else:
            lepe = torch.zeros_like(x)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(N, H * W, C)
        x = self.proj(x + lepe)
        return x.reshape(N, H, W, C)


# ----------------------------------------------------------------------------------------------
# refactored BRA (ops/bra_nchw.py + ops/torch/rrsda.py), NCHW
# ----------------------------------------------------------------------------------------------

def _grid_to_regions(x, region_size, num_heads):
    """(B, C, H, W) -> (B, m, n_regions, rh*rw, C/m), regions row-major; H, W multiples of region_size."""
    B, C, H, W = x.shape
    rh, rw = region_size
    nh, nw = H // rh, W // rw
    x = x.reshape(B, num_heads, C // num_heads, nh, rh, nw, rw).permute(0, 1, 3, 5, 4, 6, 2)
    return x.reshape(B, num_heads, nh * nw, rh * rw, C // num_heads), nh, nw


def _regions_to_grid(x, nh, nw, region_size):
    """(B, m, n_regions, rh*rw, d) -> (B, m*d, nh*rh, nw*rw)."""
    B, m, _, _, d = x.shape
    rh, rw = region_size
    x = x.reshape(B, m, nh, nw, rh, rw, d).permute(0, 1, 6, 2, 4, 3, 5)
    return x.reshape(B, m * d, nh * rh, nw * rw)


def regional_routing_attention(query, key, value, scale, region_graph, region_size):
    """rrsda (auto_pad=True): zero-pad q/k/v to region multiples, per-head gather, attention, unpad crop.

    query/key/value (B, C, H, W); region_graph (B, m, n_regions, topk). Returns (B, C, H, W).
    """
    B, m, n_reg, topk = region_graph.shape
    rh, rw = region_size
    _, _, Hq, Wq = query.shape
    pad_b = (rh - Hq % rh) % rh
    pad_r = (rw - Wq % rw) % rw
    if pad_b > 0 or pad_r > 0:
        query = F.pad(query, (0, pad_r, 0, pad_b))
        key = F.pad(key, (0, pad_r, 0, pad_b))
        value = F.pad(value, (0, pad_r, 0, pad_b))
    q, nh, nw = _grid_to_regions(query, region_size, m)
    k, _, _ = _grid_to_regions(key, region_size, m)
    v, _, _ = _grid_to_regions(value, region_size, m)

    _, _, kv_nreg, reg, d = k.shape
    nq = q.shape[2]
    idx = region_graph.reshape(B, m, n_reg, topk, 1, 1).expand(-1, -1, -1, -1, reg, d)
    k_g = torch.gather(k.reshape(B, m, 1, kv_nreg, reg, d).expand(-1, -1, nq, -1, -1, -1), dim=3, index=idx)
    v_g = torch.gather(v.reshape(B, m, 1, kv_nreg, reg, d).expand(-1, -1, nq, -1, -1, -1), dim=3, index=idx)

    attn = (q * scale) @ k_g.flatten(-3, -2).transpose(-1, -2)      # (B, m, n_reg, reg, topk*reg)
    attn = torch.softmax(attn, dim=-1)
    out = attn @ v_g.flatten(-3, -2)                                # (B, m, n_reg, reg, d)
    out = _regions_to_grid(out, nh, nw, region_size)
    if pad_b > 0 or pad_r > 0:
        out = out[:, :, :Hq, :Wq]
    return out


class nchwBRA(nn.Module):
    """Refactored BRA on NCHW (biformer_stl_nchw).

    region_size = (H // n_win, W // n_win) (so there can be more than n_win**2 regions); routing on
    avg_pool2d(ceil_mode=True, count_include_pad=False) of detached q and k, logits q_r @ k_r without any
    scale; attention scale = dim ** -0.5 (full width); padding after the projection; LePE on unpadded v.
    After each forward ``self.last_index`` holds the routing indices (N, n_regions, topk).
    """

    def __init__(self, dim, num_heads=8, n_win=7, topk=4, side_dwconv=3, qk_scale=None):
        super().__init__()
        assert dim % num_heads == 0
        self.dim = dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.topk = topk
        self.scale = qk_scale or dim ** -0.5
        self.lepe = _dwconv(dim, side_dwconv) if side_dwconv > 0 else None
        self.qkv_linear = nn.Conv2d(dim, 3 * dim, kernel_size=1)
        self.output_linear = nn.Conv2d(dim, dim, kernel_size=1)
        self.last_index = None

    def forward(self, x, return_index=False):
        N, C, H, W = x.shape
        region_size = (H // self.n_win, W // self.n_win)
        q, k, v = self.qkv_linear(x).chunk(3, dim=1)

        q_r = F.avg_pool2d(q.detach(), kernel_size=region_size, ceil_mode=True, count_include_pad=False)
        k_r = F.avg_pool2d(k.detach(), kernel_size=region_size, ceil_mode=True, count_include_pad=False)
        q_r = q_r.permute(0, 2, 3, 1).flatten(1, 2)                 # (N, n_reg, C)
        k_r = k_r.flatten(2, 3)                                     # (N, C, n_reg)
        _, idx = torch.topk(q_r @ k_r, k=self.topk, dim=-1)         # (N, n_reg, topk)
        self.last_index = idx
        graph = idx.unsqueeze(1).expand(-1, self.num_heads, -1, -1)

        out = regional_routing_attention(q, k, v, self.scale, graph, region_size)
        out = out + (self.lepe(v) if self.lepe is not None else torch.zeros_like(v))
        out = self.output_linear(out)
        if return_index:
            return out, idx
        return out


class nchwAttentionLePE(nn.Module):
    """MHSA + LePE on NCHW (biformer_stl_nchw stage 4): 1x1 conv qkv without bias, LePE on v, proj conv."""

    def __init__(self, dim, num_heads=8, side_dwconv=5, qkv_bias=False, qk_scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=qkv_bias)
        self.proj = nn.Conv2d(dim, dim, kernel_size=1)
        self.lepe = _dwconv(dim, side_dwconv) if side_dwconv > 0 else None

    def forward(self, x):
        B, C, H, W = x.shape
        m, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).chunk(3, dim=1)
        attn = q.reshape(B, m, d, H * W).transpose(-1, -2) @ k.reshape(B, m, d, H * W)
        attn = torch.softmax(attn * self.scale, dim=-1)
        out = attn @ v.reshape(B, m, d, H * W).transpose(-1, -2)   # (B, m, HW, d)
        out = out.permute(0, 1, 3, 2).reshape(B, C, H, W)
        out = out + (self.lepe(v) if self.lepe is not None else torch.zeros_like(v))
        return self.proj(out)


# ----------------------------------------------------------------------------------------------
# BiFormer T/S/B (models/biformer.py)
# ----------------------------------------------------------------------------------------------

def _make_attn_nhwc(dim, topk, num_heads, n_win, qk_dim, side_dwconv, auto_pad, qk_scale):
    if topk > 0:
        return BiLevelRoutingAttention(dim, num_heads=num_heads, n_win=n_win, qk_dim=qk_dim, topk=topk,
                                       side_dwconv=side_dwconv, auto_pad=auto_pad, qk_scale=qk_scale)
    if topk == -1:
        return Attention(dim)                   # official: default 8 heads, whatever the model's head_dim
    if topk == -2:
        return AttentionLePE(dim, side_dwconv=side_dwconv)
    raise NotImplementedError(f'topk={topk} (conv stand-in) is not covered by the reference')


class Block(nn.Module):
    """NCHW in/out: x += dwconv3(x) (padding 1); NHWC pre-norm attention and MLP (Linear, Identity, GELU, Linear)."""

    def __init__(self, dim, drop_path=0., layer_scale_init_value=-1, num_heads=8, n_win=7, qk_dim=None,
                 topk=4, mlp_ratio=4, side_dwconv=5, before_attn_dwconv=3, auto_pad=False, qk_scale=None):
        super().__init__()
        qk_dim = qk_dim or dim
        # padding is hard-coded to 1 in the official code, whatever the kernel
        self.pos_embed = (nn.Conv2d(dim, dim, kernel_size=before_attn_dwconv, padding=1, groups=dim)
                          if before_attn_dwconv > 0 else None)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _make_attn_nhwc(dim, topk, num_heads, n_win, qk_dim, side_dwconv, auto_pad, qk_scale)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Identity(), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.use_layer_scale = layer_scale_init_value > 0
        if self.use_layer_scale:
            self.gamma1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))

    def forward(self, x):
        if self.pos_embed is not None:
            x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        if self.use_layer_scale:
            x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
            x = x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))
        else:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


class BiFormer(nn.Module):
    """BiFormer T/S/B. BRA heads = qk_dims[i] // head_dim; the stage-4 (topk -2) attention keeps 8 heads."""

    def __init__(self, depth=(2, 2, 8, 2), in_chans=3, num_classes=1000, embed_dim=(64, 128, 256, 512),
                 head_dim=32, qk_scale=None, drop_path_rate=0., n_win=7, topks=(1, 4, 16, -2), side_dwconv=5,
                 layer_scale_init_value=-1, qk_dims=None, before_attn_dwconv=3, auto_pad=False,
                 mlp_ratios=(3, 3, 3, 3), kv_downsample_mode='identity', param_routing=False,
                 diff_routing=False, soft_routing=False, pre_norm=True, mlp_dwconv=False, pe=None,
                 param_attention='qkvo', drop_rate=0.):
        super().__init__()
        assert kv_downsample_mode == 'identity' and not (param_routing or diff_routing or soft_routing)
        assert pre_norm and not mlp_dwconv and pe is None and param_attention == 'qkvo'
        self.num_classes = num_classes
        self.embed_dim = list(embed_dim)
        qk_dims = list(qk_dims) if qk_dims is not None else list(embed_dim)

        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            nn.Conv2d(in_chans, embed_dim[0] // 2, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(embed_dim[0] // 2),
            nn.GELU(),
            nn.Conv2d(embed_dim[0] // 2, embed_dim[0], kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(embed_dim[0]),
        ))
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                nn.Conv2d(embed_dim[i], embed_dim[i + 1], kernel_size=3, stride=2, padding=1),
                nn.BatchNorm2d(embed_dim[i + 1]),
            ))

        nheads = [d // head_dim for d in qk_dims]
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, sum(depth), device='cpu')]
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                Block(embed_dim[i], drop_path=dpr[cur + j], layer_scale_init_value=layer_scale_init_value,
                      num_heads=nheads[i], n_win=n_win, qk_dim=qk_dims[i], topk=topks[i],
                      mlp_ratio=mlp_ratios[i], side_dwconv=side_dwconv, before_attn_dwconv=before_attn_dwconv,
                      auto_pad=auto_pad, qk_scale=qk_scale)
                for j in range(depth[i])]))
            cur += depth[i]

        self.norm = nn.BatchNorm2d(embed_dim[-1])
        self.head = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    def forward_features(self, x):
        for i in range(4):
            x = self.downsample_layers[i](x)
            x = self.stages[i](x)
        return self.norm(x)

    def forward(self, x):
        x = self.forward_features(x)
        return self.head(x.flatten(2).mean(-1))


# ----------------------------------------------------------------------------------------------
# BiFormer-STL (models/biformer_stl.py) and its nchw twin (models/biformer_stl_nchw.py)
# ----------------------------------------------------------------------------------------------

class STLBlock(nn.Module):
    """NHWC: x += attn(LN(x)); x += mlp(LN(x)) with mlp = Linear, GELU, Linear (keys mlp.0 / mlp.2)."""

    def __init__(self, dim, drop_path=0., num_heads=8, n_win=7, topk=4, mlp_ratio=4, side_dwconv=5,
                 auto_pad=False, qk_scale=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _make_attn_nhwc(dim, topk, num_heads, n_win, dim, side_dwconv, auto_pad, qk_scale)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class nchwSTLBlock(nn.Module):
    """NCHW: LayerNorm2d (eps 1e-6) norms, nchwBRA (topk > 0) or nchwAttentionLePE (topk -1, 8 heads), conv1x1 MLP."""

    def __init__(self, dim, drop_path=0., num_heads=8, n_win=7, topk=4, mlp_ratio=4, side_dwconv=5, qk_scale=None):
        super().__init__()
        self.norm1 = LayerNorm2d(dim)
        if topk > 0:
            self.attn = nchwBRA(dim, num_heads=num_heads, n_win=n_win, topk=topk, side_dwconv=side_dwconv,
                                qk_scale=qk_scale)
        elif topk == -1:
            self.attn = nchwAttentionLePE(dim)   # official: default 8 heads and side_dwconv 5
        else:
            raise ValueError('topk should be > 0 or == -1')
        self.norm2 = LayerNorm2d(dim)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, kernel_size=1), nn.GELU(),
                                 nn.Conv2d(hidden, dim, kernel_size=1))
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class BasicLayer(nn.Module):
    """A stage: ``blocks`` ModuleList; NCHW in/out (permutes to NHWC around the legacy blocks)."""

    def __init__(self, blocks, nhwc):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.nhwc = nhwc

    def forward(self, x):
        if self.nhwc:
            x = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = blk(x)
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        return x


def _as_tuple4(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * 4


class _STLBase(nn.Module):
    nchw = False

    def __init__(self, in_chans=3, num_classes=1000, depth=(2, 2, 6, 2), embed_dim=(96, 192, 384, 768),
                 head_dim=32, qk_scale=None, drop_path_rate=0., mlp_ratios=(4, 4, 4, 4), n_wins=(7, 7, 7, 7),
                 topks=(1, 4, 16, -2), side_dwconv=5, auto_pad=False, n_win=None, drop_rate=0.):
        super().__init__()
        if n_win is not None:
            n_wins = n_win
        n_wins, topks = _as_tuple4(n_wins), _as_tuple4(topks)
        self.num_classes = num_classes
        self.embed_dim = list(embed_dim)
        # norm_layer = BatchNorm2d for stem, downsamplers and the final norm
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            nn.Conv2d(in_chans, embed_dim[0], kernel_size=4, stride=4), nn.BatchNorm2d(embed_dim[0])))
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                nn.BatchNorm2d(embed_dim[i]), nn.Conv2d(embed_dim[i], embed_dim[i + 1], kernel_size=2, stride=2)))

        nheads = [d // head_dim for d in embed_dim]
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, sum(depth), device='cpu')]
        self.stages = nn.ModuleList()
        for i in range(4):
            rates = dpr[sum(depth[:i]):sum(depth[:i + 1])]
            if self.nchw:
                blocks = [nchwSTLBlock(embed_dim[i], drop_path=rates[j], num_heads=nheads[i], n_win=n_wins[i],
                                       topk=topks[i], mlp_ratio=mlp_ratios[i], side_dwconv=side_dwconv,
                                       qk_scale=qk_scale)
                          for j in range(depth[i])]
            else:
                blocks = [STLBlock(embed_dim[i], drop_path=rates[j], num_heads=nheads[i], n_win=n_wins[i],
                                   topk=topks[i], mlp_ratio=mlp_ratios[i], side_dwconv=side_dwconv,
                                   auto_pad=auto_pad, qk_scale=qk_scale)
                          for j in range(depth[i])]
            self.stages.append(BasicLayer(blocks, nhwc=not self.nchw))

        self.norm = nn.BatchNorm2d(embed_dim[-1])
        self.head = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    def forward_features(self, x):
        for i in range(4):
            x = self.downsample_layers[i](x)
            x = self.stages[i](x)
        return self.norm(x)

    def forward(self, x):
        x = self.forward_features(x)
        return self.head(x.mean([2, 3]))


class BiFormerSTL(_STLBase):
    """BiFormer-STL with legacy BRA (NHWC blocks); heads = dim // 32, stage-4 AttentionLePE with 8 heads.
    ``auto_pad`` is a test-only extension (official: always False)."""
    nchw = False


class nchwBiFormerSTL(_STLBase):
    """BiFormer-STL with nchwBRA / nchwAttentionLePE (NCHW blocks). auto_pad has no effect (always pads)."""
    nchw = True

    def __init__(self, topks=(1, 4, 16, -1), **kwargs):
        kwargs.pop('auto_pad', None)
        super().__init__(topks=topks, **kwargs)


# ----------------------------------------------------------------------------------------------
# variants, builder, dense-prediction helper
# ----------------------------------------------------------------------------------------------

_TSB_COMMON = dict(mlp_ratios=[3, 3, 3, 3], n_win=7, topks=[1, 4, 16, -2], side_dwconv=5, before_attn_dwconv=3,
                   layer_scale_init_value=-1, head_dim=32)

VARIANTS = {
    'biformer_tiny': dict(arch=BiFormer, depth=[2, 2, 8, 2], embed_dim=[64, 128, 256, 512],
                          qk_dims=[64, 128, 256, 512], **_TSB_COMMON),
    'biformer_small': dict(arch=BiFormer, depth=[4, 4, 18, 4], embed_dim=[64, 128, 256, 512],
                           qk_dims=[64, 128, 256, 512], **_TSB_COMMON),
    'biformer_base': dict(arch=BiFormer, depth=[4, 4, 18, 4], embed_dim=[96, 192, 384, 768],
                          qk_dims=[96, 192, 384, 768], **_TSB_COMMON),
    'biformer_stl': dict(arch=BiFormerSTL, depth=[2, 2, 6, 2], embed_dim=[96, 192, 384, 768],
                         mlp_ratios=[4, 4, 4, 4], head_dim=32, n_wins=(7, 7, 7, 7), topks=(1, 4, 16, -2),
                         side_dwconv=5),
    'biformer_stl_nchw': dict(arch=nchwBiFormerSTL, depth=[2, 2, 6, 2], embed_dim=[96, 192, 384, 768],
                              mlp_ratios=[4, 4, 4, 4], head_dim=32, n_wins=(7, 7, 7, 7), topks=(1, 4, 16, -1),
                              side_dwconv=5),
}


def build_reference(variant: str, **kwargs) -> nn.Module:
    """Reference model of an official variant; kwargs override the config (n_win, auto_pad, drop_path_rate, ...).

    For the STL variants an int ``n_win`` (or ``n_wins``) is expanded to all four stages.
    """
    cfg = dict(VARIANTS[variant])
    arch = cfg.pop('arch')
    if arch is not BiFormer and 'n_win' in kwargs:
        cfg['n_wins'] = _as_tuple4(kwargs.pop('n_win'))
    cfg.update(kwargs)
    return arch(**cfg)


def build_extra_norms(model: nn.Module) -> nn.ModuleList:
    """``extra_norms`` of BiFormer_mm: a LayerNorm2d (eps 1e-6) per stage output."""
    return nn.ModuleList([LayerNorm2d(d) for d in model.embed_dim])


def reference_backbone_outputs(model: nn.Module, x: torch.Tensor, extra_norms=None):
    """The 4 NCHW stage outputs (strides 4/8/16/32) as BiFormer_mm.forward_features computes them.

    Without ``extra_norms`` these are the raw stage outputs (before BiFormer_mm's extra norms); with
    ``extra_norms`` (see ``build_extra_norms``) each output goes through its norm, as BiFormer_mm returns it.
    The classification ``norm``/``head`` are not used.
    """
    outs = []
    for i in range(4):
        x = model.downsample_layers[i](x)
        x = model.stages[i](x)
        outs.append(extra_norms[i](x).contiguous() if extra_norms is not None else x)
    return tuple(outs)
