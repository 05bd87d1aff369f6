"""A transcription of the official Agent-Attention classification models (LeapLabTHU/Agent-Attention,
``agent_transformer/models/agent_{swin,pvt,deit,cswin}.py``), the reference of tests/test_agent.py.

Written for the tests from the official algorithm with the official module structure and key names, so an
official state dict loads into these classes with ``strict=True``. The host pieces (MLPs, window attention,
patch embeddings, patch merging, CSwin LePE branches, merge blocks) are reused from the FLatten transcriptions
tests/swin_reference.py, tests/pvt_reference.py and tests/cswin_reference.py (the Agent files share them with
FLatten); only the agent attention modules, the blocks that hold them and the four models are written here.

Kept as the official code computes (eval only: no dropout / drop path):

* the agents are ``AdaptiveAvgPool2d((p, p))`` of the (patch) **queries**, ``p = int(sqrt(agent_num))``;
* the K-side bias is ``interpolate(an_bias, window, bilinear)`` + ``ah_bias + aw_bias`` (DeiT: ``ac_bias``
  prepended as column 0), the Q-side bias ``interpolate(na_bias, window)`` transposed + ``ha_bias + wa_bias``
  (DeiT: ``ca_bias`` prepended as row 0), with ``window`` the size the module was built for (the clamped Swin
  window, ``sqrt(num_patches)`` in PVT, ``img_size // 16`` in DeiT, the stripe in CSwin);
* the diversity term ``dwc(v)`` (DeiT: patch tokens only; CSwin: LePE ``get_v`` instead) before ``proj``;
* Agent-Swin: ``A`` blocks use the configured window (56: the whole map, clamped to it), ``B`` blocks Swin
  W-MSA in windows of ``max(7, window // 8)`` shifted on odd blocks, ``M<k>``: the first ``k`` blocks ``A``;
* Agent-PVT: PVT v1 host, ``A`` blocks with sr 1, no final norm (mean of the raw last-stage tokens);
* Agent-DeiT: blocks ``i < agent_layer`` agent blocks (``window = img_size // patch``), the others the plain
  DeiT block; agent count of block ``i`` = ``agent_num[{0:0,1:1,2:2,3:2,4:2,5:3}[i // 2]]``;
* Agent-CSwin: ``A`` blocks with the LA split (the stage map: one global ``attns.0`` branch), ``B`` blocks
  CSwin LePE attention.

:func:`downstream_agent_attention` is the attention of the official detection / segmentation Agent-Swin
backbone (``downstream/detection/mmdet/models/backbones/agent_swin.py``): any ``hw_shape``, every bias
resized bilinearly to it and then along the agent grid to ``downstream_agent_shape``.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import cswin_reference as cs
import pvt_reference as pv
import swin_reference as sw

__all__ = ['official_agent', 'SwinAgentAttention', 'AgentSwinTransformer', 'PvtAgentAttention', 'AgentPVT',
           'DeitAgentAttention', 'AgentDeiT', 'CSwinAgentBranch', 'AgentCSWinTransformer',
           'downstream_agent_attention', 'REF_VARIANTS']


# ------------------------------------------------------------------------------------------
# the agent attention itself (shared by the four hosts)
# ------------------------------------------------------------------------------------------

def _add_agent_biases(module, num_heads, agent_num, H, W, cls=False):
    """The official bias parameters (zeros; the official init is trunc_normal(0.02), the tests overwrite them),
    registered directly on ``module`` in the official order (an, na, ah, aw, ha, wa[, ac, ca])."""
    module.an_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
    module.na_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
    module.ah_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, H, 1))
    module.aw_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1, W))
    module.ha_bias = nn.Parameter(torch.zeros(1, num_heads, H, 1, agent_num))
    module.wa_bias = nn.Parameter(torch.zeros(1, num_heads, 1, W, agent_num))
    if cls:
        module.ac_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1))
        module.ca_bias = nn.Parameter(torch.zeros(1, num_heads, 1, agent_num))
    pool = int(agent_num ** 0.5)
    module.pool = nn.AdaptiveAvgPool2d((pool, pool))


def official_agent(m, q, k, v, h, w, window, cls=False):
    """Official steps 2-6 for ``(b, n, c)`` q / k / v of one ``h x w`` map (after a class token with ``cls``)
    and the attention module ``m`` (its ``num_heads``, ``agent_num`` and biases); ``window`` = the
    ``(H, W)`` the 7x7 biases are resized to (the module's build-time size, as officially).
    Returns ``(b, n, c)`` before the diversity term and ``proj``."""
    b, n, c = q.shape
    heads, A = m.num_heads, m.agent_num
    d = c // heads
    scale = d ** -0.5
    pool = int(A ** 0.5)  # the official nn.AdaptiveAvgPool2d((pool, pool))
    patches = q[:, 1:, :] if cls else q
    agent = F.adaptive_avg_pool2d(patches.reshape(b, h, w, c).permute(0, 3, 1, 2), (pool, pool))
    agent = agent.reshape(b, c, -1).permute(0, 2, 1)
    q = q.reshape(b, n, heads, d).permute(0, 2, 1, 3)
    k = k.reshape(b, n, heads, d).permute(0, 2, 1, 3)
    v = v.reshape(b, n, heads, d).permute(0, 2, 1, 3)
    agent = agent.reshape(b, A, heads, d).permute(0, 2, 1, 3)

    position_bias = (F.interpolate(m.an_bias, size=window, mode='bilinear').reshape(1, heads, A, -1)
                     + (m.ah_bias + m.aw_bias).reshape(1, heads, A, -1)).repeat(b, 1, 1, 1)
    if cls:
        position_bias = torch.cat([m.ac_bias.repeat(b, 1, 1, 1), position_bias], dim=-1)
    agent_attn = ((agent * scale) @ k.transpose(-2, -1) + position_bias).softmax(dim=-1)
    agent_v = agent_attn @ v

    agent_bias = (F.interpolate(m.na_bias, size=window, mode='bilinear').reshape(1, heads, A, -1)
                  .permute(0, 1, 3, 2) + (m.ha_bias + m.wa_bias).reshape(1, heads, -1, A)).repeat(b, 1, 1, 1)
    if cls:
        agent_bias = torch.cat([m.ca_bias.repeat(b, 1, 1, 1), agent_bias], dim=-2)
    q_attn = ((q * scale) @ agent.transpose(-2, -1) + agent_bias).softmax(dim=-1)
    return (q_attn @ agent_v).transpose(1, 2).reshape(b, n, c)


def downstream_agent_attention(m, x, hw_shape, agent_shape, scale=-0.5):
    """The official downstream ``AgentAttention.forward(x, mask, hw_shape)`` (Agent-Swin mmdet / mmseg backbone,
    ``downstream_agent_shape=agent_shape``) with the parameters of ``m`` (official names: ``qkv`` -- or ``q`` +
    ``kv``, the PVT form, whose downstream sr-1 path is the same computation -- ``proj``, ``dwc``, the six
    biases sized to the classification map). Every bias is resized to ``hw_shape``, then along the agent grid
    ``p x p`` -> ``agent_shape``."""
    b, n, c = x.shape
    h, w = hw_shape
    assert h * w == n
    num_heads = m.num_heads
    head_dim = c // num_heads
    sc = head_dim ** scale
    if getattr(m, 'qkv', None) is not None:
        q, k, v = m.qkv(x).reshape(b, n, 3, c).permute(2, 0, 1, 3)
    else:
        q = m.q(x)
        k, v = m.kv(x).reshape(b, n, 2, c).permute(2, 0, 1, 3)
    pool_size = int(m.an_bias.shape[1] ** 0.5)
    A = agent_shape[0] * agent_shape[1]
    agent = F.adaptive_avg_pool2d(q.reshape(b, h, w, c).permute(0, 3, 1, 2), agent_shape)
    agent = agent.reshape(b, c, -1).permute(0, 2, 1)
    q = q.reshape(b, n, num_heads, head_dim).permute(0, 2, 1, 3)
    k = k.reshape(b, n, num_heads, head_dim).permute(0, 2, 1, 3)
    v = v.reshape(b, n, num_heads, head_dim).permute(0, 2, 1, 3)
    agent = agent.reshape(b, A, num_heads, head_dim).permute(0, 2, 1, 3)

    def k_side(bias_hw):  # (heads, p*p, h, w) at hw -> (1, heads, A, h*w)
        t = bias_hw.reshape(num_heads, pool_size, pool_size, h * w).permute(0, 3, 1, 2)
        t = F.interpolate(t, size=agent_shape, mode='bilinear')
        return t.reshape(num_heads, h * w, A).permute(0, 2, 1).reshape(1, num_heads, A, h * w)

    def q_side(bias_hw):  # (heads, p*p, h, w) at hw -> (1, heads, h*w, A)
        t = bias_hw.reshape(num_heads, pool_size, pool_size, h * w).permute(0, 3, 1, 2)
        t = F.interpolate(t, size=agent_shape, mode='bilinear')
        return t.reshape(1, num_heads, h * w, A)

    position_bias = (k_side(F.interpolate(m.an_bias, size=hw_shape, mode='bilinear'))
                     + k_side(F.interpolate((m.ah_bias + m.aw_bias).squeeze(0), size=hw_shape, mode='bilinear')))
    agent_attn = ((agent * sc) @ k.transpose(-2, -1) + position_bias).softmax(dim=-1)
    agent_v = agent_attn @ v
    agent_bias = (q_side(F.interpolate(m.na_bias, size=hw_shape, mode='bilinear'))
                  + q_side(F.interpolate((m.ha_bias + m.wa_bias).squeeze(0).permute(0, 3, 1, 2), size=hw_shape,
                                         mode='bilinear')))
    q_attn = ((q * sc) @ agent.transpose(-2, -1) + agent_bias).softmax(dim=-1)
    x = (q_attn @ agent_v).transpose(1, 2).reshape(b, n, c)
    v = v.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
    x = x + m.dwc(v).permute(0, 2, 3, 1).reshape(b, n, c)
    return m.proj(x)


# ------------------------------------------------------------------------------------------
# Agent-Swin (agent_swin.py)
# ------------------------------------------------------------------------------------------

class SwinAgentAttention(nn.Module):
    """Official Agent-Swin ``AgentAttention``: fused ``qkv``, agents over the (square) window, dwc 3x3."""

    def __init__(self, dim, window_size, num_heads, agent_num=49):
        super().__init__()
        self.window_size = window_size
        self.num_heads, self.agent_num = num_heads, agent_num
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        _add_agent_biases(self, num_heads, agent_num, *window_size)

    def forward(self, x, mask=None):  # the shift mask is ignored, as officially
        b, n, c = x.shape
        h = w = int(n ** 0.5)
        q, k, v = self.qkv(x).reshape(b, n, 3, c).permute(2, 0, 1, 3)
        x = official_agent(self, q, k, v, h, w, self.window_size)
        v = v.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return self.proj(x + self.dwc(v).permute(0, 2, 3, 1).reshape(b, n, c))


class AgentSwinBlock(sw.SwinTransformerBlock):
    """The official block (window clamp, shift mask buffer, residuals) with ``attn_type`` ``A`` or ``B``."""

    def __init__(self, dim, resolution, num_heads, ws, shift, attn_type, agent_num):
        # 'L' builds the cheap FLatten module in the attn slot (module order kept), replaced by the agent one
        super().__init__(dim, resolution, num_heads, ws, shift, 'L' if attn_type == 'A' else 'S')
        if attn_type == 'A':
            self.attn = SwinAgentAttention(dim, (self.ws, self.ws), num_heads, agent_num)


class AgentBasicLayer(nn.Module):
    def __init__(self, dim, resolution, depth, num_heads, window_size, agent_num, attn_type, downsample):
        super().__init__()
        types = [attn_type if attn_type[0] != 'M' else ('A' if i < int(attn_type[1:]) else 'B') for i in range(depth)]
        sizes = [window_size if t == 'A' else max(7, window_size // 8) for t in types]
        self.blocks = nn.ModuleList([
            AgentSwinBlock(dim, resolution, num_heads, sizes[i], 0 if i % 2 == 0 else sizes[i] // 2, types[i],
                           agent_num)
            for i in range(depth)])
        self.downsample = sw.PatchMerging(resolution, dim) if downsample else None

    forward = sw.BasicLayer.forward


class AgentSwinTransformer(nn.Module):
    """``AgentSwinTransformer`` (patch 4, no ape, patch norm) with the official ``window_size`` / ``agent_num``
    / ``attn_type`` config arguments."""

    def __init__(self, img_size=224, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                 window_size=56, agent_num=(9, 16, 49, 49), attn_type='AAAB'):
        super().__init__()
        n = len(depths)
        self.patch_embed = sw.PatchEmbed(img_size, embed_dim)
        res = img_size // 4
        self.layers = nn.ModuleList([
            AgentBasicLayer(embed_dim * 2 ** i, (res // 2 ** i, res // 2 ** i), depths[i], num_heads[i], window_size,
                            int(agent_num[i]), attn_type[i] + (attn_type[n:] if attn_type[i] == 'M' else ''),
                            downsample=i < n - 1)
            for i in range(n)])
        self.num_features = embed_dim * 2 ** (n - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)

    forward = sw.FLattenSwinTransformer.forward


# ------------------------------------------------------------------------------------------
# Agent-PVT (agent_pvt.py)
# ------------------------------------------------------------------------------------------

class PvtAgentAttention(nn.Module):
    """Official Agent-PVT ``AgentAttention`` with ``sr_ratio`` 1 (every released config): ``q`` + ``kv``, the
    biases sized to ``window = int(sqrt(num_patches))``, dwc 3x3."""

    def __init__(self, dim, num_patches, num_heads, agent_num=49):
        super().__init__()
        side = int(num_patches ** 0.5)
        self.window_size = (side, side)
        self.num_heads, self.agent_num = num_heads, agent_num
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        _add_agent_biases(self, num_heads, agent_num, side, side)

    def forward(self, x, H, W):
        b, n, c = x.shape
        q = self.q(x)
        k, v = self.kv(x).reshape(b, -1, 2, c).permute(2, 0, 1, 3)
        x = official_agent(self, q, k, v, H, W, self.window_size)
        v = v.reshape(b, H, W, c).permute(0, 3, 1, 2)
        return self.proj(x + self.dwc(v).permute(0, 2, 3, 1).reshape(b, n, c))


class AgentPvtBlock(nn.Module):
    def __init__(self, dim, num_patches, num_heads, mlp_ratio, sr_ratio, agent_num, attn_type):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if attn_type == 'A':
            self.attn = PvtAgentAttention(dim, num_patches, num_heads, agent_num)
        else:
            self.attn = pv.Attention(dim, num_heads, qkv_bias=True, sr_ratio=sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = pv.Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, H, W):
        x = x + self.attn(self.norm1(x), H, W)
        return x + self.mlp(self.norm2(x), H, W)


class AgentPVT(nn.Module):
    """Official ``PyramidVisionTransformer`` of agent_pvt.py (patch 4, qkv_bias, block LayerNorm eps 1e-6, patch
    embedding LayerNorm eps 1e-5, ``agent_sr_ratios`` '1111'); no final norm."""

    def __init__(self, img_size=224, num_classes=1000, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),
                 mlp_ratios=(8, 8, 4, 4), depths=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1), agent_num=(9, 16, 49, 49),
                 attn_type='AAAA'):
        super().__init__()
        self.num_stages = len(depths)
        for i in range(self.num_stages):
            size = (img_size, img_size) if i == 0 else (img_size // 2 ** (i + 1),) * 2
            patch_embed = pv.PatchEmbed(size, 4 if i == 0 else 2, 3 if i == 0 else embed_dims[i - 1], embed_dims[i])
            num_patches = patch_embed.num_patches
            setattr(self, f'patch_embed{i + 1}', patch_embed)
            setattr(self, f'pos_embed{i + 1}', nn.Parameter(torch.zeros(1, num_patches, embed_dims[i])))
            setattr(self, f'block{i + 1}', nn.ModuleList([
                AgentPvtBlock(embed_dims[i], num_patches, num_heads[i], mlp_ratios[i],
                              sr_ratios[i] if attn_type[i] == 'B' else 1, int(agent_num[i]), attn_type[i])
                for _ in range(depths[i])]))
        self.head = nn.Linear(embed_dims[3], num_classes)

    _get_pos_embed = pv.PyramidVisionTransformer._get_pos_embed
    forward = pv.PyramidVisionTransformer.forward  # mean of the last-stage tokens -> head (no norm)


# ------------------------------------------------------------------------------------------
# Agent-DeiT (agent_deit.py + deit.py)
# ------------------------------------------------------------------------------------------

class DeitAgentAttention(nn.Module):
    """Official Agent-DeiT ``AgentAttention``: agents pool the patch queries ``q[:, 1:]``, ``ac_bias`` /
    ``ca_bias`` for the class token, dwc on the patch tokens only; ``window = img_size // patch``."""

    def __init__(self, dim, num_heads, agent_num=49, window=14):
        super().__init__()
        self.num_heads, self.agent_num, self.window = num_heads, agent_num, window
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        _add_agent_biases(self, num_heads, agent_num, window, window, cls=True)

    def forward(self, x):
        b, n, c = x.shape
        h = w = int(n ** 0.5)  # 14 for 197 tokens: flooring, as officially
        q, k, v = self.qkv(x).reshape(b, n, 3, c).permute(2, 0, 1, 3)
        x = official_agent(self, q, k, v, h, w, (self.window, self.window), cls=True)
        v_ = v[:, 1:, :].reshape(b, h, w, c).permute(0, 3, 1, 2)
        x[:, 1:, :] = x[:, 1:, :] + self.dwc(v_).permute(0, 2, 3, 1).reshape(b, n - 1, c)
        return self.proj(x)


class DeitAttention(nn.Module):
    """deit.py ``Attention``: ``(q @ k^T) * scale``."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class DeitBlock(nn.Module):
    """deit.py ``Block`` (``agent=False``) / agent_deit.py ``AgentBlock`` (``agent=True``); LayerNorm eps 1e-6."""

    def __init__(self, dim, num_heads, mlp_ratio=4., agent=False, agent_num=49, window=14):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DeitAgentAttention(dim, num_heads, agent_num, window) if agent else DeitAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = sw.Mlp(dim, int(dim * mlp_ratio))  # timm 0.4 Mlp: fc1, GELU, fc2

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DeitPatchEmbed(nn.Module):
    """timm 0.4.12 ``PatchEmbed`` (conv, flatten, no norm; asserts the input size)."""

    def __init__(self, img_size, patch_size, embed_dim):
        super().__init__()
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)

    def forward(self, x):
        assert x.shape[-2:] == (self.img_size, self.img_size), 'official PatchEmbed: input size must equal img_size'
        return self.proj(x).flatten(2).transpose(1, 2)


class AgentDeiT(nn.Module):
    """agent_deit.py ``VisionTransformer`` (class token, no distillation / pre-logits)."""

    STAGE_NUM = {0: 0, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3}

    def __init__(self, img_size=224, patch_size=16, num_classes=1000, embed_dim=192, depth=12, num_heads=3,
                 mlp_ratio=4., agent_num=(49, 49, 49, 49), agent_layer=-1):
        super().__init__()
        agent_layer = agent_layer if agent_layer > 0 else depth
        self.patch_embed = DeitPatchEmbed(img_size, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.Sequential(*[
            DeitBlock(embed_dim, num_heads, mlp_ratio, agent=i < agent_layer,
                      agent_num=int(agent_num[self.STAGE_NUM[i // 2]]), window=img_size // patch_size)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# ------------------------------------------------------------------------------------------
# Agent-CSwin (agent_cswin.py)
# ------------------------------------------------------------------------------------------

class CSwinAgentBranch(nn.Module):
    """Official Agent-CSwin ``AgentAttention`` branch: per window (stripe, or the whole map with ``idx=-1``)
    agent attention of the branch's q / k / v plus LePE (``get_v``); no projections."""
    im2cswin = cs.FocusedLinearAttention.im2cswin  # (B, N, C) -> windows (B', H_sp * W_sp, C)
    get_lepe = cs.FocusedLinearAttention.get_lepe  # v windows and get_v(v) windows, (B', H_sp * W_sp, C)

    def __init__(self, dim, resolution, idx, split_size, num_heads, agent_num=49):
        super().__init__()
        self.resolution = resolution
        self.num_heads, self.agent_num = num_heads, agent_num
        self.H_sp, self.W_sp = cs._window(idx, resolution, split_size)
        self.get_v = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        _add_agent_biases(self, num_heads, agent_num, self.H_sp, self.W_sp)

    def forward(self, qkv):
        q, k, v = qkv[0], qkv[1], qkv[2]
        H = W = self.resolution
        B, L, C = q.shape
        assert L == H * W
        q, k = self.im2cswin(q), self.im2cswin(k)
        v, lepe = self.get_lepe(v, self.get_v)
        x = official_agent(self, q, k, v, self.H_sp, self.W_sp, (self.H_sp, self.W_sp)) + lepe
        return cs.windows2img(x, self.H_sp, self.W_sp, H, W).view(B, -1, C)


class AgentCSWinBlock(cs.CSWinBlock):
    """The official block; ``A`` blocks get agent branches in the ``attns`` slot (module order kept)."""

    def __init__(self, dim, reso, num_heads, split_size, attn_type, agent_num, last_stage=False):
        super().__init__(dim, reso, num_heads, split_size, last_stage=last_stage, attn_type='S')
        if attn_type == 'A':
            if self.branch_num == 1:
                self.attns = nn.ModuleList([CSwinAgentBranch(dim, reso, -1, split_size, num_heads, agent_num)])
            else:
                self.attns = nn.ModuleList([CSwinAgentBranch(dim // 2, reso, i, split_size, num_heads // 2, agent_num)
                                            for i in range(2)])


class AgentCSWinTransformer(cs.CSWinTransformer):
    """Official ``CSWinTransformer`` of agent_cswin.py (``attn_type`` without ``M``)."""

    def __init__(self, img_size=224, num_classes=1000, embed_dim=64, depth=(2, 4, 18, 1), split_size=(1, 2, 7, 7),
                 la_split_size='56-28-14-7', num_heads=(2, 4, 8, 16), agent_num=(9, 16, 49, 49), attn_type='AABB'):
        nn.Module.__init__(self)
        assert 'M' not in attn_type
        la = [int(s) for s in la_split_size.split('-')]
        self.stage1_conv_embed = nn.Sequential(
            nn.Conv2d(3, embed_dim, 7, 4, 2), cs.Rearrange(img_size // 4, img_size // 4), nn.LayerNorm(embed_dim))
        dim = embed_dim
        for s in range(4):
            if s > 0:
                setattr(self, f'merge{s}', cs.Merge_Block(dim, dim * 2))
                dim *= 2
            t = attn_type[s]
            setattr(self, f'stage{s + 1}', nn.ModuleList([
                AgentCSWinBlock(dim, img_size // 2 ** (s + 2), num_heads[s], la[s] if t == 'A' else split_size[s], t,
                                int(agent_num[s]), last_stage=s == 3)
                for _ in range(depth[s])]))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)


# ------------------------------------------------------------------------------------------
# the released variants (official model functions + cfgs)
# ------------------------------------------------------------------------------------------

_SWIN_96 = dict(embed_dim=96, num_heads=(3, 6, 12, 24))
_SWIN_128 = dict(embed_dim=128, num_heads=(4, 8, 16, 32))
_PVT = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4))
REF_VARIANTS = {  # official layout name -> (reference class, kwargs)
    'agent_swin_t': (AgentSwinTransformer, dict(_SWIN_96, depths=(2, 2, 6, 2), attn_type='AAAB')),
    'agent_swin_s': (AgentSwinTransformer, dict(_SWIN_96, depths=(2, 2, 18, 2), attn_type='AABB')),
    'agent_swin_s_288': (AgentSwinTransformer, dict(_SWIN_96, depths=(2, 2, 18, 2), attn_type='AABB',
                                                    img_size=288, window_size=72)),
    'agent_swin_b': (AgentSwinTransformer, dict(_SWIN_128, depths=(2, 2, 18, 2), attn_type='AAMB2')),
    'agent_swin_b_384': (AgentSwinTransformer, dict(_SWIN_128, depths=(2, 2, 18, 2), attn_type='AAMB2',
                                                    img_size=384, window_size=96)),
    'agent_pvt_t': (AgentPVT, dict(_PVT, depths=(2, 2, 2, 2))),
    'agent_pvt_s': (AgentPVT, dict(_PVT, depths=(3, 4, 6, 3))),
    'agent_pvt_m': (AgentPVT, dict(_PVT, depths=(3, 4, 18, 3))),
    'agent_pvt_m_256': (AgentPVT, dict(_PVT, depths=(3, 4, 18, 3), img_size=256)),
    'agent_pvt_b': (AgentPVT, dict(_PVT, depths=(3, 8, 27, 3))),
    'agent_deit_t': (AgentDeiT, dict(embed_dim=192, num_heads=3)),
    'agent_deit_s': (AgentDeiT, dict(embed_dim=384, num_heads=6)),
    'agent_deit_s_448': (AgentDeiT, dict(embed_dim=384, num_heads=6, img_size=448)),
    'agent_deit_b': (AgentDeiT, dict(embed_dim=768, num_heads=12, agent_layer=4, agent_num=(81, 81, 81, 81))),
    'agent_cswin_t': (AgentCSWinTransformer, dict(depth=(2, 4, 18, 1))),
    'agent_cswin_s': (AgentCSWinTransformer, dict(depth=(3, 6, 29, 2))),
    'agent_cswin_b': (AgentCSWinTransformer, dict(embed_dim=96, depth=(3, 6, 29, 2), num_heads=(4, 8, 16, 32))),
    'agent_cswin_b_384': (AgentCSWinTransformer, dict(
        embed_dim=96, depth=(3, 6, 29, 2), num_heads=(4, 8, 16, 32), img_size=384, split_size=(1, 2, 12, 12),
        la_split_size='96-48-24-12')),
}


def build_reference(variant, **overrides):
    cls, kwargs = REF_VARIANTS[variant]
    return cls(**dict(kwargs, **overrides))
