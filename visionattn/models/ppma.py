"""PPMA: Polyline Path Masked Attention for Vision Transformer (Zhao et al., NeurIPS 2025,
arXiv:2506.15940; https://github.com/zhongchenzhao/PPMA).

A 4-stage pyramid built on RMT:

* stem (stride 4): Conv3x3/s2 (in -> C/2) BN GELU, Conv3x3 (C/2) BN GELU, Conv3x3/s2 (C/2 -> C) BN GELU,
  Conv3x3 (C) BN;
* blocks (NHWC): ``x + DWConv3x3(x)``, then pre-norm polyline-path attention and an FFN
  (fc1 GELU ``x + DWConv3x3(x)`` fc2), LayerNorm eps 1e-6, optional layer scale;
  attention is ``whole`` or ``chunk`` per stage (:mod:`visionattn.layers.polyline_attention`);
* downsample between stages: Conv3x3/s2 (with bias) + BatchNorm2d;
* head: Linear(C4 -> 1024) per token, BatchNorm2d, Swish, global average pool, Linear.

Layout (shared builder): ``stem.proj.{0..10}``, ``stages.S.rel_pos.angle`` (official ``Relpos``),
``stages.S.blocks.J.{pos.proj, norm1, attn, ls1, norm2, mlp.{fc1, dwconv.proj, fc2}, ls2}``,
``stages.S.downsample`` (official ``layers.{S-1}.downsample``), ``norm.{fc, bn}`` (official ``proj`` /
``norm``), ``head.fc``. ``checkpoint_filter_fn`` maps the official layout (all containers the official
scripts write: ``model``, ``models``, ``model_ema``) onto it.
"""
import logging
import re
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerScale, calculate_drop_path_rates
from timm.models import generate_default_cfgs, register_model

from ..layers.conv_pos_enc import ConvPosEnc
from ..layers.fused_linear import fused_linear
from ..layers.polyline_attention import PolylinePathAttention, PolylineRoPE
from ._builder import (
    HierarchicalBackbone, Stage, build_visionattn_model, check_state_dict, init_linear_trunc_normal, remap_keys,
    unwrap_state_dict)
from ._embed import ConvNormDownsample

__all__ = ['PPMA', 'PPMABlock', 'checkpoint_filter_fn', 'FAMILY_CARD']

_logger = logging.getLogger(__name__)

FAMILY_CARD = dict(
    name='PPMA',
    paper='Polyline Path Masked Attention for Vision Transformer, NeurIPS 2025, arXiv:2506.15940',
    repo='https://github.com/zhongchenzhao/PPMA',
    license='MIT (official code)',
    accuracy={
        'visionattn_ppma_tiny': '82.6 (README; EMA 82.60, non-EMA 82.58 in the training log)',
        'visionattn_ppma_small': '84.2 (README; EMA 84.19, non-EMA 84.01 in the training log)',
        'visionattn_ppma_base': '85.0 (README; EMA 84.98, non-EMA 84.68 in the training log)',
    },
    load_official=(
        "`timm.create_model('visionattn_ppma_tiny', pretrained=True)` downloads the official training checkpoint "
        "(`best.pth` on the Hugging Face hub, ZhongchenZhao/PPMA, the README's links) into the hub cache; a file "
        "downloaded by hand loads with timm.create_model('visionattn_ppma_tiny', pretrained=True, "
        "pretrained_cfg_overlay=dict(file='best.pth')). Official files under 'model', 'models' or "
        "'model_ema' (EMA preferred when present, as the README accuracies are EMA; the choice is logged), "
        "raw or with 'module.' prefixes, are remapped by checkpoint_filter_fn; the pickled training `args` "
        "(an argparse.Namespace) are read under weights_only=True like everything else"),
    differences=[
        'The whole-mode L x L polyline mask is never materialised: query rows are processed in blocks '
        'and the row / column segment-sum tables are broadcast into the logits. Chunk mode runs head groups '
        '(or row / column blocks) within a fixed memory budget. Both train through custom autograd functions '
        'whose backward recomputes the attention probabilities, so no L x L or (H, W, W) map is kept for backward.',
        'q / k / v and the shared dt_linear run as one GEMM (k scale folded into its weight); '
        'results equal the official computation to float rounding.',
        'Swish is torch SiLU (same function and gradient; the official code uses a custom autograd Function).',
        'The official entry points hard-code drop_path_rate (0.1 / 0.15 / 0.4 for T / S / B) and ignore '
        'the command-line value; here drop_path_rate is a normal argument (default 0).',
        'Detection: the official backbone has no frozen_stages / norm_eval; visionattn.Backbone adds them.',
    ],
)


class PPMAStem(nn.Module):
    """Four Conv3x3 (strides 2, 1, 2, 1) with BatchNorm, GELU between: NCHW -> NCHW (channels-last memory)."""

    def __init__(self, in_chans: int, dim: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        half = dim // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, 2, 1, **dd), nn.BatchNorm2d(half, **dd), nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1, **dd), nn.BatchNorm2d(half, **dd), nn.GELU(),
            nn.Conv2d(half, dim, 3, 2, 1, **dd), nn.BatchNorm2d(dim, **dd), nn.GELU(),
            nn.Conv2d(dim, dim, 3, 1, 1, **dd), nn.BatchNorm2d(dim, **dd),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).contiguous(memory_format=torch.channels_last)


class PPMAMlp(nn.Module):
    """fc1 -> GELU -> ``x + DWConv3x3(x)`` -> fc2 on an NHWC map (official ``FeedForwardNetwork``).

    fc1 + GELU and fc2 + the optional ``shortcut`` each run as one fused op at CPU inference.
    """

    def __init__(self, dim: int, hidden_dim: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.fc1 = nn.Linear(dim, hidden_dim, **dd)
        self.dwconv = ConvPosEnc(hidden_dim, 3, **dd)
        self.fc2 = nn.Linear(hidden_dim, dim, **dd)

    def forward(self, x: torch.Tensor, shortcut: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.dwconv(fused_linear(x, self.fc1.weight, self.fc1.bias, act='gelu'))
        return fused_linear(x, self.fc2.weight, self.fc2.bias, residual=shortcut)


class PPMABlock(nn.Module):
    """``x + DWConv3x3(x)``; ``x + ls1(attn(norm1(x), rope))``; ``x + ls2(mlp(norm2(x)))`` on an NHWC map."""

    def __init__(
            self, dim: int, num_heads: int, mlp_ratio: float, mode: str, drop_path: float = 0.,
            layer_scale_init: Optional[float] = None, device=None, dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.pos = ConvPosEnc(dim, 3, **dd)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.attn = PolylinePathAttention(dim, num_heads, mode=mode, **dd)
        self.ls1 = LayerScale(dim, layer_scale_init, **dd) if layer_scale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = PPMAMlp(dim, int(mlp_ratio * dim), **dd)
        self.ls2 = LayerScale(dim, layer_scale_init, **dd) if layer_scale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

        # the residual adds go into the output linears unless a layer scale or active drop path sits between
        self.fuse_residual = layer_scale_init is None
        self.has_drop_path = drop_path > 0.

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = self.pos(x)
        if self.fuse_residual and not (self.training and self.has_drop_path):
            x = self.attn(self.norm1(x), rope, shortcut=x)
            return self.mlp(self.norm2(x), shortcut=x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rope)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class PPMAPreHead(nn.Module):
    """Per-token Linear(C -> 1024), BatchNorm2d, Swish (official ``proj`` / ``norm`` / ``swish``): NCHW -> NCHW."""

    def __init__(self, dim: int, out_dim: int, device=None, dtype=None):
        super().__init__()
        self.fc = nn.Linear(dim, out_dim, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_dim, device=device, dtype=dtype)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)))


class PPMA(HierarchicalBackbone):
    """PPMA backbone + classifier.

    Args:
        embed_dims, depths, num_heads, mlp_ratios: per-stage widths, block counts, heads, MLP ratios.
        modes: per-stage attention mode, ``'chunk'`` (criss-cross) or ``'whole'`` (full, polyline mask).
        layer_scales: per-stage flag for layer scale (init ``layer_scale_init``).
        projection: width of the pre-head projection (official 1024).
        in_chans, num_classes, global_pool, drop_rate, drop_path_rate, device, dtype: as in timm.
    """

    def __init__(
            self,
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (2, 2, 8, 2),
            num_heads: Sequence[int] = (4, 4, 8, 16),
            mlp_ratios: Sequence[float] = (3, 3, 3, 3),
            modes: Sequence[str] = ('chunk', 'chunk', 'whole', 'whole'),
            layer_scales: Sequence[bool] = (False, False, False, False),
            layer_scale_init: float = 1e-6,
            projection: int = 1024,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        for arg, value in (('embed_dims', embed_dims), ('num_heads', num_heads), ('mlp_ratios', mlp_ratios),
                           ('modes', modes), ('layer_scales', layer_scales)):
            if len(value) != num_stages:
                raise ValueError(f'{arg}={tuple(value)}: expected {num_stages} values (one per stage, as depths)')
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))
        stem = PPMAStem(in_chans, embed_dims[0], **dd)
        stages = []
        cur = 0
        for s in range(num_stages):
            dim = embed_dims[s]
            blocks = [
                PPMABlock(dim, num_heads[s], mlp_ratios[s], modes[s], drop_path=dpr[cur + j],
                          layer_scale_init=layer_scale_init if layer_scales[s] else None, **dd)
                for j in range(depths[s])]
            cur += depths[s]
            stages.append(Stage(
                blocks, out_chs=dim, reduction=4 * 2 ** s,
                downsample=ConvNormDownsample(embed_dims[s - 1], dim, **dd) if s > 0 else None,
                rel_pos=PolylineRoPE(dim // num_heads[s], **dd), block_fmt='NHWC'))
        super().__init__(
            stem, stages, num_classes=num_classes, in_chans=in_chans, global_pool=global_pool,
            drop_rate=drop_rate, norm=PPMAPreHead(embed_dims[-1], projection, **dd), num_features=projection,
            min_input_size=32,
            no_weight_decay_keys=[
                f'stages.{s}.blocks.{j}.attn.path_embed.{p}'
                for s in range(num_stages) for j in range(depths[s]) for p in ('dt_bias', 'A_log')],
            **dd)
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.modes = tuple(modes)
        # official: every Linear trunc_normal(0.02) with zero bias (the attention's xavier init is
        # overwritten), unit LayerNorm, default conv / BatchNorm; path parameters keep their own init
        self.apply(init_linear_trunc_normal)


# ---------------------------------------------------------------------------------------------
# checkpoints

def _next_stage(match: re.Match) -> str:
    return f'stages.{int(match.group(1)) + 1}.downsample.'


# official key -> visionattn key, applied in order
_OFFICIAL_RULES = (
    (r'^patch_embed\.proj\.', 'stem.proj.'),
    (r'^layers\.(\d+)\.downsample\.', _next_stage),
    (r'^layers\.(\d+)\.Relpos\.', r'stages.\1.rel_pos.'),
    (r'^layers\.(\d+)\.blocks\.', r'stages.\1.blocks.'),
    (r'\.retention_layer_norm\.', '.norm1.'),
    (r'\.retention\.', '.attn.'),
    (r'\.final_layer_norm\.', '.norm2.'),
    (r'\.ffn\.dwconv\.conv\.', '.mlp.dwconv.proj.'),
    (r'\.ffn\.', '.mlp.'),
    (r'\.pos\.conv\.', '.pos.proj.'),
    (r'\.gamma_1$', '.ls1.gamma'),
    (r'\.gamma_2$', '.ls2.gamma'),
    (r'^proj\.', 'norm.fc.'),
    (r'^norm\.(weight|bias|running_mean|running_var|num_batches_tracked)$', r'norm.bn.\1'),
    (r'^head\.(weight|bias)$', r'head.fc.\1'),
)


def _select_weights(checkpoint: Dict) -> Dict:
    """The official containers: ``model`` (checkpoint.pth), ``models`` + ``model_ema`` (best.pth); EMA preferred."""
    if not isinstance(checkpoint, dict):
        return checkpoint
    if isinstance(checkpoint.get('model_ema'), dict):
        _logger.info('PPMA checkpoint: using the EMA weights (model_ema)')
        return checkpoint['model_ema']
    if isinstance(checkpoint.get('models'), dict):
        _logger.info("PPMA checkpoint: using 'models' (no EMA weights in the file)")
        return checkpoint['models']
    return checkpoint


def checkpoint_filter_fn(state_dict: Dict, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an official PPMA checkpoint (any container) or visionattn's own layout onto ``model``, strictly.

    Containers: raw, ``model``, ``models``, ``model_ema`` (preferred when present), ``state_dict``,
    ``module.`` prefixes. Layer-scale ``gamma_*`` (1, 1, 1, C) become (C,). Missing, unexpected or
    mis-shaped keys raise a ``ValueError`` naming them.
    """
    sd = remap_keys(unwrap_state_dict(_select_weights(state_dict)), _OFFICIAL_RULES)
    sd = {k: v.reshape(-1) if k.endswith(('.ls1.gamma', '.ls2.gamma')) else v for k, v in sd.items()}
    return check_state_dict(sd, model, source='PPMA checkpoint', ignore_shape=('stem.proj.0.weight',))


# ---------------------------------------------------------------------------------------------
# registry

def _create_ppma(variant: str, pretrained: bool = False, **kwargs) -> PPMA:
    return build_visionattn_model(PPMA, variant, pretrained, checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> Dict:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.proj.0', 'classifier': 'head.fc',
        'license': 'mit',
        'paper_ids': 'arXiv:2506.15940',
        'paper_name': 'Polyline Path Masked Attention for Vision Transformer',
        'origin_url': 'https://github.com/zhongchenzhao/PPMA',
        **kwargs,
    }


_HF_HUB = 'ZhongchenZhao/PPMA'  # the official weights (README of the official repo), training checkpoints best.pth

default_cfgs = generate_default_cfgs({
    'visionattn_ppma_tiny.in1k': _cfg(
        hf_hub_id=_HF_HUB, hf_hub_filename='checkpoints/classification/PPMA_T_202502251000/best.pth'),
    'visionattn_ppma_small.in1k': _cfg(
        hf_hub_id=_HF_HUB, hf_hub_filename='checkpoints/classification/PPMA_S_202504021000/best.pth'),
    'visionattn_ppma_base.in1k': _cfg(
        hf_hub_id=_HF_HUB, hf_hub_filename='checkpoints/classification/PPMA_B_202504101400/best.pth'),
})


@register_model
def visionattn_ppma_tiny(pretrained: bool = False, **kwargs) -> PPMA:
    """PPMA-T (official ``PPMAViT_T``), 14.3M params; official training drop_path_rate 0.1."""
    model_args = dict(
        embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16), mlp_ratios=(3, 3, 3, 3),
        modes=('chunk', 'chunk', 'whole', 'whole'))
    return _create_ppma('visionattn_ppma_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_ppma_small(pretrained: bool = False, **kwargs) -> PPMA:
    """PPMA-S (official ``PPMAViT_S``), 27.0M params; official training drop_path_rate 0.15."""
    model_args = dict(
        embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(4, 4, 8, 16), mlp_ratios=(4, 4, 3, 3),
        modes=('chunk', 'chunk', 'chunk', 'whole'))
    return _create_ppma('visionattn_ppma_small', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_ppma_base(pretrained: bool = False, **kwargs) -> PPMA:
    """PPMA-B (official ``PPMAViT_B``), 54.2M params, layer scale in stages 3-4; official drop_path_rate 0.4."""
    model_args = dict(
        embed_dims=(80, 160, 320, 512), depths=(4, 8, 25, 8), num_heads=(5, 5, 10, 16), mlp_ratios=(4, 4, 3, 3),
        modes=('chunk', 'chunk', 'chunk', 'whole'), layer_scales=(False, False, True, True))
    return _create_ppma('visionattn_ppma_base', pretrained, **dict(model_args, **kwargs))
