"""NAT, DiNAT, DiNAT_s and the isotropic NAT / DiNAT / ViT-rpb models (SHI-Labs).

* NAT: Hassani, Walton, Li, Li, Shi, "Neighborhood Attention Transformer", CVPR 2023, arXiv:2204.07143.
* DiNAT: Hassani, Shi, "Dilated Neighborhood Attention Transformer", arXiv:2209.15001.
* Official code: https://github.com/SHI-Labs/Neighborhood-Attention-Transformer (MIT).

Macro structure (written from the spec, ``biformer_nat_ppma.md`` §2):

* **NAT / DiNAT** -- stem: Conv3x3/s2 (C/2) -> Conv3x3/s2 (C), no norm or activation in between,
  then LayerNorm(C). Four stages of pre-norm blocks
  ``x += DropPath(g1 * NA(LN(x))); x += DropPath(g2 * MLP(LN(x)))`` (``g1``/``g2`` only with
  layer scale). The official model downsamples at the END of stages 1-3 (Conv3x3/s2 C->2C without
  bias, then LayerNorm(2C)); here that module is the ``downsample`` at the START of stages 2-4, so
  every stage output is the pre-downsample map that dense prediction uses (reductions 4/8/16/32).
  Head: LayerNorm -> global average pool -> Linear. DiNAT is NAT with per-block dilations.
* **DiNAT_s** -- Swin layout: Conv4x4/s4 patch embedding + LayerNorm (inputs zero-padded to a
  multiple of 4), Swin patch merging (zero-pad odd sizes, 2x2 gather, LN(4C), Linear 4C->2C without
  bias) between stages, NA / DiNA blocks alternating, MLP ratio 4.
* **Isotropic** (NAT-iso, DiNAT-iso, ViT-rpb) -- Conv16x16/s16 patch embedding + LayerNorm, 12
  blocks at 1/16 (NAT-iso: NA 7x7; DiNAT-iso: dilation 1, 2, 1, 2, ...; ViT-rpb: global attention
  with a (2L-1)^2 relative position bias table, L = 14 at 224), LayerNorm, average pool, Linear;
  built on the shared :class:`PlainBackbone` (no class token, no position embedding, NHWC blocks).

Neighbourhood attention comes from :mod:`visionattn.layers.neighborhood_attention` (NATTEN's
neighbourhood semantics and the NAT relative-position-bias rule, with a pure-PyTorch CPU path
and a documented policy for maps smaller than kernel x dilation). Blocks run channels-last
(``[B, H, W, C]``) as NATTEN's modules do.

State-dict layout (hierarchical): ``stem.*``, ``stages.S.downsample.*``, ``stages.S.blocks.J.{norm1,
attn.{qkv, rpb, proj}, norm2, mlp.{fc1, fc2}, gamma1, gamma2}``, ``norm``, ``head.fc``; isotropic:
``patch_embed.*``, ``blocks.J.*``, ``norm``, ``head``. :func:`checkpoint_filter_fn` maps the
official natten<=0.17 checkpoints (``patch_embed``, ``levels.i`` / ``layers.i``, ``norm``, ``head``)
onto them.
"""
import contextlib
import inspect
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, calculate_drop_path_rates, PatchEmbed
from timm.models import generate_default_cfgs, register_model
from timm.models._features_fx import register_notrace_module

from visionattn.layers.fused_linear import ONEDNN_CARD_NOTE, fused_linear
from visionattn.layers.mlp import GeluMlp
from visionattn.layers.neighborhood_attention import NeighborhoodAttention2d
from visionattn.layers.padding import exporting
from visionattn.layers.weight_init import init_trunc_normal_
from ._builder import (
    HierarchicalBackbone, Stage, build_visionattn_model, check_state_dict, init_linear_trunc_normal, remap_keys,
    unwrap_state_dict)
from ._embed import NormChannelsLast, PatchMerging, SwinPatchEmbed
from ._plain import PlainBackbone

__all__ = [
    'NAT', 'NATIsotropic', 'NATBlock', 'RelPosSelfAttention', 'checkpoint_filter_fn', 'FAMILY_CARD',
    'DINAT_DILATIONS', 'DINAT_DILATIONS_384', 'dinat_dilations',
]

# NA's shape-dependent index tables cannot be traced symbolically: keep it a leaf for torch.fx.
register_notrace_module(NeighborhoodAttention2d)
_NA_TAKES_DD = 'device' in inspect.signature(NeighborhoodAttention2d).parameters


def _neighborhood_attention(dim: int, num_heads: int, device=None, dtype=None, **kwargs) -> nn.Module:
    """``NeighborhoodAttention2d`` created on ``device`` / in ``dtype`` (timm's ``device=``/``dtype=``
    model arguments, e.g. the meta device), whether or not the module takes them itself."""
    if _NA_TAKES_DD:
        return NeighborhoodAttention2d(dim, num_heads, device=device, dtype=dtype, **kwargs)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        module = NeighborhoodAttention2d(dim, num_heads, **kwargs)
    return module.to(dtype=dtype) if dtype is not None else module


IntOrSeq = Union[int, Sequence[int]]


# ---------------------------------------------------------------------------------------------
# dilation schedules (official classification configs, spec §2.1)

def _alternate(depth: int, dilation: int) -> List[int]:
    """``[1, d, 1, d, ...]`` of length ``depth``."""
    return [1 if i % 2 == 0 else dilation for i in range(depth)]


def dinat_dilations(depths: Sequence[int], stage_dilations: Sequence[int]) -> List[List[int]]:
    """Per-block dilations: NA and DiNA alternate in every stage (``[1, d_s, 1, d_s, ...]``)."""
    return [_alternate(depth, d) for depth, d in zip(depths, stage_dilations)]


#: DiNAT at 224 (stage maps 56/28/14/7): ``[1, 8, 1], [1, 4, 1, 4], [1, 2]*9, [1]*5``.
DINAT_DILATIONS = (8, 4, 2, 1)
#: DiNAT / DiNAT_s at 384 (stage maps 96/48/24/12): ``[1, 13, 1], [1, 6, 1, 6], [1, 3]*9, [1]*5``.
DINAT_DILATIONS_384 = (13, 6, 3, 1)


# ---------------------------------------------------------------------------------------------
# NAT stem and downsampler (NCHW in, NCHW out; the Swin ones for DiNAT_s are in ._embed)

class ConvTokenizer(NormChannelsLast):
    """NAT stem: Conv3x3/s2 (in -> C/2) -> Conv3x3/s2 (C/2 -> C), then LayerNorm(C)."""

    def __init__(self, in_chans: int, embed_dim: int, norm_layer: Callable = nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1, **dd),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1, **dd),
        )
        self.norm = norm_layer(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last input: oneDNN's convs (and their backward) run faster in it, and the NHWC view for
        # the norm is then contiguous (stem forward + backward at batch 8, 224: 49-61 -> 22-24 ms)
        return self._norm_nchw(self.proj(x.contiguous(memory_format=torch.channels_last)))


class ConvDownsampler(NormChannelsLast):
    """NAT downsample: Conv3x3/s2 (C -> 2C, no bias), then LayerNorm(2C)."""

    def __init__(self, dim: int, out_dim: int, norm_layer: Callable = nn.LayerNorm, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.reduction = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1, bias=False, **dd)
        self.norm = norm_layer(out_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm_nchw(self.reduction(x))


# ---------------------------------------------------------------------------------------------
# attention for ViT-rpb (global self-attention with a NAT-style relative position bias table)

class RelPosSelfAttention(nn.Module):
    """Multi-head self-attention over an NHWC map plus a learned relative position bias (ViT-rpb).

    The bias of query (i, j) and key (i', j') is ``rpb[h, i' - i + Gh - 1, j' - j + Gw - 1]`` with
    ``rpb`` of shape ``[heads, 2Gh - 1, 2Gw - 1]`` (``grid_size`` = (Gh, Gw), 14x14 at 224): the
    official ``MHSARPB`` rule (its flipped ``relative_position_index`` reduces to exactly this). The
    index is rebuilt here, not loaded. The official model only accepts the Gh x Gw map; with
    ``dynamic_size=True`` other maps are accepted: on axes up to G the table is cropped around
    offset 0 (the biases learned for those offsets), on longer axes it is first resized bicubically
    to ``2 * size - 1``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Union[int, Tuple[int, int]] = 14,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            dynamic_size: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'dim={dim} is not divisible by num_heads={num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.grid_size = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        gh, gw = self.grid_size
        self.dynamic_size = dynamic_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * gh - 1, 2 * gw - 1, **dd))
        init_trunc_normal_(self.rpb, std=.02, a=-2., b=2.)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_buffer('relative_position_index', self._rel_index(gh, gw, device=device), persistent=False)

    def init_non_persistent_buffers(self) -> None:
        """Rebuild ``relative_position_index`` on the module's device (timm's hook, e.g. after materialising a
        meta-device model with ``to_empty``; the index is not in the state dict), never as an inference tensor."""
        with torch.inference_mode(False):
            self.relative_position_index = self._rel_index(*self.grid_size, device=self.rpb.device)

    @staticmethod
    def _rel_index(h: int, w: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """``[h*w, h*w]`` flat index into a ``(2h-1) x (2w-1)`` table of (key - query) offsets."""
        rows = torch.arange(h, device=device).repeat_interleave(w)
        cols = torch.arange(w, device=device).repeat(h)
        dr = rows[None, :] - rows[:, None] + h - 1
        dc = cols[None, :] - cols[:, None] + w - 1
        return dr * (2 * w - 1) + dc

    def _table(self, h: int, w: int) -> torch.Tensor:
        """The ``[heads, 2h-1, 2w-1]`` bias table for an h x w map."""
        fh, fw = self.rpb.shape[-2:]
        th, tw = max(2 * h - 1, fh), max(2 * w - 1, fw)
        table = self.rpb
        if (th, tw) != (fh, fw):
            table = F.interpolate(table[None], size=(th, tw), mode='bicubic', align_corners=False)[0]
        r0, c0 = (th - (2 * h - 1)) // 2, (tw - (2 * w - 1)) // 2
        return table[:, r0:r0 + 2 * h - 1, c0:c0 + 2 * w - 1]

    def position_bias(self, h: int, w: int) -> torch.Tensor:
        """``[heads, h*w, h*w]`` attention bias for an h x w map."""
        if h == self.grid_size[0] and w == self.grid_size[1]:
            index = self.relative_position_index
            table = self.rpb
        else:
            if not self.dynamic_size:
                raise ValueError(
                    f'ViT-rpb: feature map {h}x{w} differs from the {self.grid_size[0]}x{self.grid_size[1]} map its '
                    f'relative position bias covers; create the model with dynamic_img_size=True for other sizes')
            index = self._rel_index(h, w, device=self.rpb.device)
            table = self._table(h, w)
        nh = table.shape[0]
        return table.reshape(nh, -1).index_select(1, index.reshape(-1)).view(nh, h * w, h * w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = fused_linear(x, self.qkv.weight, self.qkv.bias)
        qkv = qkv.reshape(B, H * W, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.position_bias(H, W).to(q.dtype)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.unsqueeze(0), dropout_p=self.attn_drop if self.training else 0.,
            scale=self.scale)
        x = x.transpose(1, 2)
        if exporting():  # the exporter decomposes SDPA into ops with another output layout than the traced kernel
            x = x.clone(memory_format=torch.contiguous_format)
        x = x.reshape(B, H, W, C)
        return self.proj_drop(fused_linear(x, self.proj.weight, self.proj.bias))


register_notrace_module(RelPosSelfAttention)


# ---------------------------------------------------------------------------------------------
# block

class NATBlock(nn.Module):
    """Pre-norm transformer block on an NHWC map with (dilated) neighbourhood attention.

    ``x = x + DropPath(gamma1 * attn(norm1(x))); x = x + DropPath(gamma2 * mlp(norm2(x)))``;
    ``gamma1``/``gamma2`` (shape ``[dim]``, initialised to ``layer_scale``) exist only when
    ``layer_scale`` is set. ``attn`` may be replaced (ViT-rpb passes a :class:`RelPosSelfAttention`).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: int = 7,
            dilation: int = 1,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            layer_scale: Optional[float] = None,
            norm_layer: Callable = nn.LayerNorm,
            attn: Optional[nn.Module] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.norm1 = norm_layer(dim, **dd)
        if attn is None:
            attn = _neighborhood_attention(
                dim, num_heads, kernel_size=kernel_size, dilation=dilation, qkv_bias=qkv_bias, qk_scale=qk_scale,
                attn_drop=attn_drop, proj_drop=proj_drop, rel_pos_bias=True, **dd)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = GeluMlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.layer_scale = layer_scale is not None
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale), **dd))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale), **dd))
        else:
            self.gamma1 = self.gamma2 = None

    def extra_repr(self) -> str:
        return f'kernel_size={self.kernel_size}, dilation={self.dilation}, layer_scale={self.layer_scale}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.norm1(x))
        if self.gamma1 is not None:
            y = self.gamma1 * y
        x = x + self.drop_path1(y)
        y = self.mlp(self.norm2(x))
        if self.gamma2 is not None:
            y = self.gamma2 * y
        return x + self.drop_path2(y)


def _per_stage(value, num_stages: int, name: str) -> list:
    if isinstance(value, (int, float)):
        return [value] * num_stages
    value = list(value)
    if len(value) != num_stages:
        raise ValueError(f'{name}={value} has {len(value)} entries, expected one per stage ({num_stages})')
    return value


def _resolve_dilations(dilations, depths: Sequence[int]) -> List[List[int]]:
    """Per-block dilations from None (all 1), one int per stage, or one list per stage."""
    if dilations is None:
        return [[1] * d for d in depths]
    dilations = list(dilations)
    if len(dilations) != len(depths):
        raise ValueError(
            f'dilations has {len(dilations)} stage entries, expected {len(depths)} (depths={tuple(depths)})')
    out = []
    for s, (dil, depth) in enumerate(zip(dilations, depths)):
        dil = [dil] * depth if isinstance(dil, int) else [int(d) for d in dil]
        if len(dil) != depth:
            raise ValueError(f'dilations[{s}]={dil} has {len(dil)} entries, stage {s} has {depth} blocks')
        if any(d < 1 for d in dil):
            raise ValueError(f'dilations[{s}]={dil}: dilations must be >= 1')
        out.append(dil)
    return out


class NAT(HierarchicalBackbone):
    """NAT / DiNAT (``layout='nat'``) and DiNAT_s (``layout='swin'``) backbone + classifier.

    Args:
        in_chans, num_classes, global_pool, drop_rate, drop_path_rate, device, dtype: timm's model
            arguments (``drop_rate`` is the classifier dropout; the official code's block dropout is
            ``proj_drop_rate``). ``drop_path_rate`` rises linearly over all blocks; it defaults to 0
            (timm's convention), the official training values are 0.2-0.5 (see the model card).
        embed_dim: stage-1 channels (stage s has ``embed_dim * 2**s``).
        depths, num_heads: blocks and heads per stage.
        mlp_ratio: MLP hidden / dim.
        kernel_size: neighbourhood size, one int or one per stage.
        dilations: per-block dilations -- None (NAT: all 1), one int per stage, or one list per stage
            with one entry per block (DiNAT: ``[[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]``;
            detection/segmentation configs pass larger ones, spec §2.6). Maps smaller than
            kernel x dilation follow the NA operator's small-input policy.
        layer_scale: initial value of the per-channel ``gamma1``/``gamma2`` (None: no layer scale).
        layout: 'nat' (conv stem, conv downsample) or 'swin' (patch-4 embedding, patch merging).
        qkv_bias, qk_scale, proj_drop_rate, attn_drop_rate: attention / MLP settings (the NA backends
            have no attention dropout: ``attn_drop_rate > 0`` raises in training; the official models use 0).
        norm_eps: LayerNorm epsilon (official 1e-5).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 64,
            depths: Sequence[int] = (3, 4, 6, 5),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            mlp_ratio: float = 3.,
            kernel_size: IntOrSeq = 7,
            dilations=None,
            layer_scale: Optional[float] = None,
            layout: str = 'nat',
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_eps: float = 1e-5,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        if layout not in ('nat', 'swin'):
            raise ValueError(f"layout={layout!r}: expected 'nat' (NAT/DiNAT) or 'swin' (DiNAT_s)")
        num_stages = len(depths)
        num_heads = _per_stage(num_heads, num_stages, 'num_heads')
        kernel_sizes = _per_stage(kernel_size, num_stages, 'kernel_size')
        block_dilations = _resolve_dilations(dilations, depths)
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        dims = [int(embed_dim * 2 ** i) for i in range(num_stages)]
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))

        if layout == 'nat':
            stem = ConvTokenizer(in_chans, dims[0], norm_layer=norm_layer, **dd)
            downsample_cls = ConvDownsampler
        else:
            stem = SwinPatchEmbed(in_chans, dims[0], patch_size=4, norm_layer=norm_layer, **dd)
            downsample_cls = PatchMerging
        stages = []
        cur = 0
        for s in range(num_stages):
            blocks = [
                NATBlock(
                    dims[s], num_heads[s], kernel_size=kernel_sizes[s], dilation=block_dilations[s][j],
                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate, drop_path=dpr[cur + j], layer_scale=layer_scale,
                    norm_layer=norm_layer, **dd)
                for j in range(depths[s])]
            cur += depths[s]
            downsample = downsample_cls(dims[s - 1], dims[s], norm_layer=norm_layer, **dd) if s > 0 else None
            stages.append(Stage(blocks, out_chs=dims[s], reduction=4 * 2 ** s, downsample=downsample,
                                block_fmt='NHWC'))
        super().__init__(
            stem, stages, num_classes=num_classes, in_chans=in_chans, global_pool=global_pool,
            drop_rate=drop_rate, norm=LayerNorm2d(dims[-1], eps=norm_eps, **dd), stem_reduction=4,
            min_input_size=32, **dd)
        self.layout = layout
        self.depths = tuple(depths)
        self.embed_dims = tuple(dims)
        self.kernel_sizes = tuple(kernel_sizes)
        self.dilations = tuple(tuple(d) for d in block_dilations)
        self.drop_path_rate = drop_path_rate
        # official: Linear trunc_normal(0.02) + zero bias, LayerNorm 1/0, convs PyTorch default; the
        # RPB tables are initialised (trunc_normal 0.02) by the attention modules
        self.apply(init_linear_trunc_normal)
        self._no_weight_decay = {n for n, _ in self.named_parameters() if n.endswith('.rpb')}


class NATIsotropic(PlainBackbone):
    """NAT-iso / DiNAT-iso (neighbourhood attention) and ViT-rpb (``kernel_size=None``: global
    attention with relative position bias): isotropic at stride 16, no class token, no absolute
    position embedding, average-pooled head (the shared :class:`PlainBackbone` with NHWC blocks).

    Keys equal the official ones except ``layers.i`` -> ``blocks.i``. NA models accept any input
    whose sides are multiples of the patch (the official code fixes 224 only through a reshape;
    ``dynamic_img_pad=True`` zero-pads other sizes as the official patch embedding does). ViT-rpb
    needs ``img_size`` unless ``dynamic_img_size=True`` (see :class:`RelPosSelfAttention`).

    Args:
        img_size: input size (ViT-rpb: its bias table covers the ``img_size // patch_size`` grid).
        patch_size: patch-embedding stride (16).
        embed_dim, depth, num_heads, mlp_ratio: transformer settings.
        kernel_size: NA kernel, or None for ViT-rpb global attention.
        dilations: per-block dilations (None: all 1); DiNAT-iso uses ``[1, 2] * 6``.
        dynamic_img_size, dynamic_img_pad: as timm's ViTs.
        Others as :class:`NAT`.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            embed_dim: int = 384,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            kernel_size: Optional[int] = 7,
            dilations: Optional[Sequence[int]] = None,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_eps: float = 1e-5,
            dynamic_img_size: bool = False,
            dynamic_img_pad: bool = False,
            device=None,
            dtype=None,
    ):
        dilations = [1] * depth if dilations is None else [int(d) for d in dilations]
        if len(dilations) != depth:
            raise ValueError(f'dilations has {len(dilations)} entries, expected depth={depth}')
        if kernel_size is None and any(d != 1 for d in dilations):
            raise ValueError('dilations apply to neighbourhood attention only (kernel_size=None is ViT-rpb)')
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        grid = (img_hw[0] // patch_size, img_hw[1] // patch_size)
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)

        def block_fn(i: int, drop_path: float = 0., device=None, dtype=None) -> NATBlock:
            dd = {'device': device, 'dtype': dtype}
            attn = None
            if kernel_size is None:
                attn = RelPosSelfAttention(
                    embed_dim, num_heads, grid_size=grid, qkv_bias=qkv_bias, qk_scale=qk_scale,
                    attn_drop=attn_drop_rate, proj_drop=proj_drop_rate, dynamic_size=dynamic_img_size, **dd)
            return NATBlock(
                embed_dim, num_heads, kernel_size=kernel_size or 0, dilation=dilations[i], mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                drop_path=drop_path, norm_layer=norm_layer, attn=attn, **dd)

        super().__init__(
            block_fn, embed_dim, depth=depth, img_size=img_hw, patch_size=patch_size, in_chans=in_chans,
            num_classes=num_classes, global_pool=global_pool, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
            cls_token_at=None, use_pos_embed=False, block_fmt='NHWC', norm_layer=norm_layer,
            embed_layer=partial(PatchEmbed, norm_layer=norm_layer),
            dynamic_img_size=dynamic_img_size, dynamic_img_pad=dynamic_img_pad,
            strict_img_size=kernel_size is None, device=device, dtype=dtype)
        self.kernel_size = kernel_size
        self.dilations = tuple(dilations)

    @torch.jit.ignore
    def no_weight_decay(self):
        return super().no_weight_decay() | {n for n, _ in self.named_parameters() if n.endswith('.rpb')}


# ---------------------------------------------------------------------------------------------
# checkpoints

def _next_stage(m) -> str:
    return f'stages.{int(m.group(1)) + 1}.downsample.'


# official (natten<=0.17 names) -> visionattn, applied in order; visionattn keys pass unchanged
_HIERARCHICAL_RULES = (
    (r'^patch_embed\.', 'stem.'),
    # NAT / DiNAT: levels.i; the downsample at the end of level i is the start of stage i+1
    (r'^levels\.(\d+)\.downsample\.', _next_stage),
    (r'^levels\.(\d+)\.blocks\.', r'stages.\1.blocks.'),
    # DiNAT_s: layers.i.blocks / layers.i.downsample (patch merging at the end of layer i)
    (r'^layers\.(\d+)\.downsample\.', _next_stage),
    (r'^layers\.(\d+)\.blocks\.', r'stages.\1.blocks.'),
    (r'^head\.(weight|bias)$', r'head.fc.\1'),
)
# isotropic: layers.i is block i; patch_embed / norm / head keep their names
_ISOTROPIC_RULES = (
    (r'^layers\.(\d+)\.', r'blocks.\1.'),
)


def _resize_rpb(sd: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Bicubically resize RPB tables whose head count matches but whose window differs (e.g. 7x7
    weights into an 11x11 model, as the official ``dinat_large_21k_11x11`` weights were made)."""
    model_sd = model.state_dict()
    for k, v in sd.items():
        if k.endswith('.rpb') and k in model_sd:
            target = model_sd[k].shape
            if v.ndim == 3 and v.shape != target and v.shape[0] == target[0]:
                sd[k] = F.interpolate(
                    v[None].float(), size=tuple(target[1:]), mode='bicubic', align_corners=False)[0].to(v.dtype)
    return sd


def checkpoint_filter_fn(state_dict: Dict, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an official NAT / DiNAT / DiNAT_s / isotropic checkpoint (natten<=0.17 parameter names
    ``attn.qkv``, ``attn.rpb``, ``attn.proj``) or a visionattn one onto ``model``, strictly.

    Any container is accepted (raw -- the official release format --, ``model``, ``state_dict``,
    ``module.`` prefixes). Tensors are renamed only, except: ViT-rpb's ``relative_position_index``
    buffers are dropped (rebuilt by the model) and RPB tables of another window size (same heads)
    are resized bicubically. Missing, unexpected or mis-shaped keys raise a ``ValueError``.
    """
    sd = unwrap_state_dict(state_dict)
    sd = {k: v for k, v in sd.items() if not k.endswith('attn.relative_position_index')}
    sd = remap_keys(sd, _ISOTROPIC_RULES if isinstance(model, NATIsotropic) else _HIERARCHICAL_RULES)
    sd = _resize_rpb(sd, model)
    return check_state_dict(sd, model, source=f'{type(model).__name__} checkpoint')


# ---------------------------------------------------------------------------------------------
# registry

def _create_nat(variant: str, pretrained: bool = False, **kwargs) -> NAT:
    return build_visionattn_model(NAT, variant, pretrained, checkpoint_filter_fn, **kwargs)


def _create_isotropic(variant: str, pretrained: bool = False, **kwargs) -> NATIsotropic:
    out_indices = kwargs.pop('out_indices', 3)
    return build_visionattn_model(
        NATIsotropic, variant, pretrained, checkpoint_filter_fn, plain=True, out_indices=out_indices, **kwargs)


_NAT_CKPT = 'https://shi-labs.com/projects/nat/checkpoints/CLS/'
_DINAT_CKPT = 'https://shi-labs.com/projects/dinat/checkpoints/'


def _cfg(url: str, **kwargs) -> Dict:
    """Official raw state dict at ``url`` (shi-labs.com), loaded through ``checkpoint_filter_fn``."""
    cfg = {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        # the official validate.py uses timm's defaults (no model cfg): crop 0.875, bicubic
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.proj.0', 'classifier': 'head.fc',
        'license': 'mit',
        'paper_ids': 'arXiv:2204.07143',
        'paper_name': 'Neighborhood Attention Transformer',
        'origin_url': 'https://github.com/SHI-Labs/Neighborhood-Attention-Transformer',
    }
    cfg.update(kwargs)
    return cfg


def _dinat_cfg(url: str, **kwargs) -> Dict:
    return _cfg(url, paper_ids='arXiv:2209.15001', paper_name='Dilated Neighborhood Attention Transformer',
                **kwargs)


_S = dict(first_conv='stem.proj')  # DiNAT_s: single patch-embedding conv
_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
_ISO = dict(first_conv='patch_embed.proj', classifier='head', pool_size=(14, 14))

default_cfgs = generate_default_cfgs({
    'visionattn_nat_mini.in1k': _cfg(_NAT_CKPT + 'nat_mini.pth'),
    'visionattn_nat_tiny.in1k': _cfg(_NAT_CKPT + 'nat_tiny.pth'),
    'visionattn_nat_small.in1k': _cfg(_NAT_CKPT + 'nat_small.pth'),
    'visionattn_nat_base.in1k': _cfg(_NAT_CKPT + 'nat_base.pth'),

    'visionattn_dinat_mini.in1k': _dinat_cfg(_DINAT_CKPT + 'imagenet1k/dinat_mini_in1k_224.pth'),
    'visionattn_dinat_tiny.in1k': _dinat_cfg(_DINAT_CKPT + 'imagenet1k/dinat_tiny_in1k_224.pth'),
    'visionattn_dinat_small.in1k': _dinat_cfg(_DINAT_CKPT + 'imagenet1k/dinat_small_in1k_224.pth'),
    'visionattn_dinat_base.in1k': _dinat_cfg(_DINAT_CKPT + 'imagenet1k/dinat_base_in1k_224.pth'),
    'visionattn_dinat_large.in22k_ft_in1k': _dinat_cfg(
        _DINAT_CKPT + 'imagenet1k/dinat_large_in22k_in1k_224.pth'),
    'visionattn_dinat_large_384.in22k_ft_in1k': _dinat_cfg(
        _DINAT_CKPT + 'imagenet1k/dinat_large_in22k_in1k_384.pth', **_384),
    'visionattn_dinat_large_384_11x11.in22k_ft_in1k': _dinat_cfg(
        _DINAT_CKPT + 'imagenet1k/dinat_large_in22k_in1k_384_11x11.pth', **_384),

    'visionattn_dinat_s_tiny.in1k': _dinat_cfg(_DINAT_CKPT + 'imagenet1k/dinat_s_tiny_in1k_224.pth', **_S),
    'visionattn_dinat_s_small.in1k': _dinat_cfg(_DINAT_CKPT + 'imagenet1k/dinat_s_small_in1k_224.pth', **_S),
    'visionattn_dinat_s_base.in1k': _dinat_cfg(_DINAT_CKPT + 'imagenet1k/dinat_s_base_in1k_224.pth', **_S),
    'visionattn_dinat_s_large.in22k_ft_in1k': _dinat_cfg(
        _DINAT_CKPT + 'imagenet1k/dinat_s_large_in1k_224.pth', **_S),
    'visionattn_dinat_s_large_384.in22k_ft_in1k': _dinat_cfg(
        _DINAT_CKPT + 'imagenet1k/dinat_s_large_in1k_384.pth', **_S, **_384),

    'visionattn_nat_isotropic_small.in1k': _dinat_cfg(
        _DINAT_CKPT + 'isotropic/nat_isotropic_small_in1k_224.pth', **_ISO),
    'visionattn_nat_isotropic_base.in1k': _dinat_cfg(
        _DINAT_CKPT + 'isotropic/nat_isotropic_base_in1k_224.pth', **_ISO),
    'visionattn_dinat_isotropic_small.in1k': _dinat_cfg(
        _DINAT_CKPT + 'isotropic/dinat_isotropic_small_in1k_224.pth', **_ISO),
    'visionattn_dinat_isotropic_base.in1k': _dinat_cfg(
        _DINAT_CKPT + 'isotropic/dinat_isotropic_base_in1k_224.pth', **_ISO),
    'visionattn_vitrpb_small.in1k': _dinat_cfg(
        _DINAT_CKPT + 'isotropic/vitrpb_small_in1k_224.pth', fixed_input_size=True, **_ISO),
    'visionattn_vitrpb_base.in1k': _dinat_cfg(
        _DINAT_CKPT + 'isotropic/vitrpb_base_in1k_224.pth', fixed_input_size=True, **_ISO),
})

_MINI = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.)
_TINY = dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.)
_SMALL = dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2.)
_BASE = dict(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2.)
_LARGE = dict(embed_dim=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), mlp_ratio=2.)
_SWIN = dict(layout='swin', mlp_ratio=4.)


def _dinat(cfg: Dict, stage_dilations=DINAT_DILATIONS, **kwargs) -> Dict:
    return dict(cfg, dilations=dinat_dilations(cfg['depths'], stage_dilations), **kwargs)


def _nat_entry(variant: str, pretrained: bool, model_args: Dict, kwargs: Dict) -> NAT:
    return _create_nat(variant, pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_nat_mini(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Mini, 19,984,174 params."""
    return _nat_entry('visionattn_nat_mini', pretrained, _MINI, kwargs)


@register_model
def visionattn_nat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Tiny, 27,901,582 params."""
    return _nat_entry('visionattn_nat_tiny', pretrained, _TINY, kwargs)


@register_model
def visionattn_nat_small(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Small (layer scale 1e-5), 50,743,297 params."""
    return _nat_entry('visionattn_nat_small', pretrained, dict(_SMALL, layer_scale=1e-5), kwargs)


@register_model
def visionattn_nat_base(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Base (layer scale 1e-5), 89,769,652 params."""
    return _nat_entry('visionattn_nat_base', pretrained, dict(_BASE, layer_scale=1e-5), kwargs)


@register_model
def visionattn_dinat_mini(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Mini, 19,984,174 params."""
    return _nat_entry('visionattn_dinat_mini', pretrained, _dinat(_MINI), kwargs)


@register_model
def visionattn_dinat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Tiny, 27,901,582 params."""
    return _nat_entry('visionattn_dinat_tiny', pretrained, _dinat(_TINY), kwargs)


@register_model
def visionattn_dinat_small(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Small (no layer scale, unlike NAT-Small), 50,719,681 params."""
    return _nat_entry('visionattn_dinat_small', pretrained, _dinat(_SMALL), kwargs)


@register_model
def visionattn_dinat_base(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Base (layer scale 1e-5), 89,769,652 params."""
    return _nat_entry('visionattn_dinat_base', pretrained, _dinat(_BASE, layer_scale=1e-5), kwargs)


@register_model
def visionattn_dinat_large(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Large (ImageNet-22k -> 1k, 224), 200,943,514 params."""
    return _nat_entry('visionattn_dinat_large', pretrained, _dinat(_LARGE), kwargs)


@register_model
def visionattn_dinat_large_384(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Large at 384 (dilations 13/6/3/1), 200,943,514 params."""
    return _nat_entry('visionattn_dinat_large_384', pretrained, _dinat(_LARGE, DINAT_DILATIONS_384), kwargs)


@register_model
def visionattn_dinat_large_384_11x11(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Large at 384 with an 11x11 kernel (dilations 8/4/2/1, as the official code), 201,144,250 params."""
    return _nat_entry('visionattn_dinat_large_384_11x11', pretrained, _dinat(_LARGE, kernel_size=11), kwargs)


_DINAT_S_TINY = dict(_SWIN, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_DINAT_S_SMALL = dict(_SWIN, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_DINAT_S_BASE = dict(_SWIN, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_DINAT_S_LARGE = dict(_SWIN, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))


@register_model
def visionattn_dinat_s_tiny(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Tiny (Swin layout), 28,288,354 params."""
    return _nat_entry('visionattn_dinat_s_tiny', pretrained, _dinat(_DINAT_S_TINY), kwargs)


@register_model
def visionattn_dinat_s_small(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Small (Swin layout), 49,606,258 params."""
    return _nat_entry('visionattn_dinat_s_small', pretrained, _dinat(_DINAT_S_SMALL), kwargs)


@register_model
def visionattn_dinat_s_base(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Base (Swin layout), 87,768,224 params."""
    return _nat_entry('visionattn_dinat_s_base', pretrained, _dinat(_DINAT_S_BASE), kwargs)


@register_model
def visionattn_dinat_s_large(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Large (Swin layout, ImageNet-22k -> 1k), 196,532,476 params."""
    return _nat_entry('visionattn_dinat_s_large', pretrained, _dinat(_DINAT_S_LARGE), kwargs)


@register_model
def visionattn_dinat_s_large_384(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Large at 384 (dilations 13/6/3/1), 196,532,476 params."""
    return _nat_entry(
        'visionattn_dinat_s_large_384', pretrained, _dinat(_DINAT_S_LARGE, DINAT_DILATIONS_384), kwargs)


_ISO_SMALL = dict(embed_dim=384, depth=12, num_heads=12, mlp_ratio=4.)
_ISO_BASE = dict(embed_dim=768, depth=12, num_heads=24, mlp_ratio=4.)


def _iso_entry(variant: str, pretrained: bool, model_args: Dict, kwargs: Dict) -> NATIsotropic:
    return _create_isotropic(variant, pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_nat_isotropic_small(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """NAT-iso-Small (7x7 NA at 1/16), 21,999,736 params."""
    return _iso_entry('visionattn_nat_isotropic_small', pretrained, _ISO_SMALL, kwargs)


@register_model
def visionattn_nat_isotropic_base(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """NAT-iso-Base (7x7 NA at 1/16), 86,465,800 params."""
    return _iso_entry('visionattn_nat_isotropic_base', pretrained, _ISO_BASE, kwargs)


@register_model
def visionattn_dinat_isotropic_small(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """DiNAT-iso-Small (dilations 1, 2, 1, 2, ...), 21,999,736 params."""
    return _iso_entry('visionattn_dinat_isotropic_small', pretrained,
                      dict(_ISO_SMALL, dilations=_alternate(12, 2)), kwargs)


@register_model
def visionattn_dinat_isotropic_base(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """DiNAT-iso-Base (dilations 1, 2, 1, 2, ...), 86,465,800 params."""
    return _iso_entry('visionattn_dinat_isotropic_base', pretrained,
                      dict(_ISO_BASE, dilations=_alternate(12, 2)), kwargs)


@register_model
def visionattn_vitrpb_small(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """ViT-rpb-Small (global attention + 27x27 relative position bias), 22,080,376 params."""
    return _iso_entry('visionattn_vitrpb_small', pretrained, dict(_ISO_SMALL, kernel_size=None), kwargs)


@register_model
def visionattn_vitrpb_base(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """ViT-rpb-Base (global attention + 27x27 relative position bias), 86,627,080 params."""
    return _iso_entry('visionattn_vitrpb_base', pretrained, dict(_ISO_BASE, kernel_size=None), kwargs)


# ---------------------------------------------------------------------------------------------
# model card

FAMILY_CARD = dict(
    name='NAT / DiNAT',
    paper=(
        'Neighborhood Attention Transformer -- Hassani, Walton, Li, Li, Shi; CVPR 2023; arXiv:2204.07143. '
        'Dilated Neighborhood Attention Transformer -- Hassani, Shi; arXiv:2209.15001 (DiNAT, DiNAT_s and the '
        'isotropic NAT / DiNAT / ViT-rpb models)'),
    repo='https://github.com/SHI-Labs/Neighborhood-Attention-Transformer',
    license='MIT (official code and weights)',
    accuracy={
        'visionattn_nat_mini': '81.8 (README)',
        'visionattn_nat_tiny': '83.2 (README)',
        'visionattn_nat_small': '83.7 (README)',
        'visionattn_nat_base': '84.3 (README)',
        'visionattn_dinat_mini': '81.8 (README)',
        'visionattn_dinat_tiny': '82.7 (README)',
        'visionattn_dinat_small': '83.8 (README)',
        'visionattn_dinat_base': '84.4 (README)',
        'visionattn_dinat_large': '86.6 (README, IN-22k pre-trained)',
        'visionattn_dinat_large_384': '87.4 (README, IN-22k pre-trained)',
        'visionattn_dinat_large_384_11x11': '87.5 (README, IN-22k pre-trained)',
        'visionattn_dinat_s_tiny': '81.8 (README)',
        'visionattn_dinat_s_small': '83.5 (README)',
        'visionattn_dinat_s_base': '83.8 (README)',
        'visionattn_dinat_s_large': '86.5 (README, IN-22k pre-trained)',
        'visionattn_dinat_s_large_384': '87.4 (README, IN-22k pre-trained)',
        'visionattn_nat_isotropic_small': '80.0 (DiNAT.md)',
        'visionattn_nat_isotropic_base': '81.6 (DiNAT.md)',
        'visionattn_dinat_isotropic_small': '80.8 (DiNAT.md)',
        'visionattn_dinat_isotropic_base': '82.1 (DiNAT.md)',
        'visionattn_vitrpb_small': '81.2 (DiNAT.md)',
        'visionattn_vitrpb_base': '82.5 (DiNAT.md)',
    },
    load_official=(
        "`timm.create_model('visionattn_nat_tiny', pretrained=True)` downloads the official raw state dict from "
        "shi-labs.com (the `url` of each tag, taken from the official `classification/{nat,dinat,dinats,isotropic}.py`"
        "; timm caches it) and loads it strictly. A file downloaded by hand loads the same way with "
        "`pretrained_cfg_overlay=dict(file='nat_tiny.pth')` -- `checkpoint_filter_fn` renames the natten<=0.17 keys "
        "(`levels.i`/`layers.i`, `attn.qkv`/`attn.rpb`/`attn.proj`, `gamma1`/`gamma2`), raw or under "
        "`model`/`state_dict`, with or without `module.`."),
    differences=[
        ONEDNN_CARD_NOTE,
        'Neighbourhood attention with relative position bias runs without natten (natten >= 0.20 removed RPB and '
        'its CPU kernels): a pure-PyTorch backend reproduces natten<=0.17 semantics (window start clamped, '
        'dilation groups, `rpb[h, di/d + k - 1, dj/d + k - 1]`); other backends (flex, triton) are selected '
        'with `VISIONATTN_NA_BACKEND` / `na_backend(...)` and agree to fp32 rounding (~1e-6).',
        'Maps smaller than kernel x dilation on an axis (e.g. DiNAT at small inputs, DiNAT detection dilations, '
        'the 384 variants at 224) do not raise as natten>=0.15 does: they follow the NA operator\'s documented '
        'small-input policy; whenever kernel x dilation <= map size the exact natten semantics apply.',
        'The official downsample at the end of stages 1-3 is the `downsample` at the start of stages 2-4 here, '
        'so `forward_intermediates` / `features_only` return the pre-downsample maps (reductions 4/8/16/32) '
        'that the official detection backbone uses (it adds new `norm0..3` layers, not included).',
        'The final LayerNorm is applied to the NCHW map in `forward_features` (the official code normalises '
        'tokens, then pools): same logits. `drop_rate` is the classifier dropout (timm); the official '
        'block dropout is `proj_drop_rate`.',
        'Default `drop_path_rate` is 0 (timm convention); the official training values are NAT/DiNAT M/T 0.2, '
        'S 0.3, B 0.5, L 0.35 (0.2 for IN-22k), DiNAT_s T 0.2, S 0.3, B 0.5, L 0.35, isotropic S 0.1, B 0.4.',
        'Isotropic models: `layers.i` is `blocks.i`; `forward_features` returns tokens [B, N, C] as timm ViTs. '
        'NAT-iso / DiNAT-iso accept any input whose sides are multiples of 16 (the official code reshapes to '
        '14x14; `dynamic_img_pad=True` zero-pads other sizes as its patch embedding does); ViT-rpb needs 224 '
        'unless created with `dynamic_img_size=True` (bias table cropped, or resized bicubically for maps larger '
        'than 14). ViT-rpb runs `scaled_dot_product_attention` with the bias as an additive mask; its '
        '`relative_position_index` buffers are rebuilt, not loaded.',
        'GMACs in this card count the matmuls the `torch` backend executes at inference: on long axes each query '
        'tile (7 or 8 tokens per axis, whichever pads the axis least) attends to its (T+k-1)^2 key halo with a '
        '-inf mask, and short axes run as one masked tile, so NA layers count more than the official NA MACs '
        '(nat_tiny 4.83 here vs 4.30 official; ViT-rpb matches exactly, 4.57). CPU training uses tiles of 4 rows '
        'by 7 or 8 columns (smaller halos) and a hand-written backward from the fused qkv.',
        'RPB tables of a different window (same heads) are resized bicubically on load, as the official '
        '`dinat_large_21k_11x11` weights were produced; every other shape mismatch raises.',
        '`visionattn_dinat_s_large*` use heads 6/12/24/48 (the measured official layout at commit d334f5b); '
        'an older `dinats.py` revision had 4/8/16/32.',
    ],
)
