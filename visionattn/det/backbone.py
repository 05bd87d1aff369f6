"""``visionattn.Backbone``: any ``visionattn_*`` model as an mmdet 3.x backbone."""
import copy
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import BaseModule
from timm.layers import LayerNorm2d
from torch.nn.modules.batchnorm import _BatchNorm

from .convert import (
    LoadReport, create_classifier, detection_model_kwargs, level_feature_indices, load_checkpoint_file,
    map_to_backbone, plain_level_blocks, prune_for_detection, select_state_dict)
from .families import family_for, split_official_out_norms

__all__ = ['VisionAttnBackbone', 'SimplePyramidLevel']


class SimplePyramidLevel(nn.Sequential):
    """Resample a stride-``in_stride`` map of a plain ViT to ``out_stride`` (Li et al. 2021 /
    BEiT / MAE detection): x4 = ConvT2x2 -> LayerNorm -> GELU -> ConvT2x2, x2 = ConvT2x2,
    x1 = identity, x1/2 = 2x2 max-pool. Channels are kept."""

    def __init__(self, channels: int, in_stride: int, out_stride: int, eps: float = 1e-6):
        if out_stride * 4 == in_stride:
            layers = [nn.ConvTranspose2d(channels, channels, 2, 2), LayerNorm2d(channels, eps=eps), nn.GELU(),
                      nn.ConvTranspose2d(channels, channels, 2, 2)]
        elif out_stride * 2 == in_stride:
            layers = [nn.ConvTranspose2d(channels, channels, 2, 2)]
        elif out_stride == in_stride:
            layers = [nn.Identity()]
        elif out_stride == in_stride * 2:
            layers = [nn.MaxPool2d(2, 2)]
        else:
            raise ValueError(f'simple pyramid: cannot resample stride {in_stride} to {out_stride}')
        super().__init__(*layers)


def _forward_paths(model: nn.Module, targets: Sequence[str]) -> List[str]:
    """Dotted names of ``model``'s children in definition (= forward) order, opening only the
    containers that hold a ``targets`` module (``blocks`` -> ``blocks.0``, ``blocks.1``, ...)."""
    paths = []

    def visit(module, prefix):
        for name, child in module.named_children():
            path = prefix + name
            if any(t.startswith(path + '.') for t in targets):
                visit(child, path + '.')
            else:
                paths.append(path)
    visit(model, '')
    return paths


def _cnn_stage_paths(model: nn.Module, level_modules: Sequence[str]) -> List[List[str]]:
    """Module names of stages 0..L of a CNN for ``frozen_stages``: stage 0 is everything before the
    first level's module (the stem), stage ``k`` what follows level ``k-2``'s module up to and
    including level ``k-1``'s."""
    paths = _forward_paths(model, level_modules)
    ends = [paths.index(m) for m in level_modules]
    cuts = [0, ends[0]] + [e + 1 for e in ends]
    return [paths[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


class VisionAttnBackbone(BaseModule):
    """A visionattn classification model as a multi-scale detection backbone.

    Args:
        model_name: a registered ``visionattn_*`` model (``visionattn.list_models()``).
        out_indices: output levels; level ``l`` has stride ``4 * 2**l`` (the stages of a
            hierarchical model; a CNN's ``feature_info`` taps at strides 4..32; the
            simple-pyramid levels of a plain ViT).
        frozen_stages: -1 freezes nothing; 0 freezes the stem (patch embedding, position
            tables; a CNN's modules before its first level); ``k`` also freezes stages 1..k and
            their output norms (for a plain ViT, the blocks that feed levels 0..k-1; for a CNN,
            its modules up to level ``k-1``'s). Frozen parts have ``requires_grad=False`` and
            stay in eval mode after ``.train()``.
        norm_eval: keep every BatchNorm in eval mode while training.
        with_cp: activation (gradient) checkpointing of the blocks.
        out_norms: add the family's per-output LayerNorms where its official detection backbone
            has them (DaViT, SVT, NAT/DiNAT; simple-pyramid ConViT); ``False`` returns raw stage
            outputs.
        drop_path_rate: stochastic depth of the wrapped model.
        plain_blocks: plain ViTs only: block index feeding each of the 4 levels (default: last
            block of each quarter of the depth).
        pretrained: deprecated, use ``init_cfg=dict(type='Pretrained', checkpoint=...)``.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH, prefix=None, ema=False,
            strict=True)`` loads a classification checkpoint (ours, an export, timm's or the
            official one through the family's ``checkpoint_filter_fn``) or a detector checkpoint
            (``prefix='backbone.'`` or auto-detected). With ``strict`` (default) a backbone key
            missing from the file raises ``ValueError``; what was loaded, dropped and newly
            initialised is logged.
        **model_kwargs: passed to ``timm.create_model`` (e.g. ``depths=...``, ``dilations=...``).
    """

    def __init__(
            self,
            model_name: str,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            frozen_stages: int = -1,
            norm_eval: bool = False,
            with_cp: bool = False,
            out_norms: bool = True,
            drop_path_rate: float = 0.1,
            plain_blocks: Optional[Sequence[int]] = None,
            pretrained: Optional[str] = None,
            init_cfg: Optional[Union[dict, List[dict]]] = None,
            **model_kwargs,
    ):
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('init_cfg and pretrained cannot be specified at the same time')
            warnings.warn('pretrained is deprecated, use init_cfg=dict(type="Pretrained", checkpoint=...)',
                          DeprecationWarning)
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        self.family = family_for(model_name)
        self.model_name = model_name
        kwargs = detection_model_kwargs(model_name, model_kwargs, self.family)
        # architecture kwargs, for building the meta reference model when loading checkpoints
        self._arch_kwargs = {k: v for k, v in kwargs.items() if k not in ('device', 'dtype')}
        model = create_classifier(model_name, drop_path_rate=drop_path_rate, **kwargs)

        info = model.feature_info
        info = info.get_dicts() if hasattr(info, 'get_dicts') else list(info)
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or list(out_indices) != sorted(set(out_indices)):
            raise ValueError(f'out_indices={out_indices}: expected increasing, unique level indices')
        self.plain = self.family.plain
        if self.plain:
            num_levels = 4
            num_blocks = len(model.blocks)
            self.level_blocks = list(plain_blocks) if plain_blocks is not None else plain_level_blocks(num_blocks)
            if len(self.level_blocks) != num_levels or list(self.level_blocks) != sorted(set(self.level_blocks)) \
                    or not 0 <= self.level_blocks[0] or self.level_blocks[-1] >= num_blocks:
                raise ValueError(f'plain_blocks={self.level_blocks}: expected 4 increasing block indices '
                                 f'< {num_blocks}')
        else:
            if plain_blocks is not None:
                raise ValueError(f'plain_blocks is only for plain (isotropic) models, not {model_name}')
            self.level_feats = level_feature_indices(info)
            num_levels = len(self.level_feats)
        if out_indices[0] < 0 or out_indices[-1] >= num_levels:
            raise ValueError(f'out_indices={out_indices}: {model_name} has {num_levels} levels (0..{num_levels - 1})')
        if not -1 <= frozen_stages <= num_levels:
            raise ValueError(f'frozen_stages={frozen_stages}: expected -1..{num_levels}')
        self.out_indices = out_indices
        self.num_levels = num_levels
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp

        # a CNN (no ``stages``): freeze by its modules in forward order, cut at the levels' modules
        self._stage_paths = None if self.plain or hasattr(model, 'stages') else _cnn_stage_paths(
            model, [info[i]['module'] for i in self.level_feats])
        if self.plain:
            self._take = [self.level_blocks[lvl] for lvl in out_indices]
            in_stride = info[self._take[0]]['reduction']
            self.out_channels = [info[b]['num_chs'] for b in self._take]
            self.out_strides = [4 * 2 ** lvl for lvl in out_indices]
            self.pyramid = nn.ModuleDict(OrderedDict(
                (str(lvl), SimplePyramidLevel(c, in_stride, s))
                for lvl, c, s in zip(out_indices, self.out_channels, self.out_strides)))
        else:
            self._take = [self.level_feats[lvl] for lvl in out_indices]
            self.out_channels = [info[i]['num_chs'] for i in self._take]
            self.out_strides = [info[i]['reduction'] for i in self._take]
        self.model = prune_for_detection(model, self._take)
        eps = self.family.out_norm_eps
        self.out_norms = nn.ModuleDict(OrderedDict(
            (str(lvl), LayerNorm2d(c, eps=eps)) for lvl, c in zip(out_indices, self.out_channels)
        ) if out_norms and eps is not None else {})
        if with_cp:
            self.model.set_grad_checkpointing(True)
        self._freeze_stages()

    # ------------------------------------------------------------------ structure
    @property
    def feature_info(self) -> List[Dict]:
        return [dict(num_chs=c, reduction=s, level=lvl)
                for lvl, c, s in zip(self.out_indices, self.out_channels, self.out_strides)]

    def _stage_modules(self, k: int) -> List[nn.Module]:
        """Modules of stage ``k`` (0 = stem) for freezing."""
        m = self.model
        if self._stage_paths is not None:  # a CNN; modules pruned away are skipped
            named = dict(m.named_modules(remove_duplicate=False))
            mods = [named[p] for p in self._stage_paths[k] if p in named]
        elif k == 0:
            body = 'blocks' if self.plain else 'stages'
            return [child for name, child in m.named_children() if name != body]
        elif self.plain:
            first = 0 if k == 1 else self.level_blocks[k - 2] + 1
            last = self.level_blocks[k - 1]
            mods = [m.blocks[i] for i in range(first, min(last + 1, len(m.blocks)))]
        else:
            mods = [m.stages[k - 1]] if k - 1 < len(m.stages) else []
        if str(k - 1) in self.out_norms:
            mods.append(self.out_norms[str(k - 1)])
        return mods

    def _freeze_stages(self):
        if self.frozen_stages < 0:
            return
        for p in self.model._parameters.values():  # position tables, class token
            if p is not None:
                p.requires_grad = False
        for k in range(self.frozen_stages + 1):
            for mod in self._stage_modules(k):
                mod.eval()
                for p in mod.parameters():
                    p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        feats = self.model.forward_intermediates(x, indices=self._take, intermediates_only=True)
        outs = []
        for lvl, f in zip(self.out_indices, feats):
            key = str(lvl)
            if self.plain:
                f = self.pyramid[key](f)
            if key in self.out_norms:
                f = self.out_norms[key](f)
            outs.append(f)
        return tuple(outs)

    # ------------------------------------------------------------------ weights
    def init_weights(self):
        cfgs = self.init_cfg if isinstance(self.init_cfg, list) else ([self.init_cfg] if self.init_cfg else [])
        pretrained = [c for c in cfgs if c.get('type') == 'Pretrained']
        others = [c for c in cfgs if c.get('type') != 'Pretrained']
        if others:
            from mmengine.model.weight_init import initialize
            initialize(self, copy.deepcopy(others))
        for cfg in pretrained:
            cfg = dict(cfg)
            cfg.pop('type')
            self.load_pretrained(**cfg)
        self._is_init = True

    def load_pretrained(self, checkpoint: str, prefix: Optional[str] = None, ema: bool = False,
                        strict: bool = True, map_location: str = 'cpu') -> LoadReport:
        """Load backbone weights from ``checkpoint`` (see the class docstring); returns the report."""
        ckpt = load_checkpoint_file(checkpoint, map_location=map_location)
        cls_sd, det_only, notes = select_state_dict(ckpt, ema=ema, prefix=prefix, source=str(checkpoint))
        cls_sd, det_only = split_official_out_norms(self.family, cls_sd, det_only)  # official detection checkpoints
        own = self.model.state_dict()
        keys = list(own)
        if strict:
            sd, dropped = map_to_backbone(cls_sd, self.model_name, keys, self._arch_kwargs, source=str(checkpoint))
        else:
            try:
                sd, dropped = map_to_backbone(cls_sd, self.model_name, keys, self._arch_kwargs, source=str(checkpoint))
            except ValueError as e:
                print_log(f'non-strict load, keeping the checkpoint keys that match: {e}', logger='current',
                          level=30)
                sd = {k: v for k, v in cls_sd.items() if k in own and v.shape == own[k].shape}
                dropped = [k for k in cls_sd if k not in sd]
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        if strict and (missing or unexpected):  # cannot happen after map_to_backbone; kept as a guard
            raise ValueError(f'{checkpoint}: missing {missing[:8]}, unexpected {unexpected[:8]}')
        det_own = {k: v for k, v in self.state_dict().items() if not k.startswith('model.')}
        det_loaded = {k: v for k, v in det_only.items() if k in det_own and v.shape == det_own[k].shape}
        if det_loaded:
            self.load_state_dict(det_loaded, strict=False)
            notes.append(f'{len(det_loaded)} detection-only tensors from the checkpoint')
        dropped += [k for k in det_only if k not in det_loaded]
        new = [k for k in det_own if k not in det_loaded]
        report = LoadReport(str(checkpoint), list(sd), dropped, new, notes, sum(v.numel() for v in sd.values()))
        print_log(str(report), logger='current')
        self._freeze_stages()
        return report
