"""Twins: PCPVT and SVT (Chu et al., "Twins: Revisiting the Design of Spatial Attention in Vision
Transformers", NeurIPS 2021, arXiv:2104.13840; https://github.com/Meituan-AutoML/Twins).

Both are 4-stage pyramids with a non-overlapping patch embedding per stage (Conv 4x4/s4 then
Conv 2x2/s2, each followed by LayerNorm eps 1e-5), no absolute position embedding and a PEG
(``x + DWConv3x3(x)``) after block 0 of every stage. Blocks are pre-norm (LayerNorm eps 1e-6):

* PCPVT: every block is GSA, i.e. spatial-reduction attention with sr = 8, 4, 2, 1;
* SVT (official ``alt_gvt``): inside each stage, even-indexed blocks are LSA (self-attention in
  non-overlapping 7x7 windows), odd-indexed blocks are GSA with sr = 8, 4, 2, 1.

Head: final LayerNorm (eps 1e-6) -> global average pool -> Linear.

Layout (shared builder): ``stem`` = patch embed 0, ``stages.S.downsample`` = patch embed S (S>0),
``stages.S.blocks.J``, ``stages.S.pos_block.proj`` (PEG), ``norm``, ``head.fc``.
``checkpoint_filter_fn`` maps the official / timm layout (identical key sets) onto it.

Sizes that are not multiples of the 7x7 window are zero-padded (bottom/right) before LSA with no
mask, as timm and the official detection code do (see ``FAMILY_CARD['differences']``).
"""
import math
from functools import partial
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, calculate_drop_path_rates
from timm.models import generate_default_cfgs, register_model

from ..layers.conv_pos_enc import ConvPosEnc
from ..layers.fused_linear import ONEDNN_CARD_NOTE
from ..layers.mlp import GeluMlp
from ..layers.spatial_reduction_attention import SpatialReductionAttention
from ..layers.window_attention import WindowAttention
from ._builder import (
    HierarchicalBackbone, Stage, add_residual, build_visionattn_model, check_host_args, check_state_dict, remap_keys,
    unwrap_state_dict)

__all__ = ['Twins', 'TwinsBlock', 'TwinsPatchEmbed', 'checkpoint_filter_fn', 'FAMILY_CARD']

FAMILY_CARD = dict(
    name='Twins',
    paper='Twins: Revisiting the Design of Spatial Attention in Vision Transformers, NeurIPS 2021, arXiv:2104.13840',
    repo='https://github.com/Meituan-AutoML/Twins',
    license='Apache-2.0 (official code; timm weights apache-2.0)',
    accuracy={
        'visionattn_twins_pcpvt_small': '81.2 (README)',
        'visionattn_twins_pcpvt_base': '82.7 (README)',
        'visionattn_twins_pcpvt_large': '83.1 (README)',
        'visionattn_twins_svt_small': '81.7 (README)',
        'visionattn_twins_svt_base': '83.2 (README)',
        'visionattn_twins_svt_large': '83.7 (README)',
    },
    load_official=(
        "timm.create_model('visionattn_twins_svt_small', pretrained=True, "
        "pretrained_cfg_overlay=dict(file='alt_gvt_small.pth')) -- official (pcpvt_*_v0 / alt_gvt_*) and timm "
        "(twins_*) checkpoints, raw or under 'model' / 'state_dict' / 'module.', are remapped by "
        "checkpoint_filter_fn; pretrained=True fetches timm's twins_*.in1k weights from the HF Hub"),
    differences=[
        ONEDNN_CARD_NOTE,
        'Inputs whose feature maps are not multiples of the 7x7 LSA window (SVT) are zero-padded '
        'bottom/right before the window attention with no mask, so padded tokens take part in the '
        'attention, then cropped -- as timm and the official detection code do. The official '
        'classification code cannot run such sizes (SVT needs multiples of 224), and the official '
        'segmentation code masks padded tokens instead (only when both pads are > 0), so outputs at '
        'those sizes differ from the segmentation code.',
        'Any input size >= 32 is accepted (fixed_input_size=False); non-multiples of the stride are '
        'floor-divided by the non-overlapping patch embeddings, as in the official code and timm.',
        'State-dict layout follows the visionattn builder (stem / stages.S.downsample / '
        'stages.S.blocks.J / stages.S.pos_block.proj / norm / head.fc); official and timm keys are '
        'remapped on load.',
        'The final LayerNorm is applied in forward_features on the NCHW map (timm applies it to '
        'tokens); forward_features therefore returns a normalised [B, C, H/32, W/32] map.',
        'set_grad_checkpointing is supported (timm\'s Twins refuses it); the head supports every '
        'timm global_pool type, not only avg.',
    ],
)


class TwinsPatchEmbed(nn.Module):
    """Non-overlapping patch embedding: Conv(k = s = patch_size) + LayerNorm (eps 1e-5), NCHW in/out.

    Sizes that are not multiples of ``patch_size`` are floor-divided by the convolution. ``drop``
    is the official ``pos_drops[i]`` dropout that follows each patch embedding.
    """

    def __init__(self, in_chs: int, out_chs: int, patch_size: int, eps: float = 1e-5, drop: float = 0.,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.proj = nn.Conv2d(in_chs, out_chs, kernel_size=patch_size, stride=patch_size, **dd)
        self.norm = nn.LayerNorm(out_chs, eps=eps, **dd)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LayerNorm over channels on the channels-last view; the result keeps channels-last memory,
        # which the NHWC blocks of the following Stage read without another copy.
        return self.drop(self.norm(self.proj(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


class TwinsBlock(nn.Module):
    """Pre-norm transformer block on an NHWC map: LSA when ``window_size`` is set, else GSA."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            sr_ratio: int = 1,
            window_size: Optional[int] = None,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            norm_eps: float = 1e-6,
            sr_norm_eps: float = 1e-5,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        if window_size:
            self.attn = WindowAttention(
                dim, num_heads, window_size=window_size, qkv_bias=True, attn_drop=attn_drop,
                proj_drop=proj_drop, **dd)
        else:
            self.attn = SpatialReductionAttention(
                dim, num_heads, sr_ratio=sr_ratio, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop,
                norm_layer=partial(nn.LayerNorm, eps=sr_norm_eps), **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.mlp = GeluMlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.has_drop_path = drop_path > 0.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = add_residual(self.drop_path1(self.attn(self.norm1(x))), x)
        if self.training and self.has_drop_path:
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        return self.mlp(self.norm2(x), shortcut=x)  # the residual add in fc2's epilogue at inference


class Twins(HierarchicalBackbone):
    """Twins-PCPVT (``window_sizes=None``) and Twins-SVT (``window_sizes`` per stage).

    Args:
        in_chans, num_classes, global_pool, drop_rate, drop_path_rate, device, dtype: timm's model args.
        embed_dims, depths, num_heads, mlp_ratios, sr_ratios: per-stage settings.
        window_sizes: LSA window per stage (SVT) -- even-indexed blocks of each stage use LSA,
            odd-indexed ones GSA; ``None`` makes every block GSA (PCPVT).
        patch_size: stride of the first patch embedding (later stages use 2).
        pos_drop_rate, proj_drop_rate, attn_drop_rate: dropout after each patch embedding, after
            attention/MLP projections, and on attention weights.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (3, 4, 6, 3),
            num_heads: Sequence[int] = (1, 2, 4, 8),
            mlp_ratios: Sequence[float] = (4, 4, 4, 4),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            window_sizes: Optional[Sequence[int]] = None,
            patch_size: int = 4,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        check_host_args(depths, embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios,
                        sr_ratios=sr_ratios, **({'window_sizes': window_sizes} if window_sizes else {}))
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))  # on CPU: also under a meta-device context

        stem = TwinsPatchEmbed(in_chans, embed_dims[0], patch_size, eps=1e-5, drop=pos_drop_rate, **dd)
        stages = []
        cur = 0
        reduction = patch_size
        for s in range(num_stages):
            dim = embed_dims[s]
            blocks = [
                TwinsBlock(
                    dim, num_heads[s], mlp_ratio=mlp_ratios[s], sr_ratio=sr_ratios[s],
                    window_size=window_sizes[s] if window_sizes and j % 2 == 0 else None,
                    proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[cur + j], **dd)
                for j in range(depths[s])]
            cur += depths[s]
            if s > 0:
                reduction *= 2
            stages.append(Stage(
                blocks, out_chs=dim, reduction=reduction,
                downsample=TwinsPatchEmbed(
                    embed_dims[s - 1], dim, 2, eps=1e-5, drop=pos_drop_rate, **dd) if s > 0 else None,
                pos_block=ConvPosEnc(dim, 3, **dd),
                block_fmt='NHWC'))
        super().__init__(
            stem, stages, num_classes=num_classes, in_chans=in_chans, global_pool=global_pool,
            drop_rate=drop_rate, norm=LayerNorm2d(embed_dims[-1], eps=1e-6, **dd),
            stem_reduction=patch_size, min_input_size=patch_size * 2 ** (num_stages - 1),
            no_weight_decay_keys=[
                f'stages.{s}.pos_block.proj.{p}' for s in range(num_stages) for p in ('weight', 'bias')],
            **dd)
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        # as the official code and timm: N(0, 0.02) Linear, fan-out normal Conv2d, unit LayerNorm.
        # Their trunc_normal_(std=.02) truncates at +-2 absolute (+-100 sigma), which never binds,
        # so a plain normal_ draws from the same distribution at a fraction of the cost.
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0., .02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0., math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# official / timm key -> visionattn key (applied in order; visionattn keys pass through unchanged)
_OFFICIAL_RULES = (
    (r'^patch_embeds\.0\.', 'stem.'),
    (r'^patch_embeds\.(\d+)\.', r'stages.\1.downsample.'),
    (r'^blocks\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.'),
    (r'^pos_block\.(\d+)\.proj\.0\.', r'stages.\1.pos_block.proj.'),
    (r'^head\.(weight|bias)$', r'head.fc.\1'),
)


def checkpoint_filter_fn(state_dict: Dict, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an official (``pcpvt_*_v0`` / ``alt_gvt_*``) or timm (``twins_*``) checkpoint onto ``model``.

    Accepts any container (raw, ``model``, ``state_dict``, ``module.`` prefix) and visionattn's own
    layout, and raises a ``ValueError`` naming missing / unexpected / mis-shaped keys.
    """
    sd = remap_keys(unwrap_state_dict(state_dict), _OFFICIAL_RULES)
    # the first conv may be adapted to another in_chans by timm after this filter
    return check_state_dict(sd, model, source='Twins checkpoint', ignore_shape=('stem.proj.weight',))


def _create_twins(variant: str, pretrained: bool = False, **kwargs) -> Twins:
    return build_visionattn_model(Twins, variant, pretrained, checkpoint_filter_fn, **kwargs)


def _cfg(hf_hub_id: str = '', **kwargs):
    return {
        'hf_hub_id': hf_hub_id,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.proj', 'classifier': 'head.fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2104.13840',
        'paper_name': 'Twins: Revisiting the Design of Spatial Attention in Vision Transformers',
        'origin_url': 'https://github.com/Meituan-AutoML/Twins',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'visionattn_twins_pcpvt_small.in1k': _cfg(hf_hub_id='timm/twins_pcpvt_small.in1k'),
    'visionattn_twins_pcpvt_base.in1k': _cfg(hf_hub_id='timm/twins_pcpvt_base.in1k'),
    'visionattn_twins_pcpvt_large.in1k': _cfg(hf_hub_id='timm/twins_pcpvt_large.in1k'),
    'visionattn_twins_svt_small.in1k': _cfg(hf_hub_id='timm/twins_svt_small.in1k'),
    'visionattn_twins_svt_base.in1k': _cfg(hf_hub_id='timm/twins_svt_base.in1k'),
    'visionattn_twins_svt_large.in1k': _cfg(hf_hub_id='timm/twins_svt_large.in1k'),
})

_PCPVT = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1))
_SVT = dict(mlp_ratios=(4, 4, 4, 4), sr_ratios=(8, 4, 2, 1), window_sizes=(7, 7, 7, 7))


@register_model
def visionattn_twins_pcpvt_small(pretrained=False, **kwargs) -> Twins:
    """Twins-PCPVT-S (official ``pcpvt_small_v0``), 24.1M params."""
    model_args = dict(_PCPVT, depths=(3, 4, 6, 3))
    return _create_twins('visionattn_twins_pcpvt_small', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_twins_pcpvt_base(pretrained=False, **kwargs) -> Twins:
    """Twins-PCPVT-B (official ``pcpvt_base_v0``), 43.8M params."""
    model_args = dict(_PCPVT, depths=(3, 4, 18, 3))
    return _create_twins('visionattn_twins_pcpvt_base', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_twins_pcpvt_large(pretrained=False, **kwargs) -> Twins:
    """Twins-PCPVT-L (official ``pcpvt_large_v0``), 61.0M params."""
    model_args = dict(_PCPVT, depths=(3, 8, 27, 3))
    return _create_twins('visionattn_twins_pcpvt_large', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_twins_svt_small(pretrained=False, **kwargs) -> Twins:
    """Twins-SVT-S (official ``alt_gvt_small``), 24.1M params."""
    model_args = dict(_SVT, embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), depths=(2, 2, 10, 4))
    return _create_twins('visionattn_twins_svt_small', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_twins_svt_base(pretrained=False, **kwargs) -> Twins:
    """Twins-SVT-B (official ``alt_gvt_base``), 56.1M params."""
    model_args = dict(_SVT, embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), depths=(2, 2, 18, 2))
    return _create_twins('visionattn_twins_svt_base', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_twins_svt_large(pretrained=False, **kwargs) -> Twins:
    """Twins-SVT-L (official ``alt_gvt_large``), 99.3M params."""
    model_args = dict(_SVT, embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), depths=(2, 2, 18, 2))
    return _create_twins('visionattn_twins_svt_large', pretrained, **dict(model_args, **kwargs))
