"""Swin Transformer host (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows", ICCV 2021, arXiv:2103.14030) with a token mixer chosen per block (FLatten ``LLSS``, Agent
``AAAB`` / ``AABB`` / ``AAMB2``).

Macro structure, as the official FLatten / Agent Swin files (spec ``flatten_agent_convit_davit_twins.md``
§2.2, §3.2): patch-4 conv + LayerNorm stem, four stages of pre-norm blocks
``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` (MLP ratio 4, GELU), PatchMerging (2x2 gather, LN(4C),
Linear 4C -> 2C) at the start of stages 2-4 (the official ``layers.i.downsample`` at the end of stage
i), final LayerNorm -> average pool -> Linear.

Windows. Every block attends inside windows of its stage map (NHWC ``[B, H, W, C]``), on odd blocks
cyclically shifted by half a window. At the training size (``img_size``) the window of a block is
clamped to the map as the official block does (``window = map``, shift 0 where the window covers the
map). At another size (``dynamic_img_size=True``):

* a mixer block whose window covers the training map (or ``mixer_window_size=None``) stays one window
  over the whole map, so FLatten's ``L`` stages stay global;
* any other block keeps its training window, clamped per dimension to smaller maps (shift 0 in a
  dimension the window covers); other maps are zero-padded bottom/right to whole windows, shifted,
  and the host's own attention masks the shifted regions (Swin detection / timm semantics).

The host's own attention (``S`` / ``B`` blocks) is :class:`~visionattn.layers.SwinWindowAttention`
with the shift mask. Mixers get the window tokens ``(B * nW, h * w, C)`` and ``(h, w)`` and no mask
(the official FLatten and Agent blocks ignore it).

State dict: ``stem.*``, ``stages.S.downsample.*``, ``stages.S.blocks.J.{norm1, attn.*, norm2, mlp.*}``,
``norm``, ``head.fc``; :meth:`Swin.filter_checkpoint` maps the official layout (``patch_embed``,
``layers.i``, ``head``) with :data:`SWIN_CHECKPOINT_RULES`.
"""
from functools import partial
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm2d, calculate_drop_path_rates, resize_rel_pos_bias_table, to_2tuple
from timm.models._features_fx import register_notrace_module

from visionattn.layers.mlp import GeluMlp
from visionattn.layers.padding import pad_to_multiple
from visionattn.layers.window_attention import (
    SwinWindowAttention, shift_window_mask, window_partition, window_reverse)
from ._builder import (
    HierarchicalBackbone, Stage, check_host_args, check_img_size, check_state_dict, init_linear_trunc_normal,
    remap_keys, resample_checkpoint_encodings, unwrap_state_dict)
from ._embed import PatchMerging, SwinPatchEmbed

__all__ = ['Swin', 'SwinBlock', 'SwinStem', 'SWIN_CHECKPOINT_RULES']

MixerFactory = Callable[..., nn.Module]


def _next_stage(m) -> str:
    return f'stages.{int(m.group(1)) + 1}.downsample.'


#: official Swin names (FLatten / Agent classification files) -> host names, applied in order
SWIN_CHECKPOINT_RULES = (
    (r'^patch_embed\.', 'stem.'),
    (r'^layers\.(\d+)\.downsample\.', _next_stage),  # patch merging at the end of layer i = start of stage i+1
    (r'^layers\.(\d+)\.blocks\.', r'stages.\1.blocks.'),
    (r'^head\.(weight|bias)$', r'head.fc.\1'),
)
#: persistent buffers of the official files, rebuilt (cached per size) by the host
_OFFICIAL_BUFFERS = ('relative_position_index', 'attn_mask')


class SwinStem(SwinPatchEmbed):
    """:class:`SwinPatchEmbed` (NCHW -> NCHW) that refuses images other than ``img_size`` unless
    ``dynamic_img_size``."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, img_size: Tuple[int, int],
                 dynamic_img_size: bool = False, norm_layer: Callable = nn.LayerNorm, device=None, dtype=None):
        super().__init__(in_chans, embed_dim, patch_size, norm_layer=norm_layer, device=device, dtype=dtype)
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.dynamic_img_size = dynamic_img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic_img_size:
            check_img_size(x, self.img_size)
        return self._norm_nchw(self.proj(pad_to_multiple(x, self.patch_size)))


@register_notrace_module  # FX leaf: window, padding and shift depend on the (symbolic) map size
class SwinBlock(nn.Module):
    """Pre-norm Swin block on an NHWC map ``[B, H, W, C]``: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``.

    Args:
        grid_size: the stage map at the training size.
        window_size: the window; clamped per dimension to ``grid_size``. ``None`` (mixers only): the
            whole map at any size; so is a mixer window covering ``grid_size``.
        shifted: shift by half the (clamped) window where the map is longer than it (odd blocks).
        mixer: ``None`` for :class:`SwinWindowAttention` (relative position bias, shift mask), or a
            factory ``mixer(dim, num_heads, window, device=, dtype=)`` of a module called as
            ``attn(tokens, h, w)`` on ``(B * nW, h * w, C)`` window tokens, without mask.
    """
    own_attention: torch.jit.Final[bool]
    is_global: torch.jit.Final[bool]
    shifted: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            window_size: Optional[int] = 7,
            shifted: bool = False,
            mixer: Optional[MixerFactory] = None,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer: Callable = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        gh, gw = grid_size
        self.own_attention = mixer is None
        if window_size is None and self.own_attention:
            raise ValueError('window_size=None (one window over the whole map) is for mixers; the own attention '
                             'needs a window size for its relative position bias')
        self.is_global = not self.own_attention and (window_size is None or (window_size >= gh and window_size >= gw))
        self.window_size = (gh, gw) if self.is_global else (min(window_size, gh), min(window_size, gw))
        self.shifted = shifted
        self.shift_size = (self.window_size[0] // 2, self.window_size[1] // 2) if shifted else (0, 0)
        self.norm1 = norm_layer(dim, **dd)
        if mixer is None:
            self.attn = SwinWindowAttention(
                dim, num_heads, self.window_size, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        else:
            self.attn = mixer(dim, num_heads, self.window_size, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = GeluMlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.has_drop_path = drop_path > 0.

    def extra_repr(self) -> str:
        if self.is_global:  # attends to the whole map: a shift would not change the result (none is applied)
            return f'window=global, own_attention={self.own_attention}'
        return f'window={self.window_size}, shifted={self.shifted}, own_attention={self.own_attention}'

    def window_and_shift(self, H: int, W: int) -> Tuple[int, int, int, int]:
        """``(wh, ww, sh, sw)``: window and shift of this block on an ``H x W`` map."""
        if self.is_global:
            return H, W, 0, 0
        # branches, not min(): under torch.export a size guard keeps the window a constant
        wh, sh = (H, 0) if H <= self.window_size[0] else (self.window_size[0], self.shift_size[0])
        ww, sw = (W, 0) if W <= self.window_size[1] else (self.window_size[1], self.shift_size[1])
        return wh, ww, sh, sw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        wh, ww, sh, sw = self.window_and_shift(H, W)
        y = window_partition(self.norm1(x), (wh, ww), (sh, sw))
        if self.own_attention:
            mask: Optional[torch.Tensor] = None
            if sh > 0 or sw > 0:
                mask = shift_window_mask(H, W, (wh, ww), (sh, sw), x.device)
            y = self.attn(y, wh, ww, mask)
        else:
            y = self.attn(y, wh, ww)
        x = x + self.drop_path1(window_reverse(y, (wh, ww), (sh, sw), B, H, W))
        if self.training and self.has_drop_path:
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        return self.mlp(self.norm2(x), shortcut=x)  # the residual add in fc2's epilogue at inference


class Swin(HierarchicalBackbone):
    """Swin Transformer with a per-block token mixer (see the module docstring for windows and sizes).

    Args:
        in_chans, num_classes, global_pool, drop_rate, drop_path_rate, device, dtype: timm's model
            arguments (``drop_rate``: classifier dropout; the official block dropout is ``proj_drop_rate``).
        img_size: training input size (int or (H, W)); mixers' learned encodings and the clamped windows
            are sized to its stage maps.
        dynamic_img_size: accept any input size (>= 32); else another size raises a ValueError.
        patch_size: stem stride (4).
        embed_dims, depths, num_heads, mlp_ratios: per stage (``mlp_ratios`` may be one number).
        window_size: window of the host's own attention (official 7; 12 for FLatten-B@384).
        mixer_window_size: window of the mixer blocks (``None``: the whole map at any size).
        mixers: one entry per stage, each a sequence with one entry per block: ``None`` for the own
            attention, or a factory ``factory(dim, num_heads, window, device=, dtype=)`` (see
            :class:`SwinBlock`); ``None`` makes every block the own attention (plain Swin).
        qkv_bias, proj_drop_rate, attn_drop_rate, norm_eps: block settings (LayerNorm eps 1e-5).
    """
    #: parameter names (suffixes) without weight decay: Swin's bias tables and the mixers' encodings / scales
    NO_WEIGHT_DECAY = ('.relative_position_bias_table', '.positional_encoding', '.scale')

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            embed_dims: Sequence[int] = (96, 192, 384, 768),
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            mlp_ratios: Union[float, Sequence[float]] = 4.,
            window_size: int = 7,
            mixer_window_size: Optional[int] = None,
            mixers: Optional[Sequence[Sequence[Optional[MixerFactory]]]] = None,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_eps: float = 1e-5,
            dynamic_img_size: bool = False,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        mlp_ratios = [mlp_ratios] * num_stages if isinstance(mlp_ratios, (int, float)) else list(mlp_ratios)
        mixers = check_host_args(depths, mixers, embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios)
        img_size = to_2tuple(img_size)
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))

        stem = SwinStem(in_chans, embed_dims[0], patch_size, img_size, dynamic_img_size, norm_layer=norm_layer, **dd)
        grid = (-(-img_size[0] // patch_size), -(-img_size[1] // patch_size))
        stages = []
        cur = 0
        for s in range(num_stages):
            if s > 0:
                grid = (-(-grid[0] // 2), -(-grid[1] // 2))  # PatchMerging zero-pads odd sizes
            blocks = [
                SwinBlock(
                    embed_dims[s], num_heads[s], grid,
                    window_size=window_size if mixers[s][j] is None else mixer_window_size,
                    shifted=j % 2 == 1, mixer=mixers[s][j], mlp_ratio=mlp_ratios[s], qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[cur + j],
                    norm_layer=norm_layer, **dd)
                for j in range(depths[s])]
            cur += depths[s]
            downsample = PatchMerging(embed_dims[s - 1], embed_dims[s], norm_layer=norm_layer, **dd) if s > 0 else None
            stages.append(Stage(blocks, out_chs=embed_dims[s], reduction=patch_size * 2 ** s, downsample=downsample,
                                block_fmt='NHWC'))
        super().__init__(
            stem, stages, num_classes=num_classes, in_chans=in_chans, global_pool=global_pool, drop_rate=drop_rate,
            norm=LayerNorm2d(embed_dims[-1], eps=norm_eps, **dd), stem_reduction=patch_size, min_input_size=32, **dd)
        self.img_size = img_size
        self.dynamic_img_size = dynamic_img_size
        self.window_size = window_size
        self.mixer_window_size = mixer_window_size
        # official: Linear trunc_normal(0.02) + zero bias, LayerNorm 1/0, convs PyTorch default; the bias
        # tables (trunc_normal 0.02) and the mixers' own tensors are initialised by their modules
        self.apply(init_linear_trunc_normal)
        self._no_weight_decay = {n for n, _ in self.named_parameters() if n.endswith(self.NO_WEIGHT_DECAY)}

    @torch.jit.ignore
    def filter_checkpoint(self, state_dict: Dict) -> Dict[str, torch.Tensor]:
        """Map an official Swin-host checkpoint (FLatten / Agent layout, any container) or a visionattn one
        onto this model, strictly.

        Drops the official persistent buffers (``relative_position_index``, ``attn_mask``), renames with
        :data:`SWIN_CHECKPOINT_RULES`, resamples what is sized to the training map when this model's
        differs (``img_size=``): mixers' ``positional_encoding`` bilinearly (official windows are
        square), ``relative_position_bias_table`` with timm's ``resize_rel_pos_bias_table``. Missing,
        unexpected or mis-shaped keys raise a ``ValueError``.
        """
        sd = unwrap_state_dict(state_dict)
        sd = {k: v for k, v in sd.items() if k.rsplit('.', 1)[-1] not in _OFFICIAL_BUFFERS}
        sd = resample_checkpoint_encodings(remap_keys(sd, SWIN_CHECKPOINT_RULES), self)
        for name, module in self.named_modules():
            key = f'{name}.relative_position_bias_table'
            if key in sd and isinstance(module, SwinWindowAttention) \
                    and sd[key].shape != module.relative_position_bias_table.shape:
                sd[key] = resize_rel_pos_bias_table(
                    sd[key], module.window_size, tuple(module.relative_position_bias_table.shape))
        return check_state_dict(sd, self, source=f'{type(self).__name__} checkpoint')

