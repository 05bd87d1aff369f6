"""Shared builders for every visionattn model.

A family file declares its blocks and variant configs; this module supplies the rest:

* :class:`Stage` -- one stage of a hierarchy: optional downsample (NCHW), blocks (NHWC or
  NCHW, converted once per stage), optional position-encoding generator after the first block,
  optional relative-position module whose tables every block of the stage receives, optional
  norm of the stage output (PVTv2's ``norm{i}``).
* :class:`HierarchicalBackbone` -- stem -> stages -> final norm -> head, implementing timm's
  whole model API once (``forward_features`` returns the unpooled NCHW map).
* :func:`build_visionattn_model` -- ``timm.models.build_model_with_cfg`` with the feature config
  that matches the backbone kind.
* checkpoint helpers used by every family's ``checkpoint_filter_fn``: unwrap containers,
  remap keys with ordered regex rules, and check coverage so a wrong file fails loudly.

The plain (isotropic, class-token) backbone lives in :mod:`visionattn.models._plain`.
"""
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, NormMlpClassifierHead, get_device_dtype
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

from ..layers.focused_linear_attention import resample_grid_tokens
from ..layers.padding import exporting
from ..layers.weight_init import init_trunc_normal_
from ..weights import checkpoint_globals

__all__ = [
    'Stage', 'HierarchicalBackbone', 'build_visionattn_model', 'unwrap_state_dict', 'remap_keys',
    'check_state_dict', 'check_input', 'check_img_size', 'init_linear_trunc_normal', 'parse_attn_types',
    'resample_checkpoint_encodings', 'check_host_args', 'add_residual',
]


def _is_fx_tracing() -> bool:
    """True while torch.fx symbolically traces a model (input checks are skipped then)."""
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()


@torch.jit.ignore
def check_input(x: torch.Tensor, in_chans: int, min_size: int) -> None:
    """Raise a clear error for a wrong input rank, channel count or too small an image."""
    if torch.jit.is_tracing() or _is_fx_tracing():
        return
    if x.ndim != 4:
        raise ValueError(f'input: expected a 4-D NCHW image batch, got a tensor of shape {tuple(x.shape)}')
    if x.shape[1] != in_chans:
        raise ValueError(
            f'input: expected {in_chans} input channels (in_chans={in_chans}), got {x.shape[1]} '
            f'(input shape {tuple(x.shape)})')
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(
            f'input: image of {x.shape[2]}x{x.shape[3]} is smaller than this model\'s minimum input size '
            f'{min_size}x{min_size}')


@torch.jit.ignore
def check_img_size(x: torch.Tensor, img_size: Tuple[int, int]) -> None:
    """Refuse an image of another size than the fixed ``img_size`` of a model whose learned encodings are sized
    to it, naming the fix (skipped while tracing or exporting)."""
    if torch.jit.is_tracing() or _is_fx_tracing() or exporting():
        return
    H, W = x.shape[-2], x.shape[-1]
    if H != img_size[0] or W != img_size[1]:
        raise ValueError(
            f'input: image of {H}x{W} does not match this model\'s input size {img_size[0]}x{img_size[1]} '
            f'(img_size={tuple(img_size)}: its learned position encodings are sized to it); resize the image, or '
            f'create the model with img_size=({H}, {W}) (pretrained encodings are resampled) or dynamic_img_size=True')


def _square_grid(key: str, module: nn.Module, num_tokens: int) -> Optional[Tuple[int, int]]:
    side = int(round(num_tokens ** 0.5))
    return (side, side) if side * side == num_tokens else None


def resample_checkpoint_encodings(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        file_grid: Callable[[str, nn.Module, int], Optional[Tuple[int, int]]] = _square_grid,
        names: Sequence[str] = ('pos_embed', 'positional_encoding'),
) -> Dict[str, torch.Tensor]:
    """Resample a checkpoint's learned ``(1, N, C)`` encodings (keys ending in ``names``) to ``model``.

    An encoding whose token count differs from the model's (a model built with ``img_size=`` another size)
    is read on the grid ``file_grid(key, owner, N)`` (default: a square, as in every official file) and
    resampled bilinearly to the ``grid_size`` of the module that owns it. Encodings that cannot be read
    that way are left for :func:`check_state_dict` to report. A module with a
    ``resize_checkpoint_tensor(name, value)`` method resizes its own tensors (Agent attention's row / column
    biases).
    """
    out = dict(state_dict)
    for key, value in state_dict.items():
        owner_name, _, leaf = key.rpartition('.')
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            continue
        if hasattr(owner, 'resize_checkpoint_tensor'):
            out[key] = owner.resize_checkpoint_tensor(leaf, value)
            continue
        if leaf not in names or value.ndim != 3:
            continue
        want = getattr(owner, leaf, None)
        if not isinstance(want, torch.Tensor) or want.shape == value.shape or want.shape[-1] != value.shape[-1]:
            continue
        grid = file_grid(key, owner, value.shape[1])
        if grid is not None:
            out[key] = resample_grid_tokens(value, grid, owner.grid_size)
    return out


def add_residual(branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``branch + x``; without autograd in place into ``branch`` (a fresh tensor; x + y == y + x exactly), which
    saves allocating and first-touching a new map. With autograd out of place: the branch output is often a view
    of a matmul result, and an in-place op on it costs a full-size gradient copy in backward."""
    return branch + x if torch.is_grad_enabled() else branch.add_(x)


def init_linear_trunc_normal(m: nn.Module) -> None:
    """The common official ViT init (for ``model.apply``): Linear trunc_normal(0.02) + zero bias, LayerNorm 1 / 0."""
    if isinstance(m, nn.Linear):
        init_trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def check_host_args(depths: Sequence[int], mixers: Optional[Sequence[Sequence]] = None,
                    **per_stage: Sequence) -> List[List]:
    """Check a host's per-stage arguments (one entry per stage) and ``mixers`` (one sequence per stage, one
    entry per block); return the mixers as lists (``None``: the host's own attention in every block)."""
    num_stages = len(depths)
    for name, value in per_stage.items():
        if len(value) != num_stages:
            raise ValueError(f'{name}={tuple(value)}: expected one entry per stage (depths={tuple(depths)})')
    mixers = [[None] * d for d in depths] if mixers is None else [list(m) for m in mixers]
    if [len(m) for m in mixers] != list(depths):
        raise ValueError(
            f'mixers: expected one sequence per stage with one entry per block (depths={tuple(depths)}), '
            f'got lengths {[len(m) for m in mixers]}')
    return mixers


def parse_attn_types(attn_types: str, depths: Sequence[int]) -> List[List[bool]]:
    """Expand an official FLatten / Agent ``ATTN_TYPE`` string into one flag per block (True = the mixer).

    The official grammar: one letter per stage, then an optional number ``k``; ``L`` / ``A`` make the stage
    the family's mixer, ``S`` / ``B`` the host's own attention, ``M`` makes the first ``k`` blocks of that
    stage the mixer and the rest the host's own (``'LLSS'``, ``'AAMB2'``: stage 3 = 2 mixer blocks).
    """
    n = len(depths)
    letters, suffix = attn_types[:n], attn_types[n:]
    if len(letters) != n or any(c not in 'LASBM' for c in letters) or not (suffix == '' or suffix.isdigit()) \
            or (('M' in letters) != (suffix != '')):
        raise ValueError(
            f'attn_types={attn_types!r}: expected one letter per stage ({n} stages) from L/A (mixer), '
            f'S/B (host attention) or M (first k blocks mixer), followed by k exactly when M is used')
    flags = []
    for letter, depth in zip(letters, depths):
        if letter == 'M':
            k = int(suffix)
            if k > depth:
                raise ValueError(f'attn_types={attn_types!r}: M{k} asks for {k} mixer blocks in a stage of {depth}')
            flags.append([j < k for j in range(depth)])
        else:
            flags.append([letter in 'LA'] * depth)
    return flags


class Stage(nn.Module):
    """One stage of a hierarchical backbone.

    Input and output are NCHW. ``downsample`` (NCHW -> NCHW) runs first; the blocks then run in
    ``block_fmt`` ('NHWC' or 'NCHW'; the layout conversion happens once per stage, not per block);
    ``pos_block`` (a position-encoding generator, same layout as the blocks) runs after the first
    block when given, as in CPVT/Twins; ``norm`` (same layout as the blocks) normalises the stage
    output, so every feature tap of the stage sees it.
    """

    def __init__(
            self,
            blocks: Sequence[nn.Module],
            out_chs: int,
            reduction: int,
            downsample: Optional[nn.Module] = None,
            pos_block: Optional[nn.Module] = None,
            block_fmt: str = 'NHWC',
            rel_pos: Optional[nn.Module] = None,
            norm: Optional[nn.Module] = None,
    ):
        super().__init__()
        if block_fmt not in ('NHWC', 'NCHW'):
            raise ValueError(f"block_fmt={block_fmt!r}: expected 'NHWC' or 'NCHW'")
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.ModuleList(blocks)
        if pos_block is not None:
            self.pos_block = pos_block
        if rel_pos is not None:
            self.rel_pos = rel_pos
        self.norm = norm if norm is not None else nn.Identity()
        self.channels_last_blocks = block_fmt == 'NHWC'
        self.out_chs = out_chs
        self.reduction = reduction
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.channels_last_blocks:
            x = x.permute(0, 2, 3, 1)
        if hasattr(self, 'rel_pos'):  # blocks taking (x, tables): a loop of its own, as TorchScript needs fixed arity
            rel_pos = self.rel_pos(x)
            for block in self.blocks:
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(block, x, rel_pos)
                else:
                    x = block(x, rel_pos)
            return self._to_nchw(x)
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x)
            else:
                x = block(x)
            if i == 0 and hasattr(self, 'pos_block'):
                x = self.pos_block(x)
        return self._to_nchw(x)

    def _to_nchw(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.channels_last_blocks:
            x = x.permute(0, 3, 1, 2)
        return x.contiguous()


class HierarchicalBackbone(nn.Module):
    """stem -> stages -> norm -> head, with timm's model API.

    Family classes build their ``stem`` (NCHW -> NCHW) and :class:`Stage` list and pass them here.
    ``norm`` is an optional final norm on the last NCHW map (part of ``forward_features``); it may
    change the channel count (a pre-head projection, as PPMA's), given then as ``num_features``;
    ``head_norm_layer`` selects a pool-then-norm head (timm ``NormMlpClassifierHead``, as DaViT).
    """

    def __init__(
            self,
            stem: nn.Module,
            stages: Sequence[Stage],
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            norm: Optional[nn.Module] = None,
            head_norm_layer: Optional[Callable] = None,
            stem_reduction: int = 4,
            min_input_size: int = 32,
            no_weight_decay_keys: Iterable[str] = (),
            num_features: Optional[int] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.min_input_size = min_input_size
        self.grad_checkpointing = False
        self._no_weight_decay = set(no_weight_decay_keys)

        self.stem = stem
        self.stages = nn.Sequential(*stages)
        self.norm = norm if norm is not None else nn.Identity()
        self.num_features = self.head_hidden_size = num_features or stages[-1].out_chs
        self.feature_info = [
            dict(num_chs=s.out_chs, reduction=s.reduction, module=f'stages.{i}') for i, s in enumerate(stages)]
        if head_norm_layer is not None:
            self.head = NormMlpClassifierHead(
                self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                norm_layer=head_norm_layer, **dd)
        else:
            self.head = ClassifierHead(
                self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set(self._no_weight_decay)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.(?:blocks|pos_block)\.?(\d+)?', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        # device/dtype from the model: a head without classifier has no parameter timm could take them from
        self.head.reset(num_classes, global_pool, **get_device_dtype(self))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward returning the NCHW output of the stages selected by ``indices``.

        ``norm=True`` applies the final norm to the last stage's intermediate.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt={output_fmt!r}: only 'NCHW' is supported")
        check_input(x, self.in_chans, self.min_input_size)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]

        x = self.stem(x)
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and optionally norm/head) not needed for ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled NCHW features of the last stage (after the final norm when the model has one)."""
        check_input(x, self.in_chans, self.min_input_size)
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_visionattn_model(
        model_cls: Callable,
        variant: str,
        pretrained: bool,
        checkpoint_filter_fn: Callable,
        plain: bool = False,
        feature_cfg: Optional[Dict] = None,
        **kwargs,
):
    """``build_model_with_cfg`` with the feature config of a hierarchical or plain backbone.

    Hierarchical backbones expose their stages to ``features_only`` via ``FeatureListNet``
    (stem/stages are top-level children in forward order); plain backbones use
    ``forward_intermediates`` (``feature_cls='getter'``); ``feature_cfg`` replaces both. Pretrained
    files (downloaded or ``pretrained_cfg_overlay=dict(file=...)``) are read by timm with
    ``weights_only=True`` under :func:`visionattn.weights.checkpoint_globals`.
    """
    if feature_cfg is None and plain:
        feature_cfg = dict(feature_cls='getter', out_indices=kwargs.pop('out_indices', 3))
    elif feature_cfg is None:
        feature_cfg = dict(flatten_sequential=True, out_indices=kwargs.pop('out_indices', (0, 1, 2, 3)))
    with checkpoint_globals():
        return build_model_with_cfg(
            model_cls, variant, pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=feature_cfg,
            **kwargs,
        )


_CONTAINER_KEYS = ('state_dict', 'model', 'models', 'module', 'model_state', 'state_dict_ema', 'model_ema')


def unwrap_state_dict(checkpoint: Dict) -> Dict[str, torch.Tensor]:
    """Return the tensor dict inside a checkpoint container.

    Accepts a raw state dict or one nested under one of ``_CONTAINER_KEYS`` (the first present
    wins, in that order), and strips ``module.`` / ``_orig_mod.`` prefixes
    (DDP / torch.compile wrappers).
    """
    sd = checkpoint
    while isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = next((sd[k] for k in _CONTAINER_KEYS if isinstance(sd.get(k), dict)), None)
        if inner is None:
            raise ValueError(
                f'checkpoint: found no tensors and none of the container keys {_CONTAINER_KEYS}; '
                f'top-level keys are {sorted(sd)[:10]}')
        sd = inner
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ('module.', '_orig_mod.'):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def remap_keys(state_dict: Dict[str, torch.Tensor], rules: Sequence[Tuple[str, str]]) -> Dict[str, torch.Tensor]:
    """Rename every key by applying the ordered regex ``(pattern, replacement)`` rules in turn."""
    compiled = [(re.compile(p), r) for p, r in rules]
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in compiled:
            k = pattern.sub(repl, k)
        out[k] = v
    return out


def check_state_dict(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        source: str = 'checkpoint',
        ignore_shape: Sequence[str] = (),
) -> Dict[str, torch.Tensor]:
    """Raise a clear error when ``state_dict`` does not cover ``model`` exactly.

    Classifier weights may differ in shape (timm replaces a mismatched classifier), the first conv
    may differ in input channels (timm adapts it to ``in_chans``) and keys in ``ignore_shape`` may
    differ in shape (resized by the caller); every other key must exist on both sides with equal
    shapes. This keeps loading strict even where timm relaxes ``strict`` for a
    new class count.
    """
    model_sd = model.state_dict()
    classifier = getattr(model, 'pretrained_cfg', {}).get('classifier', 'head')
    classifier = classifier if isinstance(classifier, (list, tuple)) else (classifier,)

    def is_classifier(key):
        return any(key.startswith(c + '.') for c in classifier)

    missing = [k for k in model_sd if k not in state_dict and not is_classifier(k)]
    unexpected = [k for k in state_dict if k not in model_sd and not is_classifier(k)]
    # timm adapts the first conv to ``in_chans`` after the filter, so only its input channels may differ.
    first_conv = getattr(model, 'pretrained_cfg', {}).get('first_conv', '') + '.weight'

    def shapes_ok(key, shape):
        want = model_sd[key].shape
        if key == first_conv and len(shape) == len(want):
            return shape[0] == want[0] and shape[2:] == want[2:]
        return shape == want

    mismatched = [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_sd[k].shape)}'
        for k, v in state_dict.items()
        if k in model_sd and not shapes_ok(k, v.shape) and not is_classifier(k) and k not in ignore_shape]
    if missing or unexpected or mismatched:
        def show(keys):
            return ', '.join(keys[:8]) + (f' ... (+{len(keys) - 8} more)' if len(keys) > 8 else '')
        parts = []
        if missing:
            parts.append(f'{len(missing)} missing keys: {show(missing)}')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected keys: {show(unexpected)}')
        if mismatched:
            parts.append(f'{len(mismatched)} shape mismatches: {show(mismatched)}')
        raise ValueError(f'{source} does not match {type(model).__name__}: ' + '; '.join(parts))
    return state_dict
