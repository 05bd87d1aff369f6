"""Per-family dense-prediction details, one entry per family (no mmdet import here).

Adding a family to detection is one line in :data:`DET_FAMILIES`: the model-name prefix, the
module holding its ``checkpoint_filter_fn``, and what the official detection backbone adds on top
of the classifier (a family without a line still works with a generic recipe, with a warning). Everything else (stage outputs, ``frozen_stages``, grad checkpointing,
checkpoint loading) comes from the shared timm API of every visionattn model.

Where the fields come from (``../shared/specs``):

* DaViT (flatten_agent_convit_davit_twins.md §5.6): the official mmdet backbone adds one new
  ``LayerNorm`` per stage output (``norm{i}``, ``nn.LayerNorm`` default eps 1e-5).
* Twins (§6.5): SVT uses ``extra_norm=True`` -- a new ``LayerNorm(eps=1e-6)`` per output;
  PCPVT has no output norms.
* ConViT (§4.5): no official detection backbone. It is a plain ViT (every block at stride 16), so
  the wrapper adds the simple-pyramid adaptor of Li et al. 2021 ("Benchmarking Detection Transfer
  Learning with Vision Transformers", as in BEiT/MAE detection): outputs taken after blocks
  ``depth/4 * (l+1) - 1`` for levels l = 0..3 and resampled x4 (two stride-2 transposed convs
  with LayerNorm + GELU between), x2 (one transposed conv), x1, x1/2 (max-pool) to strides
  4/8/16/32. With ``out_norms=True`` a new LayerNorm (eps 1e-6, the model's norm eps) follows
  each level, as ViTDet's simple pyramid normalises its outputs. The absolute position embedding
  is interpolated to the input size (``dynamic_img_size=True``); GPSA's relative indices are
  recomputed per size.
* NAT-iso / DiNAT-iso / ViT-rpb (isotropic NAT models): plain, simple pyramid as ConViT, LayerNorm
  eps 1e-5 outputs; no official detection recipe.
* NAT / DiNAT (biformer_nat_ppma.md §2.6): outputs are the pre-downsample features of each level
  (visionattn's stage outputs already are: the downsample opens the next stage) with a new
  ``LayerNorm`` (eps 1e-5) ``norm{i}`` per output. DiNAT detection uses larger dilations than
  classification (official ``configs/dinat/*``): stage 1 ``[1, 28, 1]``, stage 2
  ``[1, 7, 1, 14]``, stage 3 ``[1, 3, 1, 5, 1, 7]`` repeated, stage 4 ``[1, 3]`` repeated, cut
  to each stage's depth; DiNAT_s (``configs/dinat_s/*``) ``[1, 28]``, ``[1, 14]``, the same stage 3,
  ``[1, 3]``, with a LayerNorm per output as the Swin-style detection backbones.
* CBAM / Triplet / ELA CNNs (timm ``ResNet`` / MobileNetV2 ``EfficientNet``): levels are the
  ``feature_info`` taps at strides 4..32 (ResNet ``layer1..4``; MobileNetV2 ``blocks.1/2/4/6``,
  24/32/96/320 channels), the stride-2 stem tap is skipped; ``frozen_stages`` cuts the modules in
  forward order after each level's module; BatchNorm (``norm_eval``), no output norms, as mmdet's ResNet.
* PPMA (biformer_nat_ppma.md §3.5): outputs are the pre-downsample features of each stage (visionattn's
  stage outputs: the downsample opens the next stage) with a new ``LayerNorm`` (eps 1e-5) ``outnorm{i}``
  per output; the official backbone has no ``frozen_stages`` / ``norm_eval`` (the shared wrapper adds
  both); no decay on the per-head path parameters ``dt_bias`` / ``A_log``.
* FLatten (flatten_agent_convit_davit_twins.md §2.6): no official detection code. The hosts are used as
  the PVT / Swin detection backbones are: the four pre-downsample stage outputs; a new LayerNorm
  (eps 1e-5) per output for the Swin / CSwin hosts, as Swin's detection backbone; none for PVT (PVTv2
  already normalises each stage with ``norm{i}``). Learned encodings are interpolated to the input
  (``dynamic_img_size=True``); no decay on them and on the focusing ``scale``.
* Agent attention (flatten_agent_convit_davit_twins.md §3.6; official mmdet ``AgentSwinTransformer`` /
  ``AgentPVT``, configs ``configs/agent_{swin,pvt}/*``): both run the agent blocks over the whole map at any
  size (``dynamic_img_size=True``: agent row / column biases and PVT's ``pos_embed{i}`` resampled bilinearly
  to the map) and pool the larger agent grids of the official dense-task configs (``agent_shapes=``, the
  official ``downstream_agent_shapes``): Swin ``9-12-14-7`` -> (9, 9), (12, 12), (14, 14), (7, 7) (the last is
  a Swin-window ``B`` stage, its entry unused); PVT ``12-16-28-28`` -> (12, 12), (16, 16), (28, 28), (28, 28).
  Agent-Swin: the pre-downsample stage outputs with a new ``LayerNorm`` (eps 1e-5) ``norm{i}`` per output;
  no decay on ``relative_position_bias_table`` and the six agent biases (``an_bias`` ... ``wa_bias``), as the
  official optimiser's ``custom_keys`` (its ``'norm'`` key is ``norm_decay_mult=0``). Agent-PVT: the four raw
  stage maps (no output norms, the classifier has no final norm); the official optimiser decays every
  parameter (AdamW wd 1e-4, no ``paramwise_cfg``), so nothing is listed.
* BiFormer (biformer_nat_ppma.md §1.5; official ``object_detection/models_mm/biformer_mm.py`` ``BiFormer_mm``,
  configs ``configs/coco/{maskrcnn,retinanet}.1x.biformer_{small,base}.py``): the four stage outputs (each
  stage's downsample and blocks, visionattn's stages) with a new timm ``LayerNorm2d`` (eps 1e-6) per output, the
  official ``extra_norms.{i}``; ``n_win=16`` (classification: 7) and ``auto_pad=True``, as every official
  detection config. The official backbone keeps its BatchNorms (stem, downsamplers) in eval mode
  (``norm_eval=True`` by default; here the wrapper's ``norm_eval``, set by the configs) and has no
  ``frozen_stages`` (the wrapper adds it). No position tables, so nothing in ``no_decay`` (the official Mask
  R-CNN optimiser's ``'norm'`` key matches the LayerNorms only; its configs say how). T / S / B only: the STL
  variants have no official detection backbone and get the generic recipe.
"""
import functools
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ['DetFamily', 'DET_FAMILIES', 'family_for', 'dinat_detection_dilations', 'split_official_out_norms']


def _repeat(pattern: Sequence[int], n: int) -> List[int]:
    return [pattern[i % len(pattern)] for i in range(n)]


# official COCO dilation patterns per stage, repeated and cut to each stage's depth
DINAT_DET_PATTERNS = ([1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7], [1, 3])      # configs/dinat/*
DINAT_S_DET_PATTERNS = ([1, 28], [1, 14], [1, 3, 1, 5, 1, 7], [1, 3])             # configs/dinat_s/*


def dinat_detection_dilations(depths: Sequence[int], patterns=DINAT_DET_PATTERNS) -> List[List[int]]:
    """DiNAT's COCO dilations (official ``configs/dinat/mask_rcnn_dinat_*_3x_coco.py``).

    mini ``[3, 4, 6, 5]`` -> ``[[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7], [1, 3, 1, 3, 1]]``;
    tiny/small/base ``[3, 4, 18, 5]`` repeat the stage-3 pattern three times. DiNAT_s
    (``configs/dinat_s/*``, depths ``[2, 2, 6|18, 2]``) uses ``[1, 28]``, ``[1, 14]``, the same
    stage-3 pattern and ``[1, 3]``.
    """
    if len(depths) != len(patterns):
        raise ValueError(f'DiNAT detection dilations are defined for {len(patterns)} stages, got depths={list(depths)}')
    return [_repeat(p, d) for p, d in zip(patterns, depths)]


@dataclass(frozen=True)
class DetFamily:
    """Dense-prediction recipe of one family.

    Args:
        name: short family name (used in messages and configs).
        pattern: regex matched against the full model name (``visionattn_...``).
        module: import path of the module that defines ``checkpoint_filter_fn``.
        out_norm_eps: eps of the LayerNorm the official detection backbone adds to every output;
            ``None`` when it adds none.
        plain: isotropic model (every block at one stride): the simple-pyramid adaptor is added.
        no_decay: substrings of parameter names with no weight decay in detection (position
            tables / biases); norms are handled by ``norm_decay_mult=0``.
        det_kwargs: ``fn(model_name, depths) -> dict`` of model kwargs used for detection only
            (e.g. DiNAT's dilations); user kwargs override them.
        model_kwargs: kwargs always passed for detection (e.g. dynamic image size).
        official_out_norms: key of the official detection backbone's per-output norm, ``{i}`` standing for the
            level (BiFormer ``'extra_norms.{i}'``, PPMA ``'outnorm{i}'``): an official detection checkpoint's
            ``backbone.<key>.*`` tensors are this wrapper's ``out_norms.{i}.*`` (see
            :func:`split_official_out_norms`).
    """
    name: str
    pattern: str
    module: str
    out_norm_eps: Optional[float] = None
    plain: bool = False
    no_decay: Tuple[str, ...] = ()
    det_kwargs: Optional[Callable[[str, Sequence[int]], Dict]] = None
    model_kwargs: Dict = field(default_factory=dict)
    official_out_norms: Optional[str] = None

    def matches(self, model_name: str) -> bool:
        return re.match(self.pattern, model_name) is not None


def _dinat_kwargs(model_name: str, depths: Sequence[int]) -> Dict:
    return dict(dilations=dinat_detection_dilations(depths, DINAT_DET_PATTERNS))


def _dinat_s_kwargs(model_name: str, depths: Sequence[int]) -> Dict:
    return dict(dilations=dinat_detection_dilations(depths, DINAT_S_DET_PATTERNS))


# FLatten: no decay on the learned encodings and the focusing scale in detection (no official recipe exists)
_FLATTEN_NO_DECAY = ('pos_embed', 'positional_encoding', '.scale')

# Agent attention: the agent grids of the official dense-task configs (downstream_agent_shapes, file suffixes
# 9-12-14-7 / 12-16-28-28) and the official Agent-Swin optimiser's no-decay keys (Agent-PVT decays everything)
AGENT_SWIN_DET_SHAPES = ((9, 9), (12, 12), (14, 14), (7, 7))
AGENT_PVT_DET_SHAPES = ((12, 12), (16, 16), (28, 28), (28, 28))
_AGENT_BIASES = ('an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias')

# One line per family. Order matters only where patterns overlap (none do).
DET_FAMILIES: Tuple[DetFamily, ...] = (
    DetFamily('davit', r'^visionattn_davit_', 'visionattn.models.davit', out_norm_eps=1e-5),
    DetFamily('twins_svt', r'^visionattn_twins_svt_', 'visionattn.models.twins', out_norm_eps=1e-6, no_decay=('pos_block',)),
    DetFamily('twins_pcpvt', r'^visionattn_twins_pcpvt_', 'visionattn.models.twins', no_decay=('pos_block',)),
    DetFamily('convit', r'^visionattn_convit_', 'visionattn.models.convit', out_norm_eps=1e-6, plain=True, no_decay=('pos_embed', 'cls_token'), model_kwargs=dict(dynamic_img_size=True)),
    DetFamily('nat', r'^visionattn_nat_(?!isotropic)', 'visionattn.models.nat', out_norm_eps=1e-5, no_decay=('rpb',)),
    DetFamily('dinat', r'^visionattn_dinat_(?!s_|isotropic)', 'visionattn.models.nat', out_norm_eps=1e-5, no_decay=('rpb',), det_kwargs=_dinat_kwargs),
    DetFamily('dinat_s', r'^visionattn_dinat_s_', 'visionattn.models.nat', out_norm_eps=1e-5, no_decay=('rpb',), det_kwargs=_dinat_s_kwargs),
    DetFamily('nat_isotropic', r'^visionattn_(nat_isotropic|dinat_isotropic|vitrpb)_', 'visionattn.models.nat', out_norm_eps=1e-5, plain=True, no_decay=('rpb', 'relative_position')),
    DetFamily('ppma', r'^visionattn_ppma_', 'visionattn.models.ppma', out_norm_eps=1e-5, no_decay=('dt_bias', 'A_log'), official_out_norms='outnorm{i}'),
    DetFamily('flatten_pvt', r'^visionattn_flatten_pvt_(?!v2_)', 'visionattn.models.flatten', no_decay=_FLATTEN_NO_DECAY, model_kwargs=dict(dynamic_img_size=True)),
    DetFamily('flatten_pvt_v2', r'^visionattn_flatten_pvt_v2_', 'visionattn.models.flatten', no_decay=_FLATTEN_NO_DECAY, model_kwargs=dict(dynamic_img_size=True)),
    DetFamily('flatten_swin', r'^visionattn_flatten_swin_', 'visionattn.models.flatten', out_norm_eps=1e-5, no_decay=_FLATTEN_NO_DECAY + ('relative_position_bias_table',), model_kwargs=dict(dynamic_img_size=True)),
    DetFamily('flatten_cswin', r'^visionattn_flatten_cswin_', 'visionattn.models.flatten', out_norm_eps=1e-5, no_decay=_FLATTEN_NO_DECAY, model_kwargs=dict(dynamic_img_size=True)),
    DetFamily('agent_pvt', r'^visionattn_agent_pvt_', 'visionattn.models.agent', model_kwargs=dict(dynamic_img_size=True, agent_shapes=AGENT_PVT_DET_SHAPES)),
    DetFamily('agent_swin', r'^visionattn_agent_swin_', 'visionattn.models.agent', out_norm_eps=1e-5, no_decay=('relative_position_bias_table',) + _AGENT_BIASES, model_kwargs=dict(dynamic_img_size=True, agent_shapes=AGENT_SWIN_DET_SHAPES)),
    DetFamily('biformer', r'^visionattn_biformer_(tiny|small|base)$', 'visionattn.models.biformer', out_norm_eps=1e-6, model_kwargs=dict(n_win=16, auto_pad=True), official_out_norms='extra_norms.{i}'),
    DetFamily('cnn_attention', r'^visionattn_(resnet\d+|mobilenetv2)_(cbam|triplet|ela_[a-z])$', 'visionattn.models.cnn_attention'),
)


def split_official_out_norms(family: DetFamily, cls_sd: Dict, det_only: Dict) -> Tuple[Dict, Dict]:
    """Move an official detection checkpoint's per-output norms to the wrapper's names.

    ``cls_sd`` / ``det_only`` are the backbone tensors of a checkpoint (``backbone.`` stripped) as
    ``visionattn.det.convert.select_state_dict`` splits them; keys ``family.official_out_norms`` (e.g. BiFormer's
    ``extra_norms.{i}.weight``) leave ``cls_sd`` and join ``det_only`` as ``out_norms.{i}.weight``. A key the wrapper
    also has under that name wins over the official one. Returns new ``(cls_sd, det_only)``.
    """
    cls_out, det_out = OrderedDict(cls_sd), OrderedDict(det_only)
    if not family.official_out_norms:
        return cls_out, det_out
    head, _, tail = family.official_out_norms.partition('{i}')
    official = re.compile('^' + re.escape(head) + r'(\d+)' + re.escape(tail) + r'\.(.+)$')
    for key in list(cls_out):
        m = official.match(key)
        if m:
            value = cls_out.pop(key)
            det_out.setdefault(f'out_norms.{int(m.group(1))}.{m.group(2)}', value)
    return cls_out, det_out


def family_for(model_name: str) -> DetFamily:
    """The :class:`DetFamily` of ``model_name``.

    A registered visionattn model whose family has no line in :data:`DET_FAMILIES` still works:
    it gets a generic recipe (its stage outputs, no output norms, no detection-only kwargs;
    plain when it has ``blocks`` and no ``stages``) and a warning saying so.
    """
    if not isinstance(model_name, str) or not model_name.startswith('visionattn_'):
        raise ValueError(
            f'model_name={model_name!r}: expected a registered visionattn model name '
            f"('visionattn_...', see visionattn.list_models())")
    for fam in DET_FAMILIES:
        if fam.matches(model_name):
            return fam
    return _generic_family(model_name)


@functools.lru_cache(maxsize=None)
def _generic_family(model_name: str) -> DetFamily:
    import timm
    import visionattn  # noqa: F401
    if not timm.is_model(model_name):
        known = [m for m in visionattn.list_models() if model_name.replace('visionattn_', '') in m][:5]
        raise ValueError(f'model_name={model_name!r} is not a registered visionattn model'
                         + (f'; did you mean one of {known}?' if known else '; see visionattn.list_models()'))
    module = timm.models.model_entrypoint(model_name).__module__
    model = timm.create_model(model_name, num_classes=0, device='meta')
    # isotropic: blocks, no stages, one stride (a CNN with ``blocks`` has strides 2..32)
    plain = (not hasattr(model, 'stages') and hasattr(model, 'blocks')
             and len({f['reduction'] for f in model.feature_info}) == 1)
    warnings.warn(
        f'{model_name}: no detection recipe in visionattn.det.families.DET_FAMILIES; using the generic '
        f'one (stage outputs, no output norms{", simple pyramid" if plain else ""}). Add a line for its family '
        f'to use the official detection details.')
    return DetFamily(module.rsplit('.', 1)[-1], '^' + re.escape(model_name) + '$', module, plain=plain,
                     no_decay=tuple(sorted(model.no_weight_decay())) if hasattr(model, 'no_weight_decay') else ())
