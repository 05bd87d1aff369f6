"""A transcription of the official FLatten-Swin model (LeapLabTHU/FLatten-Transformer ``models/flatten_swin.py``),
the reference of tests/test_flatten_swin.py.

Written for the tests from the official algorithm, with the official module structure and key names (``patch_embed``,
``layers.i.blocks.j`` with the persistent ``attn.relative_position_index`` / ``attn_mask`` buffers,
``layers.i.downsample``, ``norm``, ``head``), so an official state dict loads into it directly. Kept as the
official code computes: square windows only, the block's clamp (``min(resolution) <= window`` -> one window, no
shift), the ``S`` window rule ``7 if window <= 56 else 12``, ``M<k>`` stages, the shift mask ignored by the
``L`` blocks, ``window_partition`` without padding (the map must be a multiple of the window). The focused linear
attention itself is :func:`official_focused` of tests/test_focused_linear_attention.py.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from test_focused_linear_attention import official_focused


def window_partition(x, ws):
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, C)


def window_reverse(windows, ws, H, W):
    B = windows.shape[0] // ((H // ws) * (W // ws))
    x = windows.view(B, H // ws, W // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, -1)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Official W-MSA: q * scale, q @ k^T + bias[relative_position_index] (+ mask), softmax, @ v, proj."""

    def __init__(self, dim, ws, num_heads):
        super().__init__()
        self.ws, self.num_heads = ws, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing='ij')).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += ws - 1
        rel[:, :, 1] += ws - 1
        rel[:, :, 0] *= 2 * ws - 1
        self.register_buffer('relative_position_index', rel.sum(-1))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj(x)


class FocusedLinearAttention(nn.Module):
    """Official FLatten-Swin attention: fused qkv, k += positional_encoding, focused linear attention, proj."""

    def __init__(self, dim, ws, num_heads, kernel_size=5):
        super().__init__()
        self.ws, self.num_heads = ws, num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_encoding = nn.Parameter(torch.zeros(1, ws * ws, dim))

    def forward(self, x, mask=None):  # the mask is ignored, as officially
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, C).permute(2, 0, 1, 3)
        k = k + self.positional_encoding
        return self.proj(official_focused(q, k, v, self.scale, self.dwc, self.num_heads, self.ws, self.ws))


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim, resolution, num_heads, ws, shift, attn_type):
        super().__init__()
        self.resolution = resolution
        if min(resolution) <= ws:  # the official clamp
            shift, ws = 0, min(resolution)
        self.ws, self.shift = ws, shift
        self.norm1 = nn.LayerNorm(dim)
        attn = FocusedLinearAttention if attn_type == 'L' else WindowAttention
        self.attn = attn(dim, ws, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        attn_mask = None
        if shift > 0:
            H, W = resolution
            img_mask = torch.zeros(1, H, W, 1)
            slices = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
            cnt = 0
            for h in slices:
                for w in slices:
                    img_mask[:, h, w, :] = cnt
                    cnt += 1
            mw = window_partition(img_mask, ws).view(-1, ws * ws)
            attn_mask = mw.unsqueeze(1) - mw.unsqueeze(2)
            attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        self.register_buffer('attn_mask', attn_mask)

    def shifted_window_attention(self, x):
        """(B, H, W, C) normalised map at ``resolution`` -> (B, H, W, C): shift, windows, attention, back."""
        B, H, W, C = x.shape
        if self.shift > 0:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = window_partition(x, self.ws).view(-1, self.ws * self.ws, C)
        windows = self.attn(windows, mask=self.attn_mask)
        x = window_reverse(windows.view(-1, self.ws, self.ws, C), self.ws, H, W)
        if self.shift > 0:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x

    def forward(self, x):
        H, W = self.resolution
        B, L, C = x.shape
        x = x + self.shifted_window_attention(self.norm1(x).view(B, H, W, C)).reshape(B, H * W, C)
        return x + self.mlp(self.norm2(x))


def swin_det_block(block, x, H, W):
    """The official Swin *detection* block (Swin-Transformer-Object-Detection ``SwinTransformerBlock``) on an
    ``H x W`` map (B, H * W, C) smaller than ``block.resolution``, the map padded to whole windows: norm1, zero-pad
    bottom/right, shift, windows with the mask of the padded map (that of a block built at the padded size),
    reverse, crop, residual, MLP."""
    B, L, C = x.shape
    Hp, Wp = block.resolution
    y = F.pad(block.norm1(x).view(B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H))
    x = x + block.shifted_window_attention(y)[:, :H, :W].reshape(B, H * W, C)
    return x + block.mlp(block.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, resolution, dim):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        H, W = self.resolution
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class BasicLayer(nn.Module):
    def __init__(self, dim, resolution, depth, num_heads, window_size, attn_type, downsample):
        super().__init__()
        types = [attn_type if attn_type[0] != 'M' else ('L' if i < int(attn_type[1:]) else 'S') for i in range(depth)]
        sizes = [window_size if t == 'L' else (7 if window_size <= 56 else 12) for t in types]
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, resolution, num_heads, sizes[i], 0 if i % 2 == 0 else sizes[i] // 2, types[i])
            for i in range(depth)])
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, img_size, embed_dim):
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(3, embed_dim, 4, 4)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        assert x.shape[-2:] == (self.img_size, self.img_size), 'official PatchEmbed: input size must equal img_size'
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class FLattenSwinTransformer(nn.Module):
    def __init__(self, img_size=224, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                 window_size=56, attn_type='LLSS'):
        super().__init__()
        n = len(depths)
        self.patch_embed = PatchEmbed(img_size, embed_dim)
        res = img_size // 4
        self.layers = nn.ModuleList([
            BasicLayer(embed_dim * 2 ** i, (res // 2 ** i, res // 2 ** i), depths[i], num_heads[i], window_size,
                       attn_type[i] + (attn_type[n:] if attn_type[i] == 'M' else ''), downsample=i < n - 1)
            for i in range(n)])
        self.num_features = embed_dim * 2 ** (n - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = F.adaptive_avg_pool1d(self.norm(x).transpose(1, 2), 1).flatten(1)
        return self.head(x)
