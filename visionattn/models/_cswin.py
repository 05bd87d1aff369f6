"""CSwin host (Dong et al., "CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped
Windows", CVPR 2022, arXiv:2107.00652): the macro-architecture FLatten-CSwin and Agent-CSwin share.

* stem: Conv 7x7/s4 pad 2 -> LayerNorm (official ``stage1_conv_embed``); the stages 2-4 open with a
  merge, Conv 3x3/s2 pad 1 -> LayerNorm (official ``merge{1,2,3}``);
* block (pre-norm, NHWC): ``norm1`` -> one ``qkv`` Linear -> attention branches -> ``proj``, then
  ``norm2`` -> MLP (GELU); the branches get the q / k / v tokens of their windows:

  - a *global* block (the official "last stage": split size == map) has one branch over the whole
    map, full width ``C``, all heads;
  - a *stripe* block has two branches on the channel halves of q / k / v, each ``C / 2`` wide with
    half the heads: vertical stripes (full height x ``split`` columns, ``attns.0``) and horizontal
    stripes (``split`` rows x full width, ``attns.1``);
* final LayerNorm -> global average pool -> Linear.

Layout (shared builder): ``stem``, ``stages.S.downsample`` (S > 0), ``stages.S.blocks.J`` with the
official block keys (``qkv``, ``norm1``, ``proj``, ``attns.{0,1}``, ``mlp.fc1/fc2``, ``norm2``),
``norm``, ``head.fc``; :data:`CSWIN_RULES` map the official keys (``stage1_conv_embed``, ``stage{s}.{j}``,
``merge{i}``, ``head``) onto it and :meth:`CSwin.filter_checkpoint` loads an official file.

Mixers (per block): ``None`` = CSwin's own LePE softmax attention
(:class:`visionattn.layers.CSwinAttention`), or a factory called once per branch as
``factory(dim, num_heads, grid_size, device=..., dtype=...)`` with the branch width, its heads and its
window ``(h, w)`` at the training size (``(H, W)`` of the map for a global block, ``(H, split)`` /
``(split, W)`` for the stripes); the branch module has ``forward(q, k, v, h, w) -> (B', h * w, dim)``
on ``(B', h * w, dim)`` tokens of ``B'`` windows. Mixer blocks take their split from
``mixer_split_sizes``, the others from ``split_sizes`` (official ``la_split_size`` / ``split_size``);
a split of ``None`` makes the block global.

Resolution: ``img_size`` fixes the training maps (the windows given to the factories); global
blocks stay global at any size and stripe blocks keep their stripe width, zero-padding maps that
are not multiples symmetrically and cropping back (as the official segmentation backbone does).
The official splits that equal the stage map at the training size (FLatten / Agent ``56-28-14-7`` at
224, the last stage) are written ``None`` here, so the branch layout does not depend on ``img_size``.
"""
import math
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm2d, calculate_drop_path_rates

from ..layers.cswin_attention import CSwinAttention, stripe_partition, stripe_reverse
from ..layers.fused_linear import fused_linear
from ..layers.mlp import GeluMlp
from ._builder import (
    HierarchicalBackbone, Stage, check_host_args, check_img_size, check_state_dict, init_linear_trunc_normal,
    remap_keys, resample_checkpoint_encodings, unwrap_state_dict)
from ._embed import NormChannelsLast

__all__ = ['CSwin', 'CSwinBlock', 'CSwinConvEmbed', 'CSWIN_RULES']

# official CSwin key -> visionattn key (applied in order; visionattn keys pass through unchanged)
CSWIN_RULES = (
    (r'^stage1_conv_embed\.0\.', 'stem.conv.'),
    (r'^stage1_conv_embed\.2\.', 'stem.norm.'),
    (r'^merge(\d+)\.', r'stages.\1.downsample.'),  # merge{i} opens stage i + 1 = stages.i
    (r'^stage(\d+)\.(\d+)\.', lambda m: f'stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.'),
    (r'^head\.(weight|bias)$', r'head.fc.\1'),
)

# learned per-block parameters excluded from weight decay (FLatten's encoding and focusing scale)
_NO_WEIGHT_DECAY = ('positional_encoding', 'scale')


class CSwinConvEmbed(NormChannelsLast):
    """Conv -> LayerNorm over channels, NCHW in / out: the stem (7x7/s4 pad 2) and the merges (3x3/s2 pad 1).

    With ``img_size`` set (the stem of a fixed-size model), another input size raises a ValueError.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, padding: int,
                 img_size: Optional[Tuple[int, int]] = None, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.img_size = img_size
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, **dd)
        self.norm = nn.LayerNorm(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.img_size is not None:
            check_img_size(x, self.img_size)
        return self._norm_nchw(self.conv(x))


class CSwinBlock(nn.Module):
    """CSwin block on an NHWC map ``(B, H, W, C)``: global (``split_size=None``) or two stripe branches.

    ``mixer``: ``None`` (:class:`CSwinAttention`) or a branch factory (see the module docstring);
    ``grid_size``: the block's map at the training size.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            split_size: Optional[int] = None,
            mixer: Optional[Callable[..., nn.Module]] = None,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if split_size is not None and (dim % 2 or num_heads % 2):
            raise ValueError(
                f'a stripe block (split_size={split_size}) splits dim={dim} and num_heads={num_heads} in halves: '
                f'both must be even')
        self.split_size = split_size
        factory = mixer if mixer is not None else partial(CSwinAttention, attn_drop=attn_drop)
        gh, gw = grid_size
        # module order as the official block: qkv, norm1, proj, attns, mlp, norm2
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        if split_size is None:
            self.attns = nn.ModuleList([factory(dim, num_heads, (gh, gw), **dd)])
        else:
            self.attns = nn.ModuleList([
                factory(dim // 2, num_heads // 2, (gh, split_size), **dd),
                factory(dim // 2, num_heads // 2, (split_size, gw), **dd)])
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.mlp = GeluMlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.norm2 = nn.LayerNorm(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = fused_linear(self.norm1(x), self.qkv.weight, self.qkv.bias)
        split = self.split_size
        if split is None:
            q, k, v = qkv.reshape(B, H * W, 3, C).unbind(2)
            out = self.attns[0](q, k, v, H, W).reshape(B, H, W, C)
        else:
            qkv = qkv.reshape(B, H, W, 3, 2, C // 2)
            outs: List[torch.Tensor] = []
            for i, attn in enumerate(self.attns):
                vertical = i == 0
                h_sp, w_sp = (H, split) if vertical else (split, W)
                q, k, v = stripe_partition(qkv[:, :, :, :, i], split, vertical).unbind(2)
                outs.append(stripe_reverse(attn(q, k, v, h_sp, w_sp), H, W, split, vertical))
            out = torch.cat(outs, dim=-1)
        x = x + self.drop_path(fused_linear(out, self.proj.weight, self.proj.bias))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _stage_grids(img_size: Tuple[int, int], num_stages: int) -> List[Tuple[int, int]]:
    """Map of every stage for an input of ``img_size``: stem 7x7/s4 pad 2, then 3x3/s2 pad 1 per merge."""
    h, w = (img_size[0] - 3) // 4 + 1, (img_size[1] - 3) // 4 + 1
    grids = [(h, w)]
    for _ in range(num_stages - 1):
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        grids.append((h, w))
    return grids


class CSwin(HierarchicalBackbone):
    """CSwin backbone with a per-block choice of attention (see the module docstring).

    Args:
        img_size: training input size (int or (H, W)); fixes the windows given to the mixers.
        dynamic_img_size: accept any input size >= 32 (learned encodings resampled on the fly);
            otherwise another size raises a ValueError.
        in_chans, num_classes, global_pool, drop_rate, drop_path_rate, device, dtype: timm's model args
            (``drop_rate``: dropout before the classifier).
        embed_dims, depths, num_heads, mlp_ratios: per-stage settings.
        split_sizes: stripe width of the blocks with CSwin's own attention, per stage (``None``: global).
        mixer_split_sizes: the same for the mixer blocks (default: the same as ``split_sizes``).
        mixers: per stage, one entry per block: ``None`` or a branch factory; ``None`` for all: plain CSwin.
        qkv_bias: bias of the ``qkv`` Linear.
        proj_drop_rate, attn_drop_rate: dropout in the MLPs (official ``drop_rate``) and on attention weights.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (1, 2, 21, 1),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            mlp_ratios: Sequence[float] = (4, 4, 4, 4),
            split_sizes: Sequence[Optional[int]] = (1, 2, 7, None),
            mixer_split_sizes: Optional[Sequence[Optional[int]]] = None,
            mixers: Optional[Sequence[Sequence[Optional[Callable[..., nn.Module]]]]] = None,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            dynamic_img_size: bool = False,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        mixer_split_sizes = split_sizes if mixer_split_sizes is None else mixer_split_sizes
        mixers = check_host_args(
            depths, mixers, embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios,
            split_sizes=split_sizes, mixer_split_sizes=mixer_split_sizes)
        img_hw = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
        grids = _stage_grids(img_hw, num_stages)
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))  # on CPU: also under a meta-device context

        stem = CSwinConvEmbed(in_chans, embed_dims[0], 7, 4, 2, img_size=None if dynamic_img_size else img_hw, **dd)
        stages = []
        cur = 0
        for s in range(num_stages):
            dim = embed_dims[s]
            blocks = [
                CSwinBlock(
                    dim, num_heads[s], grids[s],
                    split_size=(split_sizes if mixers[s][j] is None else mixer_split_sizes)[s],
                    mixer=mixers[s][j], mlp_ratio=mlp_ratios[s], qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate, drop_path=dpr[cur + j], **dd)
                for j in range(depths[s])]
            cur += depths[s]
            stages.append(Stage(
                blocks, out_chs=dim, reduction=4 * 2 ** s,
                downsample=CSwinConvEmbed(embed_dims[s - 1], dim, 3, 2, 1, **dd) if s > 0 else None,
                block_fmt='NHWC'))
        super().__init__(
            stem, stages, num_classes=num_classes, in_chans=in_chans, global_pool=global_pool,
            drop_rate=drop_rate, norm=LayerNorm2d(embed_dims[-1], eps=1e-5, **dd), stem_reduction=4, **dd)
        self.img_size = img_hw
        self.dynamic_img_size = dynamic_img_size
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self._no_weight_decay = {n for n, _ in self.named_parameters() if n.rsplit('.', 1)[-1] in _NO_WEIGHT_DECAY}
        self.apply(init_linear_trunc_normal)  # official init; mixer parameters keep their own (zeros for FLatten)

    def _file_grid(self, key: str, branch: nn.Module, num_tokens: int) -> Optional[Tuple[int, int]]:
        """The window of a branch encoding of ``num_tokens`` tokens in a file (``key`` names the branch
        ``stages.S.blocks.J.attns.I.positional_encoding``): a square map for a global block (the official
        models are square), else a stripe of the block's width; None when it cannot be one."""
        s, j, i = (int(p) for p in key.split('.')[1:6:2])
        split = self.stages[s].blocks[j].split_size
        if split is None:
            side = math.isqrt(num_tokens)
            return (side, side) if side * side == num_tokens else None
        if num_tokens % split:
            return None
        length = num_tokens // split
        return (length, split) if i == 0 else (split, length)

    def filter_checkpoint(self, state_dict: Dict) -> Dict[str, torch.Tensor]:
        """Map an official CSwin-host checkpoint (any container, or visionattn's layout) onto this model.

        Learned branch encodings (``positional_encoding``) of another training size are resampled
        bilinearly to this model's windows; raises a ``ValueError`` naming missing / unexpected /
        mis-shaped keys.
        """
        sd = remap_keys(unwrap_state_dict(state_dict), CSWIN_RULES)
        sd = resample_checkpoint_encodings(sd, self, file_grid=self._file_grid)
        return check_state_dict(sd, self, source=f'{type(self).__name__} checkpoint')

