"""BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023, arXiv:2303.08810;
https://github.com/rayleizhu/BiFormer).

Two official macro layouts on the shared builder (blocks NHWC):

* ``'biformer'`` (T / S / B): stem Conv3x3/s2 (C/2) BN GELU Conv3x3/s2 BN; downsamplers Conv3x3/s2 + BN;
  blocks ``x + DWConv3x3(x)`` (CPE), then pre-norm attention and MLP (LayerNorm eps 1e-6, MLP ratio 3);
* ``'stl'`` (BiFormer-STL, the Swin-T layout): stem Conv4x4/s4 + BN; downsamplers BN + Conv2x2/s2; blocks
  without CPE, MLP ratio 4.

Stages 1-3 use :class:`~visionattn.layers.BiLevelRoutingAttention` (``'legacy'`` semantics for T / S / B /
STL, ``'nchw'`` for STL-NCHW), stage 4 full attention with LePE (8 heads, as the official default); the
head is BatchNorm2d, global average pool, Linear.

Layout: ``stem.proj`` (+ ``stem.norm`` for STL), ``stages.S.downsample.{reduction, norm}``,
``stages.S.blocks.J.{pos.proj, norm1, attn.{qkv, lepe.conv, proj}, norm2, mlp.{fc1, fc2}}``, ``norm``,
``head.fc``. ``checkpoint_filter_fn`` maps the official layouts (``downsample_layers``, ``stages.S.J``,
``attn.qkv.qkv``, ``attn.wo``, ``qkv_linear``/``output_linear`` 1x1 convs, ``mlp.0/2/3``) onto it.
"""
import re
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, calculate_drop_path_rates
from timm.models import generate_default_cfgs, register_model

from ..layers.bilevel_routing_attention import BiLevelRoutingAttention, GlobalAttentionLePE
from ..layers.conv_pos_enc import ConvPosEnc
from ..layers.mlp import GeluMlp
from ._builder import (
    HierarchicalBackbone, Stage, add_residual, build_visionattn_model, check_state_dict, init_linear_trunc_normal,
    remap_keys, unwrap_state_dict)
from ._embed import ConvNormDownsample

__all__ = ['BiFormer', 'BiFormerBlock', 'checkpoint_filter_fn', 'FAMILY_CARD']

FAMILY_CARD = dict(
    name='BiFormer',
    paper='BiFormer: Vision Transformer with Bi-Level Routing Attention, CVPR 2023, arXiv:2303.08810',
    repo='https://github.com/rayleizhu/BiFormer',
    license='MIT (official code)',
    accuracy={
        'visionattn_biformer_tiny': '81.4 (README)',
        'visionattn_biformer_small': '83.8 (README)',
        'visionattn_biformer_base': '84.3 (README)',
        'visionattn_biformer_stl': '82.7 (README)',
        'visionattn_biformer_stl_nchw': '82.7 (README)',
    },
    load_official=(
        "The official checkpoints (OneDrive links in the official README, `biformer_{tiny,small,base,stl,stl_nchw}"
        "_in1k.pth`, weights under 'model') load with timm.create_model('visionattn_biformer_small', pretrained=True, "
        "pretrained_cfg_overlay=dict(file='biformer_small_in1k.pth')); raw, 'state_dict' and 'module.' files "
        "load too. checkpoint_filter_fn remaps the keys (and the 1x1-conv weights of STL-NCHW) strictly"),
    differences=[
        'The routed token attention never gathers the topk copies of K/V the official code builds: blocks of '
        'query regions gather their routed rows within a fixed budget and run SDPA (CPU), or a fused Triton '
        'kernel reads K/V by region index (CUDA). Training saves q, k, v and the routing index only; the '
        'backward recomputes the probabilities per block. Where the routed regions are at least a quarter of '
        'all regions of a table of at most 256 tokens (the third stage at 224: 16 of 49 regions of 2x2 tokens), '
        'one masked SDPA over the whole table replaces the gather: 3x the routed multiply-adds (counted in the '
        'GMACs column: biformer_small 4.70 against 4.46 routed) in far fewer, larger products. Results equal '
        'the official computation to float rounding.',
        'Any input size works by default (auto_pad=True, the official detection/segmentation setting; at '
        'multiples of 16 * n_win it equals auto_pad=False exactly). STL-NCHW needs maps of at least n_win '
        'tokens per side in its routed stages (112 px at n_win=7).',
        'Routing affinities are computed in float32 under autocast. Where the k-th and (k+1)-th region '
        'affinities lie within float rounding of each other, another runtime (ONNX Runtime, another device) may '
        'pick the other region, as the official code does between devices; the export tests route to every '
        'region for that reason.',
        'Detection: the official backbone has no frozen_stages / out_indices; visionattn.Backbone adds them.',
    ],
)


class BiFormerStem(nn.Module):
    """Conv3x3/s2 (in -> C/2) BN GELU Conv3x3/s2 (C/2 -> C) BN: NCHW -> NCHW (channels-last memory)."""

    def __init__(self, in_chans: int, dim: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, 3, 2, 1, **dd), nn.BatchNorm2d(dim // 2, **dd), nn.GELU(),
            nn.Conv2d(dim // 2, dim, 3, 2, 1, **dd), nn.BatchNorm2d(dim, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).contiguous(memory_format=torch.channels_last)


class PatchStem(nn.Module):
    """Conv4x4/s4 + BatchNorm2d (BiFormer-STL): NCHW -> NCHW (channels-last memory)."""

    def __init__(self, in_chans: int, dim: int, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, 4, 4, device=device, dtype=dtype)
        self.norm = nn.BatchNorm2d(dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x)).contiguous(memory_format=torch.channels_last)


class NormConvDownsample(nn.Module):
    """BatchNorm2d + Conv2x2/s2 (BiFormer-STL): NCHW -> NCHW (channels-last memory)."""

    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_chs, device=device, dtype=dtype)
        self.reduction = nn.Conv2d(in_chs, out_chs, 2, 2, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(x)).contiguous(memory_format=torch.channels_last)


class BiFormerBlock(nn.Module):
    """``x + DWConv3x3(x)`` (when ``pos_embed``); ``x + attn(norm1(x))``; ``x + mlp(norm2(x))`` on an NHWC map."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, pos_embed: bool = True,
                 drop_path: float = 0., device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.pos = ConvPosEnc(dim, 3, **dd) if pos_embed else nn.Identity()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = GeluMlp(dim, int(mlp_ratio * dim), recompute_gelu=True, **dd)  # fits training in memory
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.has_drop_path = drop_path > 0.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos(x)
        if not (self.training and self.has_drop_path):
            x = add_residual(self.attn(self.norm1(x)), x)
            return self.mlp(self.norm2(x), shortcut=x)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class BiFormer(HierarchicalBackbone):
    """BiFormer backbone + classifier.

    Args:
        embed_dims, depths, mlp_ratios: per-stage widths, block counts, MLP ratios.
        topks: per-stage routed regions per query region; ``None`` = full attention with LePE.
        qk_dims: per-stage q/k width of the routed stages (default: the stage width).
        head_dim: q/k width per head in routed stages (heads = qk_dim // head_dim; STL: dim // head_dim).
        global_heads: heads of the full-attention stages (official default 8).
        n_win: regions per side (7 in classification, 16 in the official detection configs).
        layout: ``'biformer'`` (T/S/B stem, CPE blocks) or ``'stl'`` (Swin-T-like stem and downsamplers).
        bra_mode: ``'legacy'`` or ``'nchw'`` (see :mod:`visionattn.layers.bilevel_routing_attention`).
        auto_pad: pad maps that are not multiples of ``n_win`` (official ``auto_pad``; legacy mode).
        side_dwconv: LePE kernel size.
        in_chans, num_classes, global_pool, drop_rate, drop_path_rate, device, dtype: as in timm.
    """

    def __init__(
            self,
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (2, 2, 8, 2),
            mlp_ratios: Sequence[float] = (3, 3, 3, 3),
            topks: Sequence[Optional[int]] = (1, 4, 16, None),
            qk_dims: Optional[Sequence[int]] = None,
            head_dim: int = 32,
            global_heads: int = 8,
            n_win: int = 7,
            layout: str = 'biformer',
            bra_mode: str = 'legacy',
            auto_pad: bool = True,
            side_dwconv: int = 5,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        if layout not in ('biformer', 'stl'):
            raise ValueError(f"layout={layout!r}: expected 'biformer' or 'stl'")
        num_stages = len(depths)
        qk_dims = tuple(qk_dims) if qk_dims is not None else tuple(embed_dims)
        for arg, value in (('embed_dims', embed_dims), ('mlp_ratios', mlp_ratios), ('topks', topks),
                           ('qk_dims', qk_dims)):
            if len(value) != num_stages:
                raise ValueError(f'{arg}={tuple(value)}: expected {num_stages} values (one per stage, as depths)')
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))
        stl = layout == 'stl'
        stem = (PatchStem if stl else BiFormerStem)(in_chans, embed_dims[0], **dd)
        downsample_cls = NormConvDownsample if stl else ConvNormDownsample

        def attention(s: int) -> nn.Module:
            dim = embed_dims[s]
            if topks[s] is None:
                return GlobalAttentionLePE(
                    dim, global_heads, side_dwconv, lepe_on='v' if bra_mode == 'nchw' else 'x', **dd)
            return BiLevelRoutingAttention(
                dim, qk_dims[s] // head_dim, n_win=n_win, topk=topks[s], qk_dim=qk_dims[s],
                side_dwconv=side_dwconv, mode=bra_mode, auto_pad=auto_pad, **dd)

        stages = []
        cur = 0
        for s in range(num_stages):
            dim = embed_dims[s]
            blocks = [
                BiFormerBlock(dim, attention(s), mlp_ratios[s], pos_embed=not stl, drop_path=dpr[cur + j], **dd)
                for j in range(depths[s])]
            cur += depths[s]
            stages.append(Stage(
                blocks, out_chs=dim, reduction=4 * 2 ** s,
                downsample=downsample_cls(embed_dims[s - 1], dim, **dd) if s > 0 else None, block_fmt='NHWC'))
        routed = [s for s in range(num_stages) if topks[s] is not None]
        # 'nchw' regions are (H // n_win, W // n_win) tokens: every routed stage needs n_win tokens per side
        min_input_size = n_win * 4 * 2 ** max(routed) if bra_mode == 'nchw' and routed else 32
        super().__init__(
            stem, stages, num_classes=num_classes, in_chans=in_chans, global_pool=global_pool,
            drop_rate=drop_rate, norm=nn.BatchNorm2d(embed_dims[-1], **dd), min_input_size=min_input_size, **dd)
        self.layout = layout
        self.bra_mode = bra_mode
        self.n_win = n_win
        self.embed_dims = tuple(embed_dims)
        # official: every Linear trunc_normal(0.02) with zero bias, LayerNorm 1 / 0, default conv / BatchNorm
        self.apply(init_linear_trunc_normal)


# ---------------------------------------------------------------------------------------------
# checkpoints

# official key -> visionattn key, applied in order (both layouts)
_BLOCK_RULES = (
    (r'^stages\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.'),
    (r'\.pos_embed\.', '.pos.proj.'),
    (r'\.attn\.qkv\.qkv\.', '.attn.qkv.'),
    (r'\.attn\.(?:wo|output_linear)\.', '.attn.proj.'),
    (r'\.attn\.qkv_linear\.', '.attn.qkv.'),
    (r'\.attn\.lepe\.(weight|bias)$', r'.attn.lepe.conv.\1'),
    (r'\.mlp\.0\.', '.mlp.fc1.'),
    (r'\.mlp\.[23]\.', '.mlp.fc2.'),
    (r'^head\.(weight|bias)$', r'head.fc.\1'),
)
_BIFORMER_RULES = (
    (r'^downsample_layers\.0\.', 'stem.proj.'),
    (r'^downsample_layers\.(\d+)\.0\.', r'stages.\1.downsample.reduction.'),
    (r'^downsample_layers\.(\d+)\.1\.', r'stages.\1.downsample.norm.'),
) + _BLOCK_RULES
_STL_RULES = (
    (r'^downsample_layers\.0\.0\.', 'stem.proj.'),
    (r'^downsample_layers\.0\.1\.', 'stem.norm.'),
    (r'^downsample_layers\.(\d+)\.0\.', r'stages.\1.downsample.norm.'),
    (r'^downsample_layers\.(\d+)\.1\.', r'stages.\1.downsample.reduction.'),
) + _BLOCK_RULES

_LINEAR_WEIGHT = re.compile(r'\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight$')


def checkpoint_filter_fn(state_dict: Dict, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an official BiFormer checkpoint (or visionattn's own layout) onto ``model``, strictly.

    Containers: raw, ``model``, ``state_dict``, ``module.`` prefixes. The 1x1-conv projections of
    BiFormer-STL-NCHW (C_out, C_in, 1, 1) become Linear weights. Missing, unexpected or mis-shaped keys
    raise a ``ValueError`` naming them.
    """
    rules = _STL_RULES if getattr(model, 'layout', 'biformer') == 'stl' else _BIFORMER_RULES
    sd = remap_keys(unwrap_state_dict(state_dict), rules)
    sd = {k: v.flatten(1) if v.ndim == 4 and _LINEAR_WEIGHT.search(k) else v for k, v in sd.items()}
    return check_state_dict(sd, model, source='BiFormer checkpoint', ignore_shape=('stem.proj.0.weight',))


# ---------------------------------------------------------------------------------------------
# registry

def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    return build_visionattn_model(BiFormer, variant, pretrained, checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> Dict:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.proj.0', 'classifier': 'head.fc',
        'license': 'mit',
        'paper_ids': 'arXiv:2303.08810',
        'paper_name': 'BiFormer: Vision Transformer with Bi-Level Routing Attention',
        'origin_url': 'https://github.com/rayleizhu/BiFormer',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'visionattn_biformer_tiny.in1k': _cfg(),
    'visionattn_biformer_small.in1k': _cfg(),
    'visionattn_biformer_base.in1k': _cfg(),
    'visionattn_biformer_stl.in1k': _cfg(first_conv='stem.proj'),
    'visionattn_biformer_stl_nchw.in1k': _cfg(first_conv='stem.proj'),
})


@register_model
def visionattn_biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T (official ``biformer_tiny``), 13.1M params."""
    model_args = dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2))
    return _create_biformer('visionattn_biformer_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S (official ``biformer_small``), 25.5M params; official training drop_path_rate 0.15."""
    model_args = dict(embed_dims=(64, 128, 256, 512), depths=(4, 4, 18, 4))
    return _create_biformer('visionattn_biformer_small', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-B (official ``biformer_base``), 56.8M params."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(4, 4, 18, 4))
    return _create_biformer('visionattn_biformer_base', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_biformer_stl(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-STL (official ``biformer_stl``, Swin-T layout), 28.4M params."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), mlp_ratios=(4, 4, 4, 4), layout='stl')
    return _create_biformer('visionattn_biformer_stl', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_biformer_stl_nchw(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-STL-NCHW (official ``biformer_stl_nchw``, the refactored ``nchwBRA``), 28.4M params."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), mlp_ratios=(4, 4, 4, 4), layout='stl',
                      bra_mode='nchw')
    return _create_biformer('visionattn_biformer_stl_nchw', pretrained, **dict(model_args, **kwargs))
