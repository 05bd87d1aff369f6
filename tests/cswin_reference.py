"""A transcription of the official FLatten-CSwin classification model (LeapLabTHU/FLatten-Transformer,
``models/flatten_cswin.py``), written out to serve as the fidelity reference for ``visionattn``'s CSwin host.

Same module structure, key names and forward as the official code (the ``Rearrange`` of einops is
replaced by a small module of the same name doing ``'b c h w -> b (h w) c'``), so an official state
dict loads into :class:`CSWinTransformer` directly. The focused-linear math is ``official_focused``
of ``test_focused_linear_attention.py``. As in the official code the model runs only at its
``img_size`` (square) and every split must divide its stage map; ``L`` blocks must be global
(``la_split`` == stage map, as every released config), since the official branch reshapes the
windows back to the map's batch. :func:`seg_lepe_attention` is the padded LePE branch of the
official CSwin segmentation backbone (microsoft/CSWin-Transformer ``segmentation/backbone``).
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from test_focused_linear_attention import official_focused


class Rearrange(nn.Module):
    """einops ``Rearrange('b c h w -> b (h w) c', h=..., w=...)``: checks the map size, flattens it."""

    def __init__(self, h, w):
        super().__init__()
        self.h, self.w = h, w

    def forward(self, x):
        assert x.shape[2:] == (self.h, self.w)
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def img2windows(img, H_sp, W_sp):
    B, C, H, W = img.shape
    img_reshape = img.view(B, C, H // H_sp, H_sp, W // W_sp, W_sp)
    return img_reshape.permute(0, 2, 4, 3, 5, 1).contiguous().reshape(-1, H_sp * W_sp, C)


def windows2img(img_splits_hw, H_sp, W_sp, H, W):
    B = int(img_splits_hw.shape[0] / (H * W / H_sp / W_sp))
    img = img_splits_hw.view(B, H // H_sp, W // W_sp, H_sp, W_sp, -1)
    return img.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


def _window(idx, resolution, split_size):
    if idx == -1:
        return resolution, resolution
    if idx == 0:
        return resolution, split_size
    return split_size, resolution


class LePEAttention(nn.Module):
    def __init__(self, dim, resolution, idx, split_size, num_heads):
        super().__init__()
        self.resolution = resolution
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.H_sp, self.W_sp = _window(idx, resolution, split_size)
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def im2cswin(self, x):
        B, N, C = x.shape
        H = W = int(np.sqrt(N))
        x = x.transpose(-2, -1).contiguous().view(B, C, H, W)
        x = img2windows(x, self.H_sp, self.W_sp)
        return x.reshape(-1, self.H_sp * self.W_sp, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)

    def get_lepe(self, x, func):
        B, N, C = x.shape
        H = W = int(np.sqrt(N))
        x = x.transpose(-2, -1).contiguous().view(B, C, H, W)
        H_sp, W_sp = self.H_sp, self.W_sp
        x = x.view(B, C, H // H_sp, H_sp, W // W_sp, W_sp)
        x = x.permute(0, 2, 4, 1, 3, 5).contiguous().reshape(-1, C, H_sp, W_sp)
        lepe = func(x)
        lepe = lepe.reshape(-1, self.num_heads, C // self.num_heads, H_sp * W_sp).permute(0, 1, 3, 2)
        x = x.reshape(-1, self.num_heads, C // self.num_heads, H_sp * W_sp).permute(0, 1, 3, 2)
        return x, lepe

    def forward(self, qkv):
        q, k, v = qkv[0], qkv[1], qkv[2]
        H = W = self.resolution
        B, L, C = q.shape
        assert L == H * W
        q = self.im2cswin(q)
        k = self.im2cswin(k)
        v, lepe = self.get_lepe(v, self.get_v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = F.softmax(attn, dim=-1, dtype=attn.dtype)
        x = (attn @ v) + lepe
        x = x.transpose(1, 2).reshape(-1, self.H_sp * self.W_sp, C)
        return windows2img(x, self.H_sp, self.W_sp, H, W).view(B, -1, C)


class FocusedLinearAttention(nn.Module):
    def __init__(self, dim, resolution, idx, split_size, num_heads, focusing_factor=3, kernel_size=5):
        super().__init__()
        assert idx == -1, 'the official L branch reshapes windows to the map batch: global only'
        assert focusing_factor == 3  # official_focused writes the cube out
        self.resolution = resolution
        self.num_heads = num_heads
        self.H_sp, self.W_sp = _window(idx, resolution, split_size)
        head_dim = dim // num_heads
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size=kernel_size, groups=head_dim, padding=kernel_size // 2)
        self.scale = nn.Parameter(torch.zeros(size=(1, 1, dim)))
        self.positional_encoding = nn.Parameter(torch.zeros(size=(1, self.H_sp * self.W_sp, dim)))

    def im2cswin(self, x):
        B, N, C = x.shape
        H = W = int(np.sqrt(N))
        x = x.transpose(-2, -1).contiguous().view(B, C, H, W)
        return img2windows(x, self.H_sp, self.W_sp)

    def get_lepe(self, x, func):
        B, N, C = x.shape
        H = W = int(np.sqrt(N))
        x = x.transpose(-2, -1).contiguous().view(B, C, H, W)
        H_sp, W_sp = self.H_sp, self.W_sp
        x = x.view(B, C, H // H_sp, H_sp, W // W_sp, W_sp)
        x = x.permute(0, 2, 4, 1, 3, 5).contiguous().reshape(-1, C, H_sp, W_sp)
        lepe = func(x).reshape(-1, C, H_sp * W_sp).permute(0, 2, 1)
        x = x.reshape(-1, C, H_sp * W_sp).permute(0, 2, 1)
        return x, lepe

    def forward(self, qkv):
        q, k, v = qkv[0], qkv[1], qkv[2]
        H = W = self.resolution
        B, L, C = q.shape
        assert L == H * W
        q = self.im2cswin(q)
        k = self.im2cswin(k)
        v, lepe = self.get_lepe(v, self.get_v)
        k = k + self.positional_encoding
        x = official_focused(q, k, v, self.scale, self.dwc, self.num_heads, self.H_sp, self.W_sp) + lepe
        return windows2img(x, self.H_sp, self.W_sp, H, W).view(B, -1, C)


class CSWinBlock(nn.Module):
    def __init__(self, dim, reso, num_heads, split_size, mlp_ratio=4., qkv_bias=True, last_stage=False,
                 attn_type='L'):
        super().__init__()
        self.patches_resolution = reso
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm1 = nn.LayerNorm(dim)
        last_stage = last_stage or reso == split_size
        self.branch_num = 1 if last_stage else 2
        self.proj = nn.Linear(dim, dim)
        branch = FocusedLinearAttention if attn_type == 'L' else LePEAttention
        if last_stage:
            self.attns = nn.ModuleList([branch(dim, reso, -1, split_size, num_heads)])
        else:
            self.attns = nn.ModuleList([
                branch(dim // 2, reso, i, split_size, num_heads // 2) for i in range(self.branch_num)])
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x):
        H = W = self.patches_resolution
        B, L, C = x.shape
        assert L == H * W
        img = self.norm1(x)
        qkv = self.qkv(img).reshape(B, -1, 3, C).permute(2, 0, 1, 3)
        if self.branch_num == 2:
            x1 = self.attns[0](qkv[:, :, :, :C // 2])
            x2 = self.attns[1](qkv[:, :, :, C // 2:])
            attened_x = torch.cat([x1, x2], dim=2)
        else:
            attened_x = self.attns[0](qkv)
        x = x + self.proj(attened_x)
        return x + self.mlp(self.norm2(x))


class Merge_Block(nn.Module):
    def __init__(self, dim, dim_out):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
        self.norm = nn.LayerNorm(dim_out)

    def forward(self, x):
        B, new_HW, C = x.shape
        H = W = int(np.sqrt(new_HW))
        x = x.transpose(-2, -1).contiguous().view(B, C, H, W)
        x = self.conv(x)
        B, C = x.shape[:2]
        x = x.view(B, C, -1).transpose(-2, -1).contiguous()
        return self.norm(x)


class CSWinTransformer(nn.Module):
    """The official model (no dropout / drop path: eval only); ``attn_type`` without ``M``."""

    def __init__(self, img_size=224, in_chans=3, num_classes=1000, embed_dim=64, depth=(2, 4, 18, 1),
                 split_size=(1, 2, 7, 7), la_split_size='56-28-14-7', num_heads=(2, 4, 8, 16), mlp_ratio=4.,
                 qkv_bias=True, attn_type='LLSS'):
        super().__init__()
        la_split_size = [int(s) for s in la_split_size.split('-')]
        self.stage1_conv_embed = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, 7, 4, 2),
            Rearrange(h=img_size // 4, w=img_size // 4),
            nn.LayerNorm(embed_dim))
        curr_dim = embed_dim
        for s in range(4):
            if s > 0:
                setattr(self, f'merge{s}', Merge_Block(curr_dim, curr_dim * 2))
                curr_dim *= 2
            t = attn_type[s]
            setattr(self, f'stage{s + 1}', nn.ModuleList([
                CSWinBlock(curr_dim, img_size // 2 ** (s + 2), num_heads[s],
                           la_split_size[s] if t == 'L' else split_size[s], mlp_ratio, qkv_bias,
                           last_stage=s == 3, attn_type=t)
                for _ in range(depth[s])]))
        self.norm = nn.LayerNorm(curr_dim)
        self.head = nn.Linear(curr_dim, num_classes)

    def forward(self, x):
        x = self.stage1_conv_embed(x)
        for blk in self.stage1:
            x = blk(x)
        for pre, blocks in zip([self.merge1, self.merge2, self.merge3], [self.stage2, self.stage3, self.stage4]):
            x = pre(x)
            for blk in blocks:
                x = blk(x)
        x = self.norm(x)
        return self.head(torch.mean(x, dim=1))


def seg_lepe_attention(temp, get_v, idx, split_size, num_heads):
    """The official segmentation ``LePEAttention.forward`` on ``temp`` = ``(B, 3, C, H, W)`` q / k / v of one
    branch (any ``H x W``): symmetric zero padding to the stripe, attention + LePE, crop -> ``(B, H * W, C)``."""
    B, _, C, H, W = temp.shape
    H_sp, W_sp = (H, W) if idx == -1 else (H, split_size) if idx == 0 else (split_size, W)
    H_pad = (H_sp - H % H_sp) % H_sp
    W_pad = (W_sp - W % W_sp) % W_sp
    top_pad, left_pad = H_pad // 2, W_pad // 2
    qkv = F.pad(temp, (left_pad, W_pad - left_pad, top_pad, H_pad - top_pad)).permute(1, 0, 2, 3, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]

    def im2cswin(x):
        x = img2windows(x, H_sp, W_sp)
        return x.reshape(-1, H_sp * W_sp, num_heads, C // num_heads).permute(0, 2, 1, 3)

    q, k = im2cswin(q), im2cswin(k)
    Bv, Cv, Hp, Wp = v.shape
    v = v.view(Bv, Cv, Hp // H_sp, H_sp, Wp // W_sp, W_sp).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, H_sp, W_sp)
    rpe = get_v(v).reshape(-1, num_heads, C // num_heads, H_sp * W_sp).permute(0, 1, 3, 2)
    v = v.reshape(-1, num_heads, C // num_heads, H_sp * W_sp).permute(0, 1, 3, 2)
    attn = F.softmax((q * (C // num_heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
    x = ((attn @ v) + rpe).transpose(1, 2).reshape(-1, H_sp * W_sp, C)
    x = windows2img(x, H_sp, W_sp, H + H_pad, W + W_pad)
    return x[:, top_pad:H + top_pad, left_pad:W + left_pad, :].reshape(B, -1, C)
