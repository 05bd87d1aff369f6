"""PVT (v1) and PVTv2 hosts: the pyramids of Wang et al. with the token mixer as a parameter.

* PVT ("Pyramid Vision Transformer", ICCV 2021, arXiv:2102.12122): non-overlapping patch embeddings
  (Conv 4x4/s4, then 2x2/s2) + LayerNorm (eps 1e-5), a learned ``pos_embed`` per stage added after the
  embedding (resampled bilinearly to the current map, as the official ``_get_pos_embed``) and dropout;
  pre-norm blocks (LayerNorm eps 1e-6) with an fc1-GELU-fc2 MLP. The official model constructs a
  final ``norm`` and never applies it (see :class:`Pvt`). Head: average of the last-stage tokens -> Linear.
* PVTv2 ("PVT v2: Improved Baselines with Pyramid Vision Transformer", CVMJ 2022, arXiv:2106.13797):
  overlapping patch embeddings (Conv 7x7/s4 pad 3, then 3x3/s2 pad 1) + LayerNorm (eps 1e-5), no
  position embedding, an MLP with a depthwise 3x3 conv between fc1 and GELU, a LayerNorm (eps 1e-6)
  after each stage (``stages.S.norm``, official ``norm{i}``). Head: average -> Linear.

The host's own attention is spatial-reduction attention (sr 8-4-2-1); ``mixers`` replaces it per block
with any module ``factory(dim, num_heads, grid_size, device=, dtype=)`` whose
``forward(x, H, W)`` maps ``(B, N, C)`` tokens of an ``H x W`` map in raster order to ``(B, N, C)``
(FLatten's ``FocusedLinearAttention(separate_q_kv=True)``, Agent attention). ``grid_size`` is the
stage's map at ``img_size``.

Resolution: ``img_size`` fixes the training maps, to which learned encodings (``pos_embed``, a mixer's
``positional_encoding``) are sized. With ``dynamic_img_size=False`` another input size is refused with a
``ValueError``; with ``dynamic_img_size=True`` any size >= 32 runs (encodings resampled bilinearly per
forward) and the training size computes exactly what the fixed model does.

Layout (shared builder): ``stem`` / ``stages.S.downsample`` = patch embedding S (with ``pos_embed`` for
PVT), ``stages.S.blocks.J.{norm1, attn, norm2, mlp.{fc1, dwconv, fc2}}``, ``stages.S.norm`` (PVTv2),
``unused_norm`` (PVT), ``head.fc``. :meth:`Pvt.filter_checkpoint` maps the official layout
(``patch_embed{i}``, ``pos_embed{i}``, ``block{i}.{j}``, ``norm{i}``, ``norm``, ``head``) onto it.
"""
import math
from typing import Callable, Dict, Final, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, calculate_drop_path_rates, to_2tuple

from visionattn.layers.focused_linear_attention import resample_grid_tokens
from visionattn.layers.mlp import GeluMlp
from visionattn.layers.spatial_reduction_attention import SpatialReductionAttention
from visionattn.layers.weight_init import init_trunc_normal_
from ._builder import (
    HierarchicalBackbone, Stage, add_residual, check_host_args, check_img_size, check_state_dict,
    init_linear_trunc_normal, remap_keys, resample_checkpoint_encodings, unwrap_state_dict)

__all__ = [
    'Pvt', 'PvtV2', 'PvtBlock', 'PvtPatchEmbed', 'PVT_CHECKPOINT_RULES', 'PVT_V2_CHECKPOINT_RULES',
]

MixerFactory = Callable[..., nn.Module]
_NO_DECAY = ('pos_embed', 'positional_encoding', 'scale')  # learned encodings and FLatten's focusing scale


def _conv_out(size: Tuple[int, int], kernel_size: int, stride: int, padding: int) -> Tuple[int, int]:
    return tuple((s + 2 * padding - kernel_size) // stride + 1 for s in size)


class PvtPatchEmbed(nn.Module):
    """Conv patch embedding -> LayerNorm (eps 1e-5) [-> + ``pos_embed``] -> dropout, NCHW in and out.

    With ``grid_size`` the module owns a learned ``pos_embed`` ``(1, gh * gw, C)`` for that map (PVT),
    resampled bilinearly when the map differs. With ``img_size`` (the stem of a fixed-size model) any
    other input size raises a ``ValueError``. The output keeps channels-last memory, which the NHWC
    blocks of the following :class:`Stage` read without a copy.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int,
            stride: int,
            padding: int = 0,
            grid_size: Optional[Tuple[int, int]] = None,
            img_size: Optional[Tuple[int, int]] = None,
            drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.img_size = img_size
        self.grid_size = grid_size
        self.proj = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding, **dd)
        self.norm = nn.LayerNorm(out_chs, eps=1e-5, **dd)
        self.pos_embed = None if grid_size is None else nn.Parameter(
            torch.zeros(1, grid_size[0] * grid_size[1], out_chs, **dd))
        self.drop = nn.Dropout(drop) if drop > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.img_size is not None:
            check_img_size(x, self.img_size)
        x = self.norm(self.proj(x).permute(0, 2, 3, 1))
        pos_embed, grid = self.pos_embed, self.grid_size
        if pos_embed is not None and grid is not None:
            B, H, W, C = x.shape
            x = x + resample_grid_tokens(pos_embed, grid, (H, W)).reshape(1, H, W, C)
        return self.drop(x).permute(0, 3, 1, 2)


class PvtBlock(nn.Module):
    """Pre-norm block on an NHWC map: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` (LayerNorm eps 1e-6).

    ``attn`` is the host's spatial-reduction attention (``mixer=None``, NHWC) or ``mixer(dim, num_heads,
    grid_size, device=, dtype=)``, called on the ``(B, H * W, C)`` tokens with ``(H, W)``.
    """
    host_attn: Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            mlp_ratio: float = 4.,
            mixer: Optional[MixerFactory] = None,
            sr_ratio: int = 1,
            qkv_bias: bool = True,
            dwconv_mlp: bool = False,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.host_attn = mixer is None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        if mixer is None:
            self.attn = SpatialReductionAttention(
                dim, num_heads, sr_ratio=sr_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        else:
            self.attn = mixer(dim, num_heads, grid_size, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = GeluMlp(dim, int(dim * mlp_ratio), drop=proj_drop, dwconv=dwconv_mlp, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.has_drop_path = drop_path > 0.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        y = self.norm1(x)
        if self.host_attn:
            y = self.attn(y)
        else:
            y = self.attn(y.reshape(B, H * W, C), H, W).reshape(B, H, W, C)
        x = add_residual(self.drop_path1(y), x)
        if self.training and self.has_drop_path:
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        return self.mlp(self.norm2(x), shortcut=x)  # the residual add in fc2's epilogue at inference


def _pvt_rules(v2: bool):
    rules = [(r'^patch_embed1\.', 'stem.'), (r'^pos_embed1$', 'stem.pos_embed')]
    for i in range(2, 5):
        rules += [(rf'^patch_embed{i}\.', f'stages.{i - 1}.downsample.'),
                  (rf'^pos_embed{i}$', f'stages.{i - 1}.downsample.pos_embed')]
    rules += [(rf'^block{i}\.', f'stages.{i - 1}.blocks.') for i in range(1, 5)]
    if v2:
        rules += [(rf'^norm{i}\.', f'stages.{i - 1}.norm.') for i in range(1, 5)]
        rules += [(r'\.mlp\.dwconv\.dwconv\.', '.mlp.dwconv.')]
    else:
        rules += [(r'^norm\.', 'unused_norm.')]
    return tuple(rules + [(r'^head\.(weight|bias)$', r'head.fc.\1')])


# official key -> visionattn key (applied in order; visionattn keys pass through unchanged)
PVT_CHECKPOINT_RULES = _pvt_rules(v2=False)
PVT_V2_CHECKPOINT_RULES = _pvt_rules(v2=True)


class Pvt(HierarchicalBackbone):
    """PVT (v1) host.

    The official model constructs a final LayerNorm ``norm`` but never applies it (its line is commented
    out of ``forward_features``, which averages the raw last-stage tokens). With ``unused_final_norm``
    (default for PVT) that LayerNorm exists here as ``unused_norm``, never applied and frozen
    (``requires_grad=False``: it would get no gradient), so that the official ``norm.*`` keys load strictly
    and the parameter count matches; Agent-PVT has no such norm (``unused_final_norm=False``).

    Args:
        img_size: training input size (int or (H, W)); fixes the stage maps the learned encodings cover.
        dynamic_img_size: accept any input size >= 32, resampling the encodings on the fly.
        in_chans, num_classes, global_pool, drop_rate, drop_path_rate, device, dtype: timm's model args.
        embed_dims, depths, num_heads, mlp_ratios, sr_ratios: per-stage settings (``sr_ratios`` of the
            host's own spatial-reduction attention).
        mixers: one sequence per stage with one entry per block: ``None`` (the host's attention) or a factory
            ``factory(dim, num_heads, grid_size, device=, dtype=)`` (dropout settings belong in the factory).
        qkv_bias: bias of the host attention's ``q`` / ``kv``.
        pos_drop_rate, proj_drop_rate, attn_drop_rate: dropout after each patch embedding (PVT), after the
            attention / MLP projections, on the host attention's weights.
        unused_final_norm: keep the official unused final norm (``None``: PVT yes, PVTv2 no).
    """
    v2 = False
    checkpoint_rules = PVT_CHECKPOINT_RULES

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            depths: Sequence[int] = (3, 4, 6, 3),
            num_heads: Sequence[int] = (1, 2, 5, 8),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            mixers: Optional[Sequence[Sequence[Optional[MixerFactory]]]] = None,
            qkv_bias: bool = True,
            dynamic_img_size: bool = False,
            unused_final_norm: Optional[bool] = None,
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
        mixers = check_host_args(
            depths, mixers, embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios, sr_ratios=sr_ratios)
        img_size = to_2tuple(img_size)
        img_size = (int(img_size[0]), int(img_size[1]))
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))  # on CPU: also under a meta-device context

        # PVT: Conv k = s = 4, then 2; PVTv2: Conv 7/s4 pad 3, then 3/s2 pad 1
        embed_geometry = [(7, 4, 3), (3, 2, 1)] if self.v2 else [(4, 4, 0), (2, 2, 0)]
        embed_geometry = embed_geometry[:1] + embed_geometry[1:] * (num_stages - 1)
        grid = img_size
        stem = None
        stages = []
        cur = 0
        for s in range(num_stages):
            kernel_size, stride, padding = embed_geometry[s]
            grid = _conv_out(grid, kernel_size, stride, padding)
            embed = PvtPatchEmbed(
                in_chans if s == 0 else embed_dims[s - 1], embed_dims[s], kernel_size, stride, padding,
                grid_size=None if self.v2 else grid, img_size=None if s or dynamic_img_size else img_size,
                drop=0. if self.v2 else pos_drop_rate, **dd)
            blocks = [
                PvtBlock(
                    embed_dims[s], num_heads[s], grid, mlp_ratio=mlp_ratios[s], mixer=mixers[s][j],
                    sr_ratio=sr_ratios[s], qkv_bias=qkv_bias, dwconv_mlp=self.v2, proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate, drop_path=dpr[cur + j], **dd)
                for j in range(depths[s])]
            cur += depths[s]
            if s == 0:
                stem = embed
            stages.append(Stage(
                blocks, out_chs=embed_dims[s], reduction=4 * 2 ** s, downsample=embed if s else None,
                block_fmt='NHWC', norm=nn.LayerNorm(embed_dims[s], eps=1e-6, **dd) if self.v2 else None))
        super().__init__(
            stem, stages, num_classes=num_classes, in_chans=in_chans, global_pool=global_pool,
            drop_rate=drop_rate, stem_reduction=4, min_input_size=4 * 2 ** (num_stages - 1), **dd)
        self.img_size = img_size
        self.dynamic_img_size = dynamic_img_size
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        if not self.v2 if unused_final_norm is None else unused_final_norm:
            self.unused_norm = nn.LayerNorm(embed_dims[-1], eps=1e-6, **dd)  # see the class docstring
        self._init_weights()
        if hasattr(self, 'unused_norm'):
            self.unused_norm.requires_grad_(False)
        self._no_weight_decay = {n for n, _ in self.named_parameters() if n.rsplit('.', 1)[-1] in _NO_DECAY}

    def _init_weights(self):
        """Official init: Linear trunc_normal(0.02) + zero bias, LayerNorm 1 / 0, ``pos_embed`` trunc_normal(0.02);
        convs keep PyTorch's init (PVT) or get N(0, sqrt(2 / fan_out)) + zero bias (PVTv2)."""
        self.apply(init_linear_trunc_normal)
        for m in self.modules():
            if isinstance(m, PvtPatchEmbed) and m.pos_embed is not None:
                init_trunc_normal_(m.pos_embed, std=.02)
            elif isinstance(m, nn.Conv2d) and self.v2:
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0., math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        """As :class:`HierarchicalBackbone`; ``prune_norm`` also drops the unused final norm."""
        take_indices = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        if prune_norm and hasattr(self, 'unused_norm'):
            del self.unused_norm
        return take_indices

    @torch.jit.ignore
    def filter_checkpoint(self, state_dict: Dict, source: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """An official (or visionattn) checkpoint in any container -> this model's state dict.

        Maps the official keys with :attr:`checkpoint_rules`, resamples the learned encodings to this
        model's maps (``img_size=`` another size) and raises a ``ValueError`` naming missing /
        unexpected / mis-shaped keys.
        """
        sd = remap_keys(unwrap_state_dict(state_dict), self.checkpoint_rules)
        sd = resample_checkpoint_encodings(sd, self)
        return check_state_dict(sd, self, source=source or f'{type(self).__name__} checkpoint')


class PvtV2(Pvt):
    """PVTv2 host: overlapping patch embeddings, depthwise-conv MLP, ``stages.S.norm`` after each stage.

    Arguments as :class:`Pvt` (``pos_drop_rate`` unused: PVTv2 has no position embedding).
    """
    v2 = True
    checkpoint_rules = PVT_V2_CHECKPOINT_RULES

