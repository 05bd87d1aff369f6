"""ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases.

d'Ascoli, Touvron, Leavitt, Morcos, Biroli, Sagun; ICML 2021; arXiv 2103.10697.
Official code: https://github.com/facebookresearch/convit (also in timm as ``convit_{tiny,small,base}``).

A DeiT-style isotropic ViT (patch 16, depth 12, mlp ratio 4, no qkv bias, LayerNorm eps 1e-6, 48 channels per
head) whose first ``local_up_to_layer = 10`` blocks use gated positional self-attention
(:class:`visionattn.layers.GPSA`) on the patch tokens only; the class token is concatenated just before block 10,
and blocks 10-11 are plain multi-head self-attention. ``pos_embed`` covers the 196 patch tokens (no class row).

State-dict keys are the official ones, which are also timm's (no remapping): ``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.i.attn.{gating_param,qk,v,proj,pos_proj}`` (i < 10), ``blocks.i.attn.{qkv,proj}``
(i >= 10), ``blocks.i.{norm1,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``head``.

Differences from the official code / timm (outputs equal within 1e-5 at 224x224):

* GPSA computes the input-independent positional attention once per forward as ``[h, N, N]`` and uses
  ``scaled_dot_product_attention`` for the content part (see :mod:`visionattn.layers.gpsa`); MHSA blocks use SDPA.
* Other input sizes: ``img_size=`` at creation (pretrained ``pos_embed`` resampled with bicubic interpolation)
  or ``dynamic_img_size=True`` (resampled per forward). GPSA's relative indices follow the actual ``H x W``
  patch grid, so non-square inputs work (the official code assumes a square grid).
* Gradient checkpointing is supported (timm's ConViT refuses it).
"""
from functools import partial
from typing import Any, Dict, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, resample_abs_pos_embed, use_fused_attn
from timm.models import generate_default_cfgs, register_model
from timm.models._features_fx import register_notrace_module

from ..layers.gpsa import GPSA
from ._builder import build_visionattn_model, check_state_dict, unwrap_state_dict
from ._plain import PlainBackbone

__all__ = ['ConViT', 'ConViTBlock', 'MHSA', 'checkpoint_filter_fn', 'FAMILY_CARD']

# GPSA branches on the input's rank and caches its relative indices: a leaf for timm's FX feature extraction
register_notrace_module(GPSA)


class MHSA(nn.Module):
    """Plain multi-head self-attention (``qkv`` + ``proj``) through ``scaled_dot_product_attention``."""

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'MHSA: dim={dim} is not divisible by num_heads={num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0., scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        x = self.proj(x.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(x)


class ConViTBlock(nn.Module):
    """Pre-norm transformer block with GPSA (NHWC or NLC input) or MHSA (NLC input) attention."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            use_gpsa: bool = True,
            locality_strength: float = 1.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.use_gpsa = use_gpsa
        self.norm1 = norm_layer(dim, **dd)
        if use_gpsa:
            self.attn = GPSA(
                dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                locality_strength=locality_strength, **dd)
        else:
            self.attn = MHSA(
                dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class ConViT(PlainBackbone):
    """ConViT on :class:`PlainBackbone`; ``embed_dim`` is the full width (48 x heads for the official models)."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 16,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            local_up_to_layer: int = 10,
            locality_strength: float = 1.,
            use_pos_embed: bool = True,
            norm_layer: Optional[Type[nn.Module]] = None,
            act_layer: Type[nn.Module] = nn.GELU,
            dynamic_img_size: bool = False,
            dynamic_img_pad: bool = False,
            strict_img_size: bool = True,
            device=None,
            dtype=None,
    ):
        if not 0 <= local_up_to_layer < depth:
            raise ValueError(
                f'local_up_to_layer={local_up_to_layer}: the class token is inserted before that block, '
                f'so it must be in 0..{depth - 1}')
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)

        def block_fn(i: int, drop_path: float = 0., device=None, dtype=None) -> nn.Module:
            return ConViTBlock(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=drop_path, act_layer=act_layer, norm_layer=norm_layer,
                use_gpsa=i < local_up_to_layer, locality_strength=locality_strength, device=device, dtype=dtype)

        super().__init__(
            blocks=block_fn,
            embed_dim=embed_dim,
            depth=depth,
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=global_pool,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            pos_drop_rate=pos_drop_rate,
            cls_token_at=local_up_to_layer,
            use_pos_embed=use_pos_embed,
            pos_embed_cls=False,
            block_fmt='NHWC',  # GPSA reads the (possibly non-square) patch grid from the NHWC shape
            norm_layer=norm_layer,
            dynamic_img_size=dynamic_img_size,
            dynamic_img_pad=dynamic_img_pad,
            strict_img_size=strict_img_size,
            device=device,
            dtype=dtype,
        )
        self.local_up_to_layer = local_up_to_layer
        self.locality_strength = locality_strength


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: ConViT) -> Dict[str, torch.Tensor]:
    """Official / timm ConViT checkpoint (same keys) in any container -> this model's state dict.

    Unwraps ``model`` / ``state_dict`` / ``module.`` containers, drops cached ``rel_indices`` if a checkpoint
    carries them, resamples ``pos_embed`` to the model's patch grid (``img_size=`` at creation), then checks
    that the keys cover the model exactly (a clear error names missing / unexpected / mis-shaped keys).
    """
    sd = {k: v for k, v in unwrap_state_dict(state_dict).items() if not k.endswith('rel_indices')}
    ignore_shape = []
    pos_embed = sd.get('pos_embed')
    model_pos = getattr(model, 'pos_embed', None)
    if pos_embed is not None and model_pos is not None and pos_embed.shape != model_pos.shape:
        num_prefix = model.num_prefix_tokens if model.pos_embed_cls else 0
        old_tokens = pos_embed.shape[1] - num_prefix
        side = int(round(old_tokens ** 0.5))
        if pos_embed.ndim == 3 and pos_embed.shape[-1] == model_pos.shape[-1] and side * side == old_tokens:
            sd['pos_embed'] = resample_abs_pos_embed(
                pos_embed, new_size=list(model.patch_embed.grid_size), old_size=[side, side],
                num_prefix_tokens=num_prefix, verbose=True)
            ignore_shape.append('pos_embed')
    conv_w = sd.get('patch_embed.proj.weight')
    if conv_w is not None and conv_w.ndim == 4 and conv_w.shape[1] != model.in_chans:
        ignore_shape.append('patch_embed.proj.weight')  # timm adapts the input channels after this filter
    return check_state_dict(sd, model, source='ConViT checkpoint', ignore_shape=ignore_shape)


def _create_convit(variant: str, pretrained: bool = False, **kwargs) -> ConViT:
    return build_visionattn_model(ConViT, variant, pretrained, checkpoint_filter_fn, plain=True, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None, 'fixed_input_size': True,
        'crop_pct': .875, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', 'license': 'apache-2.0',
        'paper_ids': 'arXiv:2103.10697', 'paper_name': 'ConViT: Improving Vision Transformers with Soft '
                                                      'Convolutional Inductive Biases',
        'origin_url': 'https://github.com/facebookresearch/convit',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'visionattn_convit_tiny.fb_in1k': _cfg(hf_hub_id='timm/convit_tiny.fb_in1k'),
    'visionattn_convit_small.fb_in1k': _cfg(hf_hub_id='timm/convit_small.fb_in1k'),
    'visionattn_convit_base.fb_in1k': _cfg(hf_hub_id='timm/convit_base.fb_in1k'),
})

FAMILY_CARD = dict(
    name='ConViT',
    paper="ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases, ICML 2021, "
          "arXiv 2103.10697",
    repo='https://github.com/facebookresearch/convit',
    license='apache-2.0 (timm hub weights timm/convit_*.fb_in1k)',
    accuracy={
        'visionattn_convit_tiny': '73.1 (paper; official README eval 73.116)',
        'visionattn_convit_small': '81.3 (paper)',
        'visionattn_convit_base': '82.4 (paper)',
    },
    load_official="timm.create_model('visionattn_convit_tiny', pretrained=True, "
                  "pretrained_cfg_overlay=dict(file='convit_tiny.pth')) (official .pth or timm weights; "
                  "pretrained=True alone downloads timm/convit_tiny.fb_in1k)",
    differences=[
        'State-dict keys identical to the official code and timm; outputs equal timm within 1e-5 at 224x224.',
        'GPSA computes the input-independent positional attention once per forward ([h, N, N] instead of '
        '[B, h, N, N]) and the content attention with scaled_dot_product_attention; the renormalisation uses the '
        'positional row sums exactly and the content softmax row sum as 1. Because the content and positional '
        'branches are multiplied with v separately, torch.utils.flop_counter counts 1.33 GMACs for Ti (timm and '
        'the official code: 1.25), while CPU throughput is 1.2-1.4x timm\'s.',
        'Other input sizes via img_size= at creation (pos_embed resampled bicubically when loading) or '
        'dynamic_img_size=True; GPSA relative indices follow the actual (possibly non-square) patch grid, whereas '
        'the official code assumes a square grid and a fixed 224x224 input.',
        'Gradient checkpointing is supported (timm refuses it for ConViT).',
    ],
)


@register_model
def visionattn_convit_tiny(pretrained: bool = False, **kwargs) -> ConViT:
    """ConViT-Ti: 4 heads x 48 = 192 channels, 5,710,512 parameters."""
    model_args = dict(embed_dim=48 * 4, num_heads=4, local_up_to_layer=10, locality_strength=1.0)
    return _create_convit('visionattn_convit_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_convit_small(pretrained: bool = False, **kwargs) -> ConViT:
    """ConViT-S: 9 heads x 48 = 432 channels, 27,777,322 parameters."""
    model_args = dict(embed_dim=48 * 9, num_heads=9, local_up_to_layer=10, locality_strength=1.0)
    return _create_convit('visionattn_convit_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_convit_base(pretrained: bool = False, **kwargs) -> ConViT:
    """ConViT-B: 16 heads x 48 = 768 channels, 86,540,040 parameters."""
    model_args = dict(embed_dim=48 * 16, num_heads=16, local_up_to_layer=10, locality_strength=1.0)
    return _create_convit('visionattn_convit_base', pretrained=pretrained, **dict(model_args, **kwargs))
