"""Backbone weights for dense prediction: build, prune, load and convert (no mmdet import here).

Used by :class:`visionattn.det.VisionAttnBackbone` (``init_cfg=dict(type='Pretrained', ...)``)
and by ``tools/export.py``. A checkpoint may be

* a ``tools/train.py`` checkpoint (``{'arch', 'state_dict', 'state_dict_ema', ...}``),
* an official or timm classification checkpoint in any container the family's
  ``checkpoint_filter_fn`` accepts (raw, ``model``, ``state_dict``, ``module.`` prefixes),
* a visionattn export (safetensors with classification keys, or the mmdet ``.pth``
  ``{'state_dict': {'backbone.model.<key>': ...}}``),
* an mmdet detector checkpoint whose backbone is a ``visionattn.Backbone`` (``backbone.`` keys).

Every path goes through the family's ``checkpoint_filter_fn`` against a full classification model
built on the ``meta`` device, so official layouts are remapped and a wrong architecture fails
with the filter's message; keys the detection backbone does not use (classifier, final/head
norm) are reported and dropped, and a backbone key the checkpoint does not provide is an error.
"""
import importlib
import os
import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from visionattn.weights import load_weights

from .families import DetFamily, family_for, split_official_out_norms

__all__ = [
    'DET_ONLY_PREFIXES', 'create_classifier', 'detection_model_kwargs', 'prune_for_detection',
    'stage_depths', 'plain_level_blocks', 'level_feature_indices', 'load_checkpoint_file', 'select_state_dict',
    'map_checkpoint', 'map_to_backbone', 'classifier_prefixes', 'export_state_dict', 'coverage_report', 'LoadReport',
]

# keys of the detection wrapper that do not exist in a classifier (created by the wrapper)
DET_ONLY_PREFIXES = ('out_norms.', 'pyramid.')
# prefix of the wrapped classification model inside the detection wrapper
WRAPPED_PREFIX = 'model.'


def _visionattn():
    import visionattn  # noqa: F401  (registers every model in timm)
    return visionattn


def create_classifier(model_name: str, meta: bool = False, **kwargs) -> nn.Module:
    """The classification model without classifier (``num_classes=0``), optionally on ``meta``."""
    va = _visionattn()
    importlib.import_module(family_for(model_name).module)  # registers families not imported by default
    kwargs = dict(kwargs)
    kwargs.setdefault('num_classes', 0)
    kwargs['pretrained'] = False
    if meta:
        # visionattn models take device=/dtype= (timm's convention); the model code may still
        # compute on CPU (e.g. drop-path schedules), so a torch.device('meta') context is not used
        try:
            return va.create_model(model_name, device='meta', **kwargs)
        except TypeError:
            pass
    return va.create_model(model_name, **kwargs)


def stage_depths(model: nn.Module) -> List[int]:
    """Blocks per stage of a hierarchical visionattn model."""
    if not hasattr(model, 'stages'):
        raise ValueError(f'{type(model).__name__} has no stages (not a hierarchical backbone)')
    return [len(s.blocks) for s in model.stages]


def detection_model_kwargs(model_name: str, user_kwargs: Optional[Dict] = None,
                           family: Optional[DetFamily] = None) -> Dict:
    """Model kwargs for detection: the family's fixed kwargs, then its detection-only kwargs
    (e.g. DiNAT dilations, computed from the model's real depths), then the user's."""
    family = family or family_for(model_name)
    user_kwargs = dict(user_kwargs or {})
    kwargs = dict(family.model_kwargs)
    if family.det_kwargs is not None:
        # depths as built with the user's architecture overrides (e.g. depths=...)
        arch = {k: v for k, v in user_kwargs.items() if k not in ('drop_path_rate', 'drop_rate')}
        probe = create_classifier(model_name, meta=True, **dict(kwargs, **arch))
        det = family.det_kwargs(model_name, stage_depths(probe))
        kwargs.update({k: v for k, v in det.items() if k not in user_kwargs})
    kwargs.update(user_kwargs)
    return kwargs


def plain_level_blocks(num_blocks: int, num_levels: int = 4) -> List[int]:
    """Blocks feeding pyramid levels 0..3 of a plain model: the last block of each quarter."""
    return [(lvl + 1) * num_blocks // num_levels - 1 for lvl in range(num_levels)]


def level_feature_indices(feature_info: Sequence[Dict]) -> List[int]:
    """``feature_info`` indices of a hierarchical model's levels 0..3 (strides 4..32): its stages,
    or a CNN's taps after the stride-2 stem tap (skipped)."""
    return [i for i, f in enumerate(feature_info) if f['reduction'] >= 4]


def prune_for_detection(model: nn.Module, take_indices: Sequence[int]) -> nn.Module:
    """Drop what dense prediction never runs: stages/blocks after the last output, the final norm
    and the whole classification head (a pool-then-norm head keeps its norm otherwise)."""
    model.prune_intermediate_layers(list(take_indices), prune_norm=True, prune_head=True)
    for name in ('head', 'fc_norm', 'head_drop'):
        if isinstance(getattr(model, name, None), nn.Module):
            setattr(model, name, nn.Identity())
    return model


def load_checkpoint_file(path: str, map_location='cpu') -> Dict:
    """Read a local file with :func:`visionattn.weights.load_weights` (``weights_only=True`` or safetensors,
    always); http(s) URLs are fetched by ``torch.hub`` (also ``weights_only=True``)."""
    if isinstance(path, (str, os.PathLike)) and re.match(r'^https?://', str(path)):
        return torch.hub.load_state_dict_from_url(str(path), map_location=map_location, weights_only=True)
    if isinstance(path, (str, os.PathLike)) and re.match(r'^[a-z][a-z0-9+.-]*://', str(path)):
        raise ValueError(f'checkpoint {path!r}: only local files and http(s) URLs are supported')
    return load_weights(path, 'checkpoint', map_location=map_location)


def _split_prefix(sd: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return OrderedDict((k[len(prefix):], v) for k, v in sd.items() if k.startswith(prefix))


def select_state_dict(
        checkpoint: Dict,
        ema: bool = False,
        prefix: Optional[str] = None,
        source: str = 'checkpoint',
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], List[str]]:
    """Pick the tensors of one model out of a checkpoint.

    Returns ``(classification_sd, det_only_sd, notes)``: ``classification_sd`` in the layout the
    file uses (official, timm or visionattn), ``det_only_sd`` the wrapper's own layers
    (``out_norms.*``, ``pyramid.*``) when the file is a detection checkpoint.
    """
    from visionattn.models._builder import unwrap_state_dict
    notes = []
    if not isinstance(checkpoint, dict):
        raise ValueError(f'{source}: expected a dict checkpoint, got {type(checkpoint).__name__}')
    if ema:
        for key in ('state_dict_ema', 'model_ema', 'ema_state_dict'):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                notes.append(f'EMA weights ({key!r})')
                break
        else:
            raise ValueError(
                f'{source}: EMA weights requested but the checkpoint has none (top-level keys: '
                f'{sorted(k for k in checkpoint if isinstance(k, str))[:10]})')
    else:
        for plain, ema_key in (('state_dict', 'state_dict_ema'), ('models', 'model_ema'), ('model', 'model_ema')):
            if isinstance(checkpoint.get(plain), dict) and ema_key in checkpoint:
                notes.append(f"non-EMA weights ({plain!r}; pass ema=True / --ema for {ema_key!r})")
                break
    sd = unwrap_state_dict(checkpoint)
    if prefix:
        selected = _split_prefix(sd, prefix)
        if not selected:
            raise ValueError(f'{source}: no key starts with prefix {prefix!r} (first keys: {list(sd)[:5]})')
        sd = selected
        notes.append(f'keys under {prefix!r}')
    elif any(k.startswith('backbone.') for k in sd):
        sd = _split_prefix(sd, 'backbone.')
        notes.append("keys under 'backbone.' (detector checkpoint / mmdet export)")
    det_only = OrderedDict((k, v) for k, v in sd.items() if k.startswith(DET_ONLY_PREFIXES))
    cls_sd = OrderedDict((k, v) for k, v in sd.items() if not k.startswith(DET_ONLY_PREFIXES))
    if cls_sd and all(k.startswith(WRAPPED_PREFIX) for k in cls_sd):
        cls_sd = _split_prefix(cls_sd, WRAPPED_PREFIX)
    return cls_sd, det_only, notes


class LoadReport:
    """What a checkpoint provided for a detection backbone."""

    def __init__(self, source: str, loaded: List[str], dropped: List[str], new: List[str],
                 notes: List[str], num_params: int):
        self.source = source
        self.loaded = loaded
        self.dropped = dropped
        self.new = new
        self.notes = notes
        self.num_params = num_params

    def __str__(self) -> str:
        lines = [f'{self.source}: loaded {len(self.loaded)} backbone tensors ({self.num_params:,} values)'
                 + (f' [{"; ".join(self.notes)}]' if self.notes else '')]
        if self.dropped:
            lines.append(f'  {getattr(self, "dropped_label", "not used by the detection backbone")} ({len(self.dropped)}): '
                         + _summarise(self.dropped))
        if getattr(self, 'extra', None):
            lines.append(f'  kept for classification only (safetensors; not in the mmdet file) ({len(self.extra)}): '
                         + _summarise(self.extra))
        if self.new:
            lines.append(f'  detection-only layers left at their initialisation ({len(self.new)}): '
                         + _summarise(self.new))
        return '\n'.join(lines)


def _summarise(keys: Iterable[str], depth: int = 2, limit: int = 8) -> str:
    groups = OrderedDict()
    for k in keys:
        g = '.'.join(k.split('.')[:depth])
        groups[g] = groups.get(g, 0) + 1
    items = [f'{g}.* ({n})' if n > 1 else g for g, n in groups.items()]
    return ', '.join(items[:limit]) + (f' ... (+{len(items) - limit} more groups)' if len(items) > limit else '')


def _pad_unused(sd: Dict[str, torch.Tensor], reference: nn.Module, needed: Iterable[str]) -> Dict[str, torch.Tensor]:
    """Add zero tensors for classifier-side keys the detection backbone never uses (final norm,
    head norm) so that a backbone-only file (an export) passes the family's strict filter.
    Backbone keys are never padded: a missing one stays an error."""
    needed = set(needed)
    out = OrderedDict(sd)
    for k, v in reference.state_dict().items():
        if k not in out and k not in needed:
            out[k] = torch.zeros(v.shape, dtype=v.dtype)
    return out


def map_checkpoint(
        cls_sd: Dict[str, torch.Tensor],
        model_name: str,
        backbone_keys: Sequence[str],
        model_kwargs: Optional[Dict] = None,
        source: str = 'checkpoint',
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], nn.Module]:
    """Run the family's ``checkpoint_filter_fn`` (against a ``meta`` classification model).

    Returns ``(backbone_sd, file_sd, reference)``: the backbone's keys, and every tensor the file
    provides in visionattn's layout. A full classification checkpoint (official, timm, ours) is
    filtered as is; a backbone-only file (an export: no final / head norm) is first padded with
    zeros for those unused keys so the strict filter accepts it -- backbone keys are never padded.
    Raises ``ValueError`` naming the problem for another architecture or a missing backbone key.
    """
    family = family_for(model_name)
    try:
        module = importlib.import_module(family.module)
    except ImportError as e:
        raise ValueError(f'{model_name}: family module {family.module} cannot be imported: {e}') from e
    filter_fn = getattr(module, 'checkpoint_filter_fn', None)
    if filter_fn is None:
        raise ValueError(f'{family.module} defines no checkpoint_filter_fn')
    arch = {k: v for k, v in (model_kwargs or {}).items() if k not in ('drop_path_rate', 'drop_rate')}
    reference = create_classifier(model_name, meta=True, **arch)
    padded_keys = set()
    try:
        mapped = filter_fn(OrderedDict(cls_sd), reference)
    except Exception:
        padded = _pad_unused(cls_sd, reference, backbone_keys)
        padded_keys = set(padded) - set(cls_sd)
        try:
            mapped = filter_fn(padded, reference)
        except Exception as e:
            raise ValueError(f'{source} cannot be loaded into {model_name}: {e}') from e
    missing = [k for k in backbone_keys if k not in mapped]
    if missing:
        raise ValueError(
            f'{source} does not provide {len(missing)} backbone keys of {model_name}: '
            + ', '.join(missing[:8]) + (f' ... (+{len(missing) - 8} more)' if len(missing) > 8 else ''))
    backbone_sd = OrderedDict((k, mapped[k]) for k in backbone_keys)
    file_sd = OrderedDict((k, v) for k, v in mapped.items() if k not in padded_keys)
    return backbone_sd, file_sd, reference


def map_to_backbone(
        cls_sd: Dict[str, torch.Tensor],
        model_name: str,
        backbone_keys: Sequence[str],
        model_kwargs: Optional[Dict] = None,
        source: str = 'checkpoint',
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """:func:`map_checkpoint` -> ``(backbone_sd, keys of the file the backbone does not use)``."""
    backbone_sd, file_sd, _ = map_checkpoint(cls_sd, model_name, backbone_keys, model_kwargs, source)
    return backbone_sd, [k for k in file_sd if k not in backbone_sd]


def classifier_prefixes(model: nn.Module) -> Tuple[str, ...]:
    """``pretrained_cfg['classifier']`` of ``model`` as key prefixes (``('head.fc.',)``)."""
    cls = getattr(model, 'pretrained_cfg', {}).get('classifier', 'head')
    cls = cls if isinstance(cls, (list, tuple)) else (cls,)
    return tuple(c + '.' for c in cls)


def backbone_model(model_name: str, levels: Sequence[int] = (0, 1, 2, 3), meta: bool = False,
                   model_kwargs: Optional[Dict] = None) -> Tuple[nn.Module, List[int]]:
    """The pruned classification model a detection backbone wraps, and its take indices."""
    family = family_for(model_name)
    model = create_classifier(model_name, meta=meta, **detection_model_kwargs(model_name, model_kwargs, family))
    if family.plain:
        blocks = plain_level_blocks(len(model.blocks))
        take = [blocks[lvl] for lvl in levels]
    else:
        feats = level_feature_indices(model.feature_info)
        take = [feats[lvl] for lvl in levels]
    return prune_for_detection(model, take), take


def export_state_dict(
        checkpoint: Dict,
        model_name: str,
        ema: bool = False,
        model_kwargs: Optional[Dict] = None,
        source: str = 'checkpoint',
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], 'LoadReport', nn.Module]:
    """Weights of ``checkpoint`` for export, in visionattn's classification layout.

    Returns ``(classifier_free_sd, backbone_sd, report, backbone_model)``: every tensor of the
    classification model except the classifier (final / head norm kept, so timm can load it with
    ``num_classes=0``), and exactly the keys the detection backbone uses (what the mmdet file holds).
    """
    cls_sd, det_only, notes = select_state_dict(checkpoint, ema=ema, source=source)
    cls_sd, det_only = split_official_out_norms(family_for(model_name), cls_sd, det_only)
    model, _ = backbone_model(model_name, meta=True, model_kwargs=model_kwargs)
    keys = list(model.state_dict())
    backbone_sd, file_sd, reference = map_checkpoint(cls_sd, model_name, keys, model_kwargs, source)
    drop = classifier_prefixes(reference)
    full = OrderedDict((k, v.detach().clone().contiguous()) for k, v in file_sd.items() if not k.startswith(drop))
    backbone_sd = OrderedDict((k, full[k]) for k in backbone_sd)
    dropped = [k for k in file_sd if k.startswith(drop)]
    if det_only:
        notes.append(f'{len(det_only)} detection-only tensors (out_norms/pyramid) not exported')
    report = LoadReport(source, list(backbone_sd), dropped, [], notes, sum(v.numel() for v in backbone_sd.values()))
    report.extra = [k for k in full if k not in backbone_sd]
    report.dropped_label = 'dropped (classifier)'
    return full, backbone_sd, report, model


def coverage_report(sd: Dict[str, torch.Tensor], model: nn.Module) -> str:
    """Per top-level group: tensors and values exported vs what the backbone has."""
    model_sd = model.state_dict()
    rows = OrderedDict()
    for k, v in model_sd.items():
        g = '.'.join(k.split('.')[:2]) if k.startswith(('stages.', 'blocks.')) else k.split('.')[0]
        r = rows.setdefault(g, [0, 0, 0, 0])
        r[0] += 1
        r[1] += v.numel()
        if k in sd and tuple(sd[k].shape) == tuple(v.shape):
            r[2] += 1
            r[3] += v.numel()
    width = max([len(g) for g in rows] + [5])
    lines = [f'{"group":<{width}}  tensors        values']
    for g, (n, p, n_ok, p_ok) in rows.items():
        lines.append(f'{g:<{width}}  {n_ok:>3}/{n:<3}  {p_ok:>12,}/{p:,}')
    tot = [sum(r[i] for r in rows.values()) for i in range(4)]
    lines.append(f'{"total":<{width}}  {tot[2]:>3}/{tot[0]:<3}  {tot[3]:>12,}/{tot[1]:,}'
                 f'  ({100.0 * tot[3] / max(tot[1], 1):.1f}% of backbone values)')
    return '\n'.join(lines)
