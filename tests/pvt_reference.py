"""Transcription of the official FLatten-PVT and FLatten-PVTv2 classifiers, used only by the tests.

Follows ``LeapLabTHU/FLatten-Transformer`` ``models/flatten_pvt.py`` and ``models/flatten_pvt_v2.py``
(post-2024-05 normalisation) module by module, with the official key names, so an official state dict
loads with ``strict=True``. The focused linear attention math is ``official_focused`` of
``tests/test_focused_linear_attention.py`` (written out from the official forward). Only what the
released configs use is transcribed (``sr_ratio`` 1 in ``L`` blocks, ``linear=False``); ``img_size`` may
be an ``(H, W)`` pair (the official code takes a square int) so the reference can be built at the sizes
the tests run. Eval only: dropouts and drop path are left out.
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from test_focused_linear_attention import official_focused

__all__ = ['PyramidVisionTransformer', 'PyramidVisionTransformerV2', 'VARIANTS']

_ARCH = dict(embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4], sr_ratios=[8, 4, 2, 1])
VARIANTS = {  # official function name -> kwargs (qkv_bias=True and LayerNorm eps 1e-6 in every one)
    'flatten_pvt_tiny': dict(_ARCH, depths=[2, 2, 2, 2]),
    'flatten_pvt_small': dict(_ARCH, depths=[3, 4, 6, 3]),
    'flatten_pvt_v2_b0': dict(_ARCH, embed_dims=[32, 64, 160, 256], depths=[2, 2, 2, 2]),
    'flatten_pvt_v2_b1': dict(_ARCH, depths=[2, 2, 2, 2]),
}


def _pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


class Mlp(nn.Module):
    """PVT: fc1 -> GELU -> fc2; PVTv2 (``dwconv=True``): fc1 -> DWConv -> GELU -> fc2."""

    def __init__(self, in_features, hidden_features, dwconv=False):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        if dwconv:
            self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x, H, W):
        x = self.fc1(x)
        if hasattr(self, 'dwconv'):
            x = self.dwconv(x, H, W)
        return self.fc2(self.act(x))


class DWConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        x = x.transpose(1, 2).view(B, C, H, W)
        return self.dwconv(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """The base model's softmax spatial-reduction attention (``S`` blocks)."""

    def __init__(self, dim, num_heads, qkv_bias=False, sr_ratio=1):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            x_ = x.permute(0, 2, 1).reshape(B, C, H, W)
            x_ = self.norm(self.sr(x_).reshape(B, C, -1).permute(0, 2, 1))
            kv = self.kv(x_).reshape(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        else:
            kv = self.kv(x).reshape(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class FocusedLinearAttention(nn.Module):
    """Official PVT form (separate ``q`` / ``kv``), ``sr_ratio`` 1."""

    def __init__(self, dim, num_patches, num_heads, qkv_bias=False, kernel_size=5):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, groups=head_dim, padding=kernel_size // 2)
        self.scale = nn.Parameter(torch.zeros(size=(1, 1, dim)))
        self.positional_encoding = nn.Parameter(torch.zeros(size=(1, num_patches, dim)))

    def forward(self, x, H, W):
        B, N, C = x.shape
        q = self.q(x)
        k, v = self.kv(x).reshape(B, -1, 2, C).permute(2, 0, 1, 3)
        k = k + self.positional_encoding
        return self.proj(official_focused(q, k, v, self.scale, self.dwc, self.num_heads, H, W))


class Block(nn.Module):
    def __init__(self, dim, num_patches, num_heads, mlp_ratio, sr_ratio, attn_type, dwconv):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm_layer(dim)
        if attn_type == 'L':
            self.attn = FocusedLinearAttention(dim, num_patches, num_heads, qkv_bias=True)
        else:
            self.attn = Attention(dim, num_heads, qkv_bias=True, sr_ratio=sr_ratio)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dwconv=dwconv)

    def forward(self, x, H, W):
        x = x + self.attn(self.norm1(x), H, W)
        return x + self.mlp(self.norm2(x), H, W)


class PatchEmbed(nn.Module):
    """PVT: non-overlapping Conv(k = s = patch) + LayerNorm; ``H`` / ``W`` the map at ``img_size``."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.H, self.W = img_size[0] // patch_size, img_size[1] // patch_size
        self.num_patches = self.H * self.W
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        x = self.proj(x)
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), (H, W)


class OverlapPatchEmbed(nn.Module):
    """PVTv2: Conv(k, s, pad k // 2) + LayerNorm."""

    def __init__(self, img_size, patch_size, stride, in_chans, embed_dim):
        super().__init__()
        self.H, self.W = img_size[0] // stride, img_size[1] // stride
        self.num_patches = self.H * self.W
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        x = self.proj(x)
        _, _, H, W = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class PyramidVisionTransformer(nn.Module):
    """FLatten-PVT: ``pos_embed{i}`` per stage, the final ``norm`` constructed and not applied."""

    def __init__(self, img_size=224, num_classes=1000, embed_dims=(64, 128, 256, 512), num_heads=(1, 2, 4, 8),
                 mlp_ratios=(4, 4, 4, 4), depths=(3, 4, 6, 3), sr_ratios=(8, 4, 2, 1), attn_type='LLLL'):
        super().__init__()
        img_size = _pair(img_size)
        self.num_stages = len(depths)
        for i in range(self.num_stages):
            size = img_size if i == 0 else (img_size[0] // 2 ** (i + 1), img_size[1] // 2 ** (i + 1))
            patch_embed = PatchEmbed(size, 4 if i == 0 else 2, 3 if i == 0 else embed_dims[i - 1], embed_dims[i])
            num_patches = patch_embed.num_patches
            setattr(self, f'patch_embed{i + 1}', patch_embed)
            setattr(self, f'pos_embed{i + 1}', nn.Parameter(torch.zeros(1, num_patches, embed_dims[i])))
            setattr(self, f'block{i + 1}', nn.ModuleList([
                Block(embed_dims[i], num_patches, num_heads[i], mlp_ratios[i],
                      sr_ratios[i] if attn_type[i] == 'S' else 1, attn_type[i], dwconv=False)
                for _ in range(depths[i])]))
        self.norm = nn.LayerNorm(embed_dims[3], eps=1e-6)
        self.head = nn.Linear(embed_dims[3], num_classes)

    def _get_pos_embed(self, pos_embed, patch_embed, H, W):
        if H * W == self.patch_embed1.num_patches:
            return pos_embed
        return F.interpolate(
            pos_embed.reshape(1, patch_embed.H, patch_embed.W, -1).permute(0, 3, 1, 2),
            size=(H, W), mode='bilinear').reshape(1, -1, H * W).permute(0, 2, 1)

    def forward(self, x):
        B = x.shape[0]
        for i in range(self.num_stages):
            patch_embed = getattr(self, f'patch_embed{i + 1}')
            x, (H, W) = patch_embed(x)
            x = x + self._get_pos_embed(getattr(self, f'pos_embed{i + 1}'), patch_embed, H, W)
            for blk in getattr(self, f'block{i + 1}'):
                x = blk(x, H, W)
            if i != self.num_stages - 1:
                x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
        return self.head(x.mean(dim=1))  # self.norm is not applied (commented out officially)


class PyramidVisionTransformerV2(nn.Module):
    """FLatten-PVTv2: overlapping patch embeddings, DWConv MLP, ``norm{i}`` after each stage."""

    def __init__(self, img_size=224, num_classes=1000, embed_dims=(64, 128, 256, 512), num_heads=(1, 2, 4, 8),
                 mlp_ratios=(4, 4, 4, 4), depths=(3, 4, 6, 3), sr_ratios=(8, 4, 2, 1), attn_type='LLLL'):
        super().__init__()
        img_size = _pair(img_size)
        self.num_stages = len(depths)
        for i in range(self.num_stages):
            size = img_size if i == 0 else (img_size[0] // 2 ** (i + 1), img_size[1] // 2 ** (i + 1))
            patch_embed = OverlapPatchEmbed(size, 7 if i == 0 else 3, 4 if i == 0 else 2,
                                            3 if i == 0 else embed_dims[i - 1], embed_dims[i])
            setattr(self, f'patch_embed{i + 1}', patch_embed)
            setattr(self, f'block{i + 1}', nn.ModuleList([
                Block(embed_dims[i], patch_embed.num_patches, num_heads[i], mlp_ratios[i],
                      sr_ratios[i] if attn_type[i] == 'S' else 1, attn_type[i], dwconv=True)
                for _ in range(depths[i])]))
            setattr(self, f'norm{i + 1}', nn.LayerNorm(embed_dims[i], eps=1e-6))
        self.head = nn.Linear(embed_dims[3], num_classes)

    def forward(self, x):
        B = x.shape[0]
        for i in range(self.num_stages):
            x, H, W = getattr(self, f'patch_embed{i + 1}')(x)
            for blk in getattr(self, f'block{i + 1}'):
                x = blk(x, H, W)
            x = getattr(self, f'norm{i + 1}')(x)
            if i != self.num_stages - 1:
                x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
        return self.head(x.mean(dim=1))
