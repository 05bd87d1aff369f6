"""FLatten Transformer: focused linear attention in PVT, PVTv2, Swin and CSwin hosts (Han et al.,
"FLatten Transformer: Vision Transformer using Focused Linear Attention", ICCV 2023, arXiv:2308.00442;
https://github.com/LeapLabTHU/FLatten-Transformer).

The hosts are shared (``visionattn.models._pvt`` / ``_swin`` / ``_cswin``); this file only picks the
mixer per block (``L`` = :class:`visionattn.layers.FocusedLinearAttention`, ``S`` = the host's own
softmax attention), declares the 18 official variants and maps the official checkpoints.
"""
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from ..layers.focused_linear_attention import FocusedLinearAttention, FocusedLinearBranch
from ..layers.fused_linear import ONEDNN_CARD_NOTE
from ._builder import build_visionattn_model, parse_attn_types
from ._cswin import CSwin
from ._pvt import Pvt, PvtV2
from ._swin import Swin

FAMILY_CARD = dict(
    name='FLatten',
    paper='FLatten Transformer: Vision Transformer using Focused Linear Attention, ICCV 2023, arXiv:2308.00442',
    repo='https://github.com/LeapLabTHU/FLatten-Transformer',
    license='MIT (official code)',
    accuracy={
        'visionattn_flatten_pvt_tiny': '77.8 (README; log 77.758)',
        'visionattn_flatten_pvt_small': '~81.7 (read off the README accuracy/FLOPs plot)',
        'visionattn_flatten_pvt_medium': '~83.0 (read off the README plot)',
        'visionattn_flatten_pvt_large': 'not published (cfg flatten_pvt_b)',
        'visionattn_flatten_pvt_v2_b0': '71.1 (README; log 71.098)',
        'visionattn_flatten_pvt_v2_b1': 'not published',
        'visionattn_flatten_pvt_v2_b2': '~82.5 (read off the README plot)',
        'visionattn_flatten_pvt_v2_b3': '~83.7 (read off the README plot)',
        'visionattn_flatten_pvt_v2_b4': '~84.0 (read off the README plot)',
        'visionattn_flatten_pvt_v2_b5': 'not published (no official cfg)',
        'visionattn_flatten_swin_tiny': '82.1 (README; log 82.106)',
        'visionattn_flatten_swin_small': '83.5 (README)',
        'visionattn_flatten_swin_base': '83.8 (README)',
        'visionattn_flatten_swin_base_384': '85.0 (README, fine-tuned at 384)',
        'visionattn_flatten_cswin_tiny': '83.1 (README; log 83.130)',
        'visionattn_flatten_cswin_small': '~83.8 (read off the README plot)',
        'visionattn_flatten_cswin_base': '~84.5 (read off the README plot)',
        'visionattn_flatten_cswin_base_384': 'not published',
    },
    load_official=(
        "timm.create_model('visionattn_flatten_swin_tiny', pretrained=True, "
        "pretrained_cfg_overlay=dict(file='flatten_swin_t.pth')) -- official checkpoints (raw, under 'model', or "
        "with 'module.' prefixes) are remapped by checkpoint_filter_fn, which drops the official "
        "relative_position_index / attn_mask buffers (rebuilt per size). A main_ema.py checkpoint holding "
        "'state_dict_ema' beside 'model' loads the EMA weights, as timm's file loader prefers them. Built with "
        "img_size= another size, the learned encodings (and Swin's bias tables, where the window changes) are "
        "resampled bilinearly on load. The README's weight links are TsinghuaCloud placeholders ('In process'), "
        "so no pretrained=True tag exists"),
    differences=[
        ONEDNN_CARD_NOTE,
        'Any input size: img_size= at creation (encodings resampled on load) and dynamic_img_size=True '
        '(encodings resampled bilinearly on the fly); the official classification models only run at their '
        'training size. At the training size the computation is the official one.',
        'Stages whose window (Swin) or stripe (CSwin) covers the whole training map stay global at any size.',
        'Focusing and normaliser run in float32 under autocast / for half-precision weights (the official '
        'code reports NaN under AMP, issues #5, #15, #18, #32).',
        'Off the training size, Swin\'s own window attention (stages 3-4) keeps its 7x7 window (12 at 384): maps '
        'are zero-padded bottom/right to whole windows, shifted and masked as in Swin\'s detection backbone; maps '
        'smaller than a window clamp it (shift 0 there), as the official block does at its training size. '
        'CSwin stripe stages zero-pad symmetrically and crop back, as the official segmentation backbone.',
        'FLatten-PVT\'s final LayerNorm, constructed but never applied by the official model, is kept as a frozen '
        '`unused_norm` (requires_grad=False) so that official files load strictly and DDP sees no unused '
        'trainable parameter.',
        'State-dict layout follows the visionattn builder (stem / stages.S.downsample / stages.S.blocks.J / '
        'stages.S.norm (PVTv2) / norm / head.fc); official keys are remapped on load.',
    ],
)


def _cfg(**kwargs):
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'license': 'mit',
        'paper_ids': 'arXiv:2308.00442',
        'paper_name': 'FLatten Transformer: Vision Transformer using Focused Linear Attention',
        'origin_url': 'https://github.com/LeapLabTHU/FLatten-Transformer',
        **kwargs,
    }


def _mixers(attn_types: str, depths: Sequence[int], mixer: Callable) -> List[List[Optional[Callable]]]:
    """The hosts' per-block ``mixers`` for an official ``ATTN_TYPE``: ``mixer`` for ``L``, ``None`` (the host's
    own attention) for ``S``."""
    return [[mixer if is_mixer else None for is_mixer in stage] for stage in parse_attn_types(attn_types, depths)]


# ---- PVT / PVTv2 ----

def _create_flatten_pvt(variant: str, pretrained: bool = False, attn_types: str = 'LLLL', **kwargs):
    """FLatten on the PVT / PVTv2 host: ``L`` blocks = ``FocusedLinearAttention(separate_q_kv=True)`` over the
    whole stage map (official ``la_sr_ratios`` 1111), ``S`` blocks = the host's spatial-reduction attention."""
    host = PvtV2 if variant.startswith('visionattn_flatten_pvt_v2_') else Pvt
    mixer = partial(FocusedLinearAttention, separate_q_kv=True, proj_drop=kwargs.get('proj_drop_rate', 0.))
    kwargs.setdefault('mixers', _mixers(attn_types, kwargs['depths'], mixer))
    return build_visionattn_model(host, variant, pretrained, checkpoint_filter_fn, **kwargs)


_PVT_CFGS = {
    f'visionattn_flatten_pvt_{v}': _cfg(first_conv='stem.proj', classifier='head.fc')
    for v in ('tiny', 'small', 'medium', 'large', 'v2_b0', 'v2_b1', 'v2_b2', 'v2_b3', 'v2_b4', 'v2_b5')}
_PVT_ARCH = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4))

# ---- Swin ----

def _create_flatten_swin(variant: str, pretrained: bool = False, attn_types: str = 'LLSS', **kwargs) -> Swin:
    """FLatten on the Swin host: ``L`` blocks = :class:`FocusedLinearAttention` (fused ``qkv``), ``S`` blocks =
    Swin window attention (relative position bias, shift mask), per the official ``ATTN_TYPE``.

    The official LA window (56; 96 at 384) equals the stage-1 map, so every ``L`` stage of the released models
    is one window over the whole map: ``mixer_window_size=None`` keeps it global at any size.
    """
    mixer = partial(FocusedLinearAttention, proj_drop=kwargs.get('proj_drop_rate', 0.))
    kwargs.setdefault('mixers', _mixers(attn_types, kwargs['depths'], mixer))
    return build_visionattn_model(Swin, variant, pretrained, checkpoint_filter_fn, **kwargs)


# the official eval transform: Resize((256, 256)) + CenterCrop(224) (TEST.CROP), Resize((384, 384)) at 384
_SWIN_CFG = dict(first_conv='stem.proj', classifier='head.fc', crop_pct=0.875, crop_mode='squash')
_SWIN_CFGS = {
    'visionattn_flatten_swin_tiny': _cfg(**_SWIN_CFG),
    'visionattn_flatten_swin_small': _cfg(**_SWIN_CFG),
    'visionattn_flatten_swin_base': _cfg(**_SWIN_CFG),
    'visionattn_flatten_swin_base_384': _cfg(**dict(
        _SWIN_CFG, input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)),
}
_SWIN_96 = dict(embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), window_size=7, mixer_window_size=None)
_SWIN_128 = dict(embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), window_size=7, mixer_window_size=None)

# ---- CSwin ----
_CSWIN_CFG = dict(first_conv='stem.conv', classifier='head.fc')
_CSWIN_CFGS = {
    'visionattn_flatten_cswin_tiny': _cfg(**_CSWIN_CFG),
    'visionattn_flatten_cswin_small': _cfg(**_CSWIN_CFG),
    'visionattn_flatten_cswin_base': _cfg(**_CSWIN_CFG),
    'visionattn_flatten_cswin_base_384': _cfg(
        input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, **_CSWIN_CFG),
}
# CSwin-T / S / B dims and heads (official FLatten_CSWin_64_* / FLatten_CSWin_96_*); the official LA splits
# (56-28-14-7 at 224, 96-48-24-12 at 384) equal the stage maps, so 'L' blocks are global (None)
_CSWIN_64 = dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), mixer_split_sizes=(None,) * 4)
_CSWIN_96 = dict(embed_dims=(96, 192, 384, 768), num_heads=(4, 8, 16, 32), mixer_split_sizes=(None,) * 4)


def _create_flatten_cswin(variant: str, pretrained: bool = False, attn_types: str = 'LLSS', **kwargs) -> CSwin:
    """FLatten-CSwin: ``L`` blocks are :class:`FocusedLinearBranch` (p = 3, dwc 5x5, + LePE) branches, ``S``
    blocks CSwin's own LePE attention (official ``ATTN_TYPE``, 'LLSS' for every released model)."""
    kwargs.setdefault('mixers', _mixers(attn_types, kwargs['depths'], FocusedLinearBranch))
    return build_visionattn_model(CSwin, variant, pretrained, checkpoint_filter_fn, **kwargs)


def checkpoint_filter_fn(state_dict: Dict, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an official FLatten checkpoint (any container) onto ``model``, whichever host it uses."""
    return model.filter_checkpoint(state_dict)


default_cfgs = generate_default_cfgs({**_PVT_CFGS, **_SWIN_CFGS, **_CSWIN_CFGS})

@register_model
def visionattn_flatten_pvt_tiny(pretrained=False, **kwargs) -> Pvt:
    """FLatten-PVT-T (official ``flatten_pvt_tiny``, cfg ``flatten_pvt_t``), 12.2M params."""
    model_args = dict(_PVT_ARCH, depths=(2, 2, 2, 2))
    return _create_flatten_pvt('visionattn_flatten_pvt_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_flatten_pvt_small(pretrained=False, **kwargs) -> Pvt:
    """FLatten-PVT-S (official ``flatten_pvt_small``, cfg ``flatten_pvt_s``), 21.7M params."""
    model_args = dict(_PVT_ARCH, depths=(3, 4, 6, 3))
    return _create_flatten_pvt('visionattn_flatten_pvt_small', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_flatten_pvt_medium(pretrained=False, **kwargs) -> Pvt:
    """FLatten-PVT-M (official ``flatten_pvt_medium``, cfg ``flatten_pvt_m``), 37.2M params."""
    model_args = dict(_PVT_ARCH, depths=(3, 4, 18, 3))
    return _create_flatten_pvt('visionattn_flatten_pvt_medium', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_flatten_pvt_large(pretrained=False, **kwargs) -> Pvt:
    """FLatten-PVT-L (official ``flatten_pvt_large``, cfg ``flatten_pvt_b``), 50.6M params."""
    model_args = dict(_PVT_ARCH, depths=(3, 8, 27, 3))
    return _create_flatten_pvt('visionattn_flatten_pvt_large', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_flatten_pvt_v2_b0(pretrained=False, **kwargs) -> PvtV2:
    """FLatten-PVTv2-b0 (official ``flatten_pvt_v2_b0``), 3.6M params."""
    model_args = dict(_PVT_ARCH, embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2))
    return _create_flatten_pvt('visionattn_flatten_pvt_v2_b0', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_flatten_pvt_v2_b1(pretrained=False, **kwargs) -> PvtV2:
    """FLatten-PVTv2-b1 (official ``flatten_pvt_v2_b1``), 12.9M params."""
    model_args = dict(_PVT_ARCH, depths=(2, 2, 2, 2))
    return _create_flatten_pvt('visionattn_flatten_pvt_v2_b1', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_flatten_pvt_v2_b2(pretrained=False, **kwargs) -> PvtV2:
    """FLatten-PVTv2-b2 (official ``flatten_pvt_v2_b2``), 22.5M params."""
    model_args = dict(_PVT_ARCH, depths=(3, 4, 6, 3))
    return _create_flatten_pvt('visionattn_flatten_pvt_v2_b2', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_flatten_pvt_v2_b3(pretrained=False, **kwargs) -> PvtV2:
    """FLatten-PVTv2-b3 (official ``flatten_pvt_v2_b3``), 38.3M params."""
    model_args = dict(_PVT_ARCH, depths=(3, 4, 18, 3))
    return _create_flatten_pvt('visionattn_flatten_pvt_v2_b3', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_flatten_pvt_v2_b4(pretrained=False, **kwargs) -> PvtV2:
    """FLatten-PVTv2-b4 (official ``flatten_pvt_v2_b4``), 51.8M params."""
    model_args = dict(_PVT_ARCH, depths=(3, 8, 27, 3))
    return _create_flatten_pvt('visionattn_flatten_pvt_v2_b4', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_flatten_pvt_v2_b5(pretrained=False, **kwargs) -> PvtV2:
    """FLatten-PVTv2-b5 (official function ``flatten_pvt_v2_b5``, no official cfg), 67.1M params."""
    model_args = dict(_PVT_ARCH, mlp_ratios=(4, 4, 4, 4), depths=(3, 6, 40, 3))
    return _create_flatten_pvt('visionattn_flatten_pvt_v2_b5', pretrained, **dict(model_args, **kwargs))

@register_model
def visionattn_flatten_swin_tiny(pretrained=False, **kwargs) -> Swin:
    """FLatten-Swin-T (official ``flatten_swin_tiny_patch4_224``, ``LLSS``), 29.2M params."""
    model_args = dict(_SWIN_96, depths=(2, 2, 6, 2))
    return _create_flatten_swin('visionattn_flatten_swin_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_flatten_swin_small(pretrained=False, **kwargs) -> Swin:
    """FLatten-Swin-S (official ``flatten_swin_small_patch4_224``, ``LLSS``), 50.5M params."""
    model_args = dict(_SWIN_96, depths=(2, 2, 18, 2))
    return _create_flatten_swin('visionattn_flatten_swin_small', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_flatten_swin_base(pretrained=False, **kwargs) -> Swin:
    """FLatten-Swin-B (official ``flatten_swin_base_patch4_224``, ``LLSS``), 89.0M params."""
    model_args = dict(_SWIN_128, depths=(2, 2, 18, 2))
    return _create_flatten_swin('visionattn_flatten_swin_base', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_flatten_swin_base_384(pretrained=False, **kwargs) -> Swin:
    """FLatten-Swin-B @384 (official ``flatten_swin_base_patch4_384_finetune``, LA window 96, ``S`` windows 12,
    ``LLSS``), 91.4M params."""
    model_args = dict(_SWIN_128, depths=(2, 2, 18, 2), img_size=384, window_size=12)
    return _create_flatten_swin('visionattn_flatten_swin_base_384', pretrained, **dict(model_args, **kwargs))

@register_model
def visionattn_flatten_cswin_tiny(pretrained=False, **kwargs) -> CSwin:
    """FLatten-CSwin-T (official ``FLatten_CSWin_64_24181_tiny_224``, ``LLSS``), 21.2M params."""
    model_args = dict(_CSWIN_64, depths=(2, 4, 18, 1), split_sizes=(1, 2, 7, None))
    return _create_flatten_cswin('visionattn_flatten_cswin_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_flatten_cswin_small(pretrained=False, **kwargs) -> CSwin:
    """FLatten-CSwin-S (official ``FLatten_CSWin_64_24322_small_224``, ``LLSS``), 35.5M params."""
    model_args = dict(_CSWIN_64, depths=(2, 4, 32, 2), split_sizes=(1, 2, 7, None))
    return _create_flatten_cswin('visionattn_flatten_cswin_small', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_flatten_cswin_base(pretrained=False, **kwargs) -> CSwin:
    """FLatten-CSwin-B (official ``FLatten_CSWin_96_36292_base_224``, ``LLSS``), 74.9M params."""
    model_args = dict(_CSWIN_96, depths=(3, 6, 29, 2), split_sizes=(1, 2, 7, None))
    return _create_flatten_cswin('visionattn_flatten_cswin_base', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_flatten_cswin_base_384(pretrained=False, **kwargs) -> CSwin:
    """FLatten-CSwin-B @384 (official ``FLatten_CSWin_96_36292_base_384``, ``LLSS``), 78.4M params."""
    model_args = dict(_CSWIN_96, depths=(3, 6, 29, 2), split_sizes=(1, 2, 12, None))
    return _create_flatten_cswin('visionattn_flatten_cswin_base_384', pretrained, **dict(model_args, **kwargs))
