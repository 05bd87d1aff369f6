"""DaViT: Dual Attention Vision Transformers (Ding et al., ECCV 2022, arXiv 2204.03645).

A 4-stage hierarchy: 7x7/s4 conv stem (+LayerNorm), then per stage an optional 2x2/s2 downsample
(LayerNorm over the input channels first) and ``depth`` *dual blocks*, each a window-attention
("spatial") block followed by a channel-attention block. Both blocks are
``x = cpe1(x); x = x + attn(norm1(x)); x = cpe2(x); x = x + mlp(norm2(x))`` with a residual
depthwise-3x3 position encoding (CPE) before the attention and before the MLP. Window attention
has no position bias, no shift and no mask (maps are zero-padded after ``norm1`` and cropped).
Head: global average pool -> LayerNorm -> Linear.

Blocks run channels-last (NHWC) end to end inside a stage, so there are no NCHW <-> token
transposes per block. Speed without changing the function: the CPE residual is folded into its
depthwise kernel, and at CPU fp32 inference every block Linear runs through oneDNN with its bias,
GELU and the block's residual add fused (``visionattn.layers.fused_linear``). Channel attention can
optionally be evaluated in a folded (Gram-matrix) form (``channel_attn_fold=True``).

The state_dict layout is timm's (``stem.conv``, ``stages.N.downsample``,
``stages.N.blocks.J.{0,1}.{cpe1,cpe2,...}``, ``head.norm``/``head.fc``); ``checkpoint_filter_fn``
also loads the official layout (``patch_embeds``/``main_blocks``/``norms``/``head``).
"""
from functools import partial
from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, calculate_drop_path_rates, get_act_layer
from timm.layers.activations import GELU as TimmGELU
from timm.models import generate_default_cfgs, register_model
from timm.models._features_fx import register_notrace_module

from visionattn.layers.channel_attention import ChannelAttention
from visionattn.layers.conv_pos_enc import ConvPosEnc
from visionattn.layers.fused_linear import fused_linear
from visionattn.layers.padding import crop_to, pad_to_multiple
from visionattn.layers.weight_init import init_trunc_normal_
from visionattn.layers.window_attention import WindowAttention
from ._builder import (
    HierarchicalBackbone, Stage, build_visionattn_model, check_state_dict, remap_keys, unwrap_state_dict)

__all__ = ['DaViT', 'SpatialBlock', 'ChannelBlock', 'checkpoint_filter_fn', 'FAMILY_CARD']


class Stem(nn.Module):
    """Conv 7x7/s4/p3 after right/bottom zero-padding to a multiple of 4, then LayerNorm."""

    def __init__(self, in_chs: int, out_chs: int, norm_layer: Callable = nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.stride = 4
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=7, stride=4, padding=3, **dd)
        self.norm = norm_layer(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(pad_to_multiple(x, self.stride))
        # channels-last norm; the result is an NCHW view of NHWC memory, which the stage's blocks use as is
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """LayerNorm over the input channels, then Conv 2x2/s2 after zero-padding H, W to even."""

    def __init__(self, in_chs: int, out_chs: int, norm_layer: Callable = nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm = norm_layer(in_chs, **dd)
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=2, stride=2, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv(pad_to_multiple(x, 2))


class FusedConvPosEnc(ConvPosEnc):
    """DaViT CPE ``x + dwconv3x3(x)`` on NHWC, evaluated as one depthwise conv.

    The identity is folded into the centre tap (``w + delta``), so the residual costs no extra pass
    over the map; parameters and names are those of :class:`ConvPosEnc` (``proj``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.proj
        weight = conv.weight
        k = conv.kernel_size[0]
        eye = F.pad(weight.new_ones(weight.shape[0], 1, 1, 1), [k // 2, k // 2, k // 2, k // 2])
        out = F.conv2d(x.permute(0, 3, 1, 2), weight + eye, conv.bias, 1, k // 2, 1, conv.groups)
        return out.permute(0, 2, 3, 1)


@register_notrace_module  # FX leaf: pads on the (symbolic) map size
class DaViTWindowAttention(WindowAttention):
    """:class:`WindowAttention` (same parameters and function) with fused CPU-inference linears.

    ``qkv`` and ``proj`` go through :func:`fused_linear`; the block's residual, when passed as
    ``shortcut``, is added inside the output projection (which runs after the window reverse).
    """

    def forward(self, x: torch.Tensor, shortcut: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        x = pad_to_multiple(x, ws, channels_last=True)
        Hp, Wp = x.shape[1], x.shape[2]
        nh, nw = Hp // ws, Wp // ws
        windows = x.reshape(B, nh, ws, nw, ws, C).transpose(2, 3).reshape(B * nh * nw, ws * ws, C)
        qkv = fused_linear(windows, self.qkv.weight, self.qkv.bias)
        # explicit sizes, no -1: a reshape cannot infer a dimension of an empty (batch 0) tensor
        q, k, v = qkv.reshape(B * nh * nw, ws * ws, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        out = out.transpose(1, 2).reshape(B, nh, nw, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        out = crop_to(out, H, W)
        if shortcut is not None and self.training and self.proj_drop.p > 0:
            return shortcut + self.proj_drop(fused_linear(out, self.proj.weight, self.proj.bias))
        return self.proj_drop(fused_linear(out, self.proj.weight, self.proj.bias, residual=shortcut))


class DaViTMlp(nn.Module):
    """fc1 -> act -> fc2 (parameter names as timm's ``Mlp``), with an optional fused residual.

    For exact GELU, fc1 + GELU and fc2 + residual each run as one fused op at CPU inference.
    """

    def __init__(self, dim: int, hidden_dim: int, act_layer: Callable = nn.GELU, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.fc1 = nn.Linear(dim, hidden_dim, **dd)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim, **dd)
        # exact (erf) GELU, torch's or timm's, can be fused into fc1
        self.fuse_gelu = (
            (isinstance(self.act, nn.GELU) and self.act.approximate == 'none') or type(self.act) is TimmGELU)

    def forward(self, x: torch.Tensor, shortcut: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.fuse_gelu:
            x = fused_linear(x, self.fc1.weight, self.fc1.bias, act='gelu')
        else:
            x = self.act(fused_linear(x, self.fc1.weight, self.fc1.bias))
        return fused_linear(x, self.fc2.weight, self.fc2.bias, residual=shortcut)


class _DualHalfBlock(nn.Module):
    """``cpe1 -> x + attn(norm1(x)) -> cpe2 -> x + mlp(norm2(x))`` on NHWC ``[B, H, W, C]``."""

    def __init__(
            self,
            attn: nn.Module,
            dim: int,
            mlp_ratio: float = 4.,
            drop_path: float = 0.,
            act_layer: Callable = nn.GELU,
            norm_layer: Callable = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.cpe1 = FusedConvPosEnc(dim, 3, **dd)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.cpe2 = FusedConvPosEnc(dim, 3, **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = DaViTMlp(dim, int(dim * mlp_ratio), act_layer=act_layer, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.stochastic_depth = drop_path > 0.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cpe1(x)
        if self.training and self.stochastic_depth:
            x = x + self.drop_path1(self.attn(self.norm1(x)))
            x = self.cpe2(x)
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        # no stochastic depth: the residual adds are fused into the output projections
        x = self.attn(self.norm1(x), shortcut=x)
        x = self.cpe2(x)
        return self.mlp(self.norm2(x), shortcut=x)


class SpatialBlock(_DualHalfBlock):
    """DaViT spatial block: window self-attention (zero-padded windows, no bias/shift/mask)."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, qkv_bias: bool = True,
                 device=None, dtype=None, **kwargs):
        attn = DaViTWindowAttention(
            dim, num_heads, window_size=window_size, qkv_bias=qkv_bias, device=device, dtype=dtype)
        super().__init__(attn, dim, device=device, dtype=dtype, **kwargs)


class ChannelBlock(_DualHalfBlock):
    """DaViT channel block: channel-group attention (official role order, see ChannelAttention)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, fold: bool = False,
                 device=None, dtype=None, **kwargs):
        attn = ChannelAttention(dim, num_heads, qkv_bias=qkv_bias, fold=fold, device=device, dtype=dtype)
        super().__init__(attn, dim, device=device, dtype=dtype, **kwargs)


class DaViT(HierarchicalBackbone):
    """DaViT backbone + classifier.

    Args:
        in_chans: input image channels.
        num_classes: classifier classes (0: no classifier, ``forward`` returns pooled features).
        global_pool: head pooling ('avg', 'max', ... or '' for none).
        depths: dual blocks (spatial + channel pairs) per stage.
        embed_dims: channels per stage.
        num_heads: heads (spatial) / channel groups (channel attention) per stage.
        window_size: spatial-attention window (7; 12 for the official DaViT-L 384).
        mlp_ratio: MLP hidden / embed dim.
        qkv_bias: bias on the qkv projections.
        norm_eps: LayerNorm epsilon (every norm).
        act_layer: MLP activation.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth at the last block; rates rise linearly over all
            ``2 * sum(depths)`` spatial and channel blocks, as in the official code.
        channel_attn_fold: evaluate channel attention in its folded (Gram-matrix) form where the
            tokens outnumber the channels -- the same function with fewer FLOPs, but 2-4x the fp32
            round-off of the literal q/k/v form, and only ~3% faster at 224 once the linears are
            fused; off by default.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            depths: Sequence[int] = (1, 1, 3, 1),
            embed_dims: Sequence[int] = (96, 192, 384, 768),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            window_size: int = 7,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            norm_eps: float = 1e-5,
            act_layer: Union[str, Callable] = 'gelu',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            channel_attn_fold: bool = False,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        if not len(depths) == len(embed_dims) == len(num_heads):
            raise ValueError(
                f'depths={tuple(depths)}, embed_dims={tuple(embed_dims)} and num_heads={tuple(num_heads)} '
                f'must have the same length')
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        act_layer = get_act_layer(act_layer)
        # official: one rate per spatial/channel block, linear over all 2 * sum(depths) of them
        dpr = calculate_drop_path_rates(drop_path_rate, 2 * sum(depths))

        stem = Stem(in_chans, embed_dims[0], norm_layer=norm_layer, **dd)
        stages = []
        block_idx = 0
        for i, (depth, dim, heads) in enumerate(zip(depths, embed_dims, num_heads)):
            blocks = []
            for _ in range(depth):
                common = dict(mlp_ratio=mlp_ratio, act_layer=act_layer, norm_layer=norm_layer, **dd)
                blocks.append(nn.Sequential(
                    SpatialBlock(dim, heads, window_size=window_size, qkv_bias=qkv_bias,
                                 drop_path=dpr[block_idx], **common),
                    ChannelBlock(
                        dim, heads, qkv_bias=qkv_bias, fold=channel_attn_fold, drop_path=dpr[block_idx + 1],
                        **common),
                ))
                block_idx += 2
            downsample = Downsample(embed_dims[i - 1], dim, norm_layer=norm_layer, **dd) if i > 0 else None
            stages.append(Stage(blocks, out_chs=dim, reduction=4 * 2 ** i, downsample=downsample, block_fmt='NHWC'))

        super().__init__(
            stem, stages,
            num_classes=num_classes,
            in_chans=in_chans,
            global_pool=global_pool,
            drop_rate=drop_rate,
            head_norm_layer=partial(LayerNorm2d, eps=norm_eps),
            stem_reduction=4,
            **dd,
        )
        self.window_size = window_size
        self.drop_path_rate = drop_path_rate
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        # official _init_vit_weights: trunc_normal(0.02) Linear, zero bias; default conv / norm init
        if isinstance(m, nn.Linear):
            init_trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# checkpoints

# official (dingmyu/davit, timm-0.4 fork) -> timm/visionattn key names, applied in order
_OFFICIAL_TO_TIMM = (
    (r'^patch_embeds\.(\d+)\.', r'stages.\1.downsample.'),
    (r'^main_blocks\.(\d+)\.', r'stages.\1.blocks.'),
    (r'\.downsample\.proj\.', '.downsample.conv.'),
    (r'^stages\.0\.downsample\.', 'stem.'),
    (r'^head\.', 'head.fc.'),
    (r'^norms\.', 'head.norm.'),
    (r'\.cpe\.0\.', '.cpe1.'),
    (r'\.cpe\.1\.', '.cpe2.'),
)


def checkpoint_filter_fn(state_dict: Dict, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an official or timm DaViT checkpoint (any container) onto ``model``, strictly.

    Accepts a raw state dict or one under ``state_dict`` / ``model`` (``module.`` prefixes stripped).
    The official layout is renamed (no tensor changes: the qkv chunk order and the LayerNorm ->
    LayerNorm2d swap are compatible); the timm layout is used as is. Missing, unexpected or
    mis-shaped keys raise a ``ValueError`` naming them.
    """
    sd = unwrap_state_dict(state_dict)
    if 'stem.conv.weight' in sd:
        source = 'timm-layout DaViT checkpoint'
    elif 'patch_embeds.0.proj.weight' in sd:
        source = 'official-layout DaViT checkpoint'
        sd = remap_keys(sd, _OFFICIAL_TO_TIMM)
    else:
        source = 'checkpoint (neither timm "stem.conv.weight" nor official "patch_embeds.0.proj.weight" found)'
    return check_state_dict(sd, model, source=source)


# ---------------------------------------------------------------------------------------------
# registry

def _create_davit(variant: str, pretrained: bool = False, **kwargs) -> DaViT:
    return build_visionattn_model(DaViT, variant, pretrained, checkpoint_filter_fn, **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.95, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv', 'classifier': 'head.fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2204.03645',
        'paper_name': 'DaViT: Dual Attention Vision Transformers',
        'origin_url': 'https://github.com/dingmyu/davit',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # official Microsoft ImageNet-1k weights, converted by timm (timm layout)
    'visionattn_davit_tiny.msft_in1k': _cfg(hf_hub_id='timm/davit_tiny.msft_in1k'),
    'visionattn_davit_small.msft_in1k': _cfg(hf_hub_id='timm/davit_small.msft_in1k'),
    'visionattn_davit_base.msft_in1k': _cfg(hf_hub_id='timm/davit_base.msft_in1k'),
    # official DaViT_large_window12_384 (window 12, 384 input); no public weights
    'visionattn_davit_large': _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
    # timm-only larger configs; no public weights
    'visionattn_davit_huge': _cfg(),
    'visionattn_davit_giant': _cfg(),
})


@register_model
def visionattn_davit_tiny(pretrained: bool = False, **kwargs) -> DaViT:
    model_args = dict(depths=(1, 1, 3, 1), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24))
    return _create_davit('visionattn_davit_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_davit_small(pretrained: bool = False, **kwargs) -> DaViT:
    model_args = dict(depths=(1, 1, 9, 1), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24))
    return _create_davit('visionattn_davit_small', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_davit_base(pretrained: bool = False, **kwargs) -> DaViT:
    model_args = dict(depths=(1, 1, 9, 1), embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32))
    return _create_davit('visionattn_davit_base', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_davit_large(pretrained: bool = False, **kwargs) -> DaViT:
    model_args = dict(
        depths=(1, 1, 9, 1), embed_dims=(192, 384, 768, 1536), num_heads=(6, 12, 24, 48), window_size=12)
    return _create_davit('visionattn_davit_large', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_davit_huge(pretrained: bool = False, **kwargs) -> DaViT:
    model_args = dict(depths=(1, 1, 9, 1), embed_dims=(256, 512, 1024, 2048), num_heads=(8, 16, 32, 64))
    return _create_davit('visionattn_davit_huge', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_davit_giant(pretrained: bool = False, **kwargs) -> DaViT:
    model_args = dict(depths=(1, 1, 12, 3), embed_dims=(384, 768, 1536, 3072), num_heads=(12, 24, 48, 96))
    return _create_davit('visionattn_davit_giant', pretrained, **dict(model_args, **kwargs))


# ---------------------------------------------------------------------------------------------
# model card

FAMILY_CARD = dict(
    name='DaViT',
    paper=('DaViT: Dual Attention Vision Transformers — Ding, Xiao, Codella, Luo, Wang, Yuan; '
           'ECCV 2022; arXiv:2204.03645'),
    repo='https://github.com/dingmyu/davit',
    license='MIT (official code); Apache-2.0 (timm Hub weights `timm/davit_*.msft_in1k`)',
    accuracy={
        'visionattn_davit_tiny': '82.8 (official README, IN-1k 224²)',
        'visionattn_davit_small': '84.2 (official README, IN-1k 224²)',
        'visionattn_davit_base': '84.6 (official README, IN-1k 224²)',
        'visionattn_davit_large': '— (no public ImageNet-1k weights)',
        'visionattn_davit_huge': '— (timm-only config, no weights)',
        'visionattn_davit_giant': '— (timm-only config, no weights)',
    },
    load_official=(
        "`timm.create_model('visionattn_davit_tiny', pretrained=True, "
        "pretrained_cfg_overlay=dict(file='path/to/official_or_timm_davit_tiny.pth'))` — official "
        "(`patch_embeds`/`main_blocks`) and timm (`stem`/`stages`) layouts both load, raw or under "
        "`state_dict`/`model`, with or without `module.` prefixes; with internet, `pretrained=True` alone "
        "fetches `timm/davit_tiny.msft_in1k`."),
    differences=[
        'Outputs equal timm `davit_*` (and so the official code) with the same weights: max |Δlogit| ~1e-6 with '
        "timm's init and ≤ 7e-6 with heavier random weights (T/S/B/H at 224² and 250×310, L at 384²), the "
        "same size as timm's own fp32 error against an fp64 reference.",
        '`visionattn_davit_large` follows the official `DaViT_large_window12_384` (window 12, 384² default input, '
        'crop_pct 1.0); timm `davit_large` uses window 7 at 224². No parameter depends on the window, so weights '
        'are interchangeable, but outputs differ between the two windows.',
        'Stochastic depth follows the official code: rates rise linearly over all 2·Σdepths spatial and channel '
        'blocks (timm uses one rate per spatial+channel pair). Training only; eval outputs are unaffected. '
        'Default `drop_path_rate` is 0 (timm default; the official constructor defaults to 0.1).',
        'Channel attention keeps the official role order (q acts as the values, k scaled by head_dim^-0.5). '
        '`channel_attn_fold=True` evaluates it, where a map has at least as many tokens as channels, in an '
        'exactly equivalent folded form (Gram matrix of the tokens, q/k/v never materialised): ~2.5x fewer '
        'FLOPs in stages 1-2 at 224², but 2-4x the fp32 round-off and only ~3% faster end to end, so it is off '
        'by default.',
        'Inputs smaller than 32×32 are refused with a ValueError (the official code pads any size; below the '
        'total stride the last map is a padded 1×1).',
        'Blocks run channels-last (NHWC) inside each stage and the CPE residual is folded into its depthwise '
        'kernel. At CPU fp32 inference every block Linear runs as one oneDNN call with its bias, GELU and '
        'residual add fused (`visionattn.layers.fused_linear`; set VISIONATTN_ONEDNN_LINEAR=0 to disable): same fp32 '
        'function, different accumulation order (~1e-6). Training, CUDA, TorchScript and torch.compile use the '
        'plain ops.',
        '`huge`/`giant` are timm-only configurations (no official code or weights); the Florence-2 towers '
        '(`davit_*_fl`) are not included.',
    ],
)
