"""CNNs with CBAM, Triplet Attention or ELA, built on timm's ``ResNet`` and MobileNetV2 (``EfficientNet``).

* CBAM ResNet-18/34/50/101 (``Jongchan/attention-module``, ``MODELS/model_resnet.py``) and Triplet
  ResNet-18/34/50/101 (``landskape-ai/triplet-attention``, ``MODELS/resnet.py``): the attention sits
  on the residual branch after the last conv + BN, before the shortcut add -- timm's ``attn_layer``
  position, so the module is the block's ``se`` (official ``cbam`` / ``triplet_attention``).
* Triplet MobileNetV2 (``MODELS/mobilenet.py``): the attention closes every inverted residual (after
  the pw-linear conv + BN, before the identity add; 17 modules). timm's ``BatchNormAct2d`` applies
  BN -> dropout -> act and the pw-linear norm has no activation, so the module fills that norm's
  ``act`` slot (``bn3.act`` / ``bn2.act`` of the first, depthwise-separable block).
* ELA MobileNetV2 (``Xuwei86/ELA_Code``, ``MbV2/models/mbv2_ela72.py``, the ELA-L setting): after the
  depthwise conv + BN + ReLU6 of every block with expansion != 1 -- timm's ``se`` slot (16 modules).
* ``visionattn_resnet50_ela_b`` (our variant; no official ImageNet ResNet exists): ELA-B after the
  3x3 conv + BN + ReLU of every bottleneck, on the bottleneck width (mmdet's ``after_conv2``).

The official networks end in a fixed ``AvgPool2d(7)`` (224x224 only); timm's global pooling gives the
same logits at 224 and runs any size from 32x32 up. ``checkpoint_filter_fn`` loads the official
checkpoints (``{'state_dict': ...}`` with ``module.``; torchvision-style ResNet keys with
``cbam`` / ``triplet_attention``, and the two official MobileNetV2 layouts ``features.N.conv.K``).
"""
import re
from collections import OrderedDict
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_attn
from timm.models import generate_default_cfgs, register_model
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from visionattn.layers.cbam import CBAM
from visionattn.layers.ela import ELA
from visionattn.layers.triplet_attention import TripletAttention

from ._builder import build_visionattn_model, check_input, check_state_dict, remap_keys, unwrap_state_dict

__all__ = ['AttentionResNet', 'AttentionMobileNetV2', 'Conv2AttentionBottleneck', 'checkpoint_filter_fn',
           'mmdet_resnet_state_dict']

MIN_INPUT_SIZE = 32  # the networks' total stride: smaller images leave the last stages on padding only


class InputCheckConv2d(nn.Conv2d):
    """The first conv of a timm CNN, checking its input first (channels, rank, minimum size).

    Checking in the stem covers ``forward``, ``forward_features``, ``forward_intermediates`` and
    ``features_only`` at once; the parameters are those of the conv it replaces (same keys)."""

    def __init__(self, conv: nn.Conv2d, min_input_size: int):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device='meta')
        self.weight = conv.weight
        self.bias = conv.bias
        self.min_input_size = min_input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.min_input_size)
        return self._conv_forward(x, self.weight, self.bias)


class Conv2AttentionBottleneck(Bottleneck):
    """timm's ``Bottleneck`` with ``attn_layer`` after the 3x3 conv + BN + ReLU, on the bottleneck width
    (``act2`` becomes ``act2.act`` -> ``act2.attn``) instead of after ``bn3`` on the block output."""

    def __init__(self, inplanes: int, planes: int, *args, attn_layer=None, **kwargs):
        super().__init__(inplanes, planes, *args, **kwargs)
        dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))
        self.act2 = nn.Sequential(OrderedDict(
            act=self.act2, attn=create_attn(attn_layer, self.conv2.out_channels, **dd)))


class _CheckedCNN:
    """What both timm CNN hosts add after timm built them: the input check in the first conv and, by default,
    channels-last conv weights (oneDNN / cuDNN then run every conv, and the gates between them, on channels-last
    activations; shapes and values are unchanged, outputs are NCHW-shaped with channels-last strides)."""

    def _finish_build(self, first_conv: str, channels_last: bool) -> None:
        setattr(self, first_conv, InputCheckConv2d(getattr(self, first_conv), MIN_INPUT_SIZE))
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def no_weight_decay(self):
        """No position tables; biases and norm weights (1-D) are excluded by timm's optimizer factory."""
        return set()


class AttentionResNet(_CheckedCNN, ResNet):
    """timm's ``ResNet`` (torchvision layout) with an attention module in every block; checks its input.

    ``channels_last`` (default True): see :class:`_CheckedCNN`.
    """

    def __init__(self, *args, channels_last: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self._finish_build('conv1', channels_last)


# timm's MobileNetV2-1.0 (``_gen_mobilenet_v2``): one depthwise-separable block, then inverted residuals
_MBV2_ARCH = [
    ['ds_r1_k3_s1_c16'],
    ['ir_r2_k3_s2_e6_c24'],
    ['ir_r3_k3_s2_e6_c32'],
    ['ir_r4_k3_s2_e6_c64'],
    ['ir_r3_k3_s1_e6_c96'],
    ['ir_r3_k3_s2_e6_c160'],
    ['ir_r1_k3_s1_e6_c320'],
]


class AttentionMobileNetV2(_CheckedCNN, EfficientNet):
    """timm's MobileNetV2 (ReLU6, 1280 head) with an attention module per block; checks its input.

    Args:
        attn_layer: ``attn_layer(channels, **device_dtype)`` builds the module.
        attn_position: ``'dw'`` -- after the depthwise conv + BN + ReLU6 of every block with expansion > 1,
            on the expanded width (timm's ``se`` slot); ``'out'`` -- after the pw-linear conv + BN of
            every block, before the identity add (the pw-linear norm's ``act`` slot).
        channels_last: see :class:`_CheckedCNN` (default True).
        **kwargs: ``EfficientNet`` arguments (``num_classes``, ``in_chans``, ``drop_rate``, ...).
    """

    def __init__(self, attn_layer: Callable, attn_position: str, channels_last: bool = True, **kwargs):
        if attn_position not in ('dw', 'out'):
            raise ValueError(f"attn_position={attn_position!r}: expected 'dw' or 'out'")
        arch = _MBV2_ARCH
        if attn_position == 'dw':  # request timm's se slot in the inverted residuals (ratio unused)
            arch = [[b + '_se1'] if b.startswith('ir') else [b] for (b,) in _MBV2_ARCH]
        super().__init__(
            block_args=decode_arch_def(arch), num_features=1280, stem_size=32, round_chs_fn=round_channels,
            act_layer=nn.ReLU6, se_layer=attn_layer if attn_position == 'dw' else None, **kwargs)
        if attn_position == 'out':
            dd = dict(device=self.conv_stem.weight.device, dtype=self.conv_stem.weight.dtype)
            for block in self.blocks.modules():
                if isinstance(block, InvertedResidual):
                    block.bn3.act = attn_layer(block.bn3.num_features, **dd)
                elif isinstance(block, DepthwiseSeparableConv):
                    block.bn2.act = attn_layer(block.bn2.num_features, **dd)
        self._finish_build('conv_stem', channels_last)


# ---------------------------------------------------------------------------------------------------
# official checkpoints

_RESNET_RULES = [(r'\.(cbam|triplet_attention)\.', '.se.')]  # torchvision names otherwise = timm's


def _mbv2_official_rules(model: AttentionMobileNetV2, layout: str) -> List:
    """Regex rules from an official MobileNetV2 (``features.N.conv.K``) to ``model``'s keys.

    ``layout`` 'triplet' (``MODELS/mobilenet.py``: conv+BN pairs nested, attention last) or 'ela'
    (``mbv2_ela72.py``: flat Sequential with the ReLU6s counted, ELA at index 6, head ``conv``).
    """
    names = [f'blocks.{s}.{b}' for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    rules = [(r'^features\.0\.0\.', 'conv_stem.'), (r'^features\.0\.1\.', 'bn1.'),
             (r'^(features\.18|conv)\.0\.', 'conv_head.'), (r'^(features\.18|conv)\.1\.', 'bn2.'),
             (r'^classifier\.1\.', 'classifier.')]
    if layout == 'triplet':
        first = {'0.0': 'conv_dw', '0.1': 'bn1', '1': 'conv_pw', '2': 'bn2', '3': 'bn2.act'}
        other = {'0.0': 'conv_pw', '0.1': 'bn1', '1.0': 'conv_dw', '1.1': 'bn2', '2': 'conv_pwl', '3': 'bn3',
                 '4': 'bn3.act'}
    else:
        first = {'0': 'conv_dw', '1': 'bn1', '3': 'conv_pw', '4': 'bn2'}
        other = {'0': 'conv_pw', '1': 'bn1', '3': 'conv_dw', '4': 'bn2', '6': 'se', '7': 'conv_pwl', '8': 'bn3'}
    for i, name in enumerate(names, start=1):
        for src, dst in (first if i == 1 else other).items():
            rules.append((rf'^features\.{i}\.conv\.{re.escape(src)}\.', f'{name}.{dst}.'))
    return rules


def checkpoint_filter_fn(state_dict: Dict, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an official CBAM / Triplet / ELA checkpoint (or visionattn's own layout) onto ``model``.

    Accepts the official container (``{'epoch', 'arch', 'state_dict', ...}``), ``module.`` prefixes
    and raw state dicts, and raises a ``ValueError`` naming missing / unexpected / mis-shaped keys.
    """
    sd = unwrap_state_dict(state_dict)
    if isinstance(model, AttentionMobileNetV2):
        if 'features.1.conv.0.0.weight' in sd:
            sd = remap_keys(sd, _mbv2_official_rules(model, 'triplet'))
        elif 'features.1.conv.0.weight' in sd:
            sd = remap_keys(sd, _mbv2_official_rules(model, 'ela'))
        first_conv = 'conv_stem.weight'
    else:
        sd = remap_keys(sd, _RESNET_RULES)
        first_conv = 'conv1.weight'
    return check_state_dict(sd, model, source=f'{type(model).__name__} checkpoint', ignore_shape=(first_conv,))


def mmdet_resnet_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model``'s weights (its own layout) as mmdet's ``ResNet`` with the visionattn plugins.

    mmdet names the backbone like torchvision (= timm's ResNet) and each plugin by its ``_abbr_``
    (``cbam``, ``triplet_attention``, ``ela``), so ``layerN.M.se.`` / ``layerN.M.act2.attn.`` become
    ``layerN.M.<abbr>.`` -- the official checkpoints' own names. The classifier is dropped. Only
    bottleneck ResNets map: mmdet's ``BasicBlock`` (ResNet-18/34) takes no plugins.
    """
    if not isinstance(model, AttentionResNet) or not isinstance(model.layer1[0], Bottleneck):
        raise ValueError(
            f'{getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)}: only the bottleneck '
            f'ResNets (50/101) map onto mmdet ResNet plugins (mmdet\'s BasicBlock has no plugins); use '
            f'visionattn.Backbone for the others')
    rules = []
    for name, module in model.named_modules():
        if name.endswith(('.se', '.act2.attn')) and hasattr(module, '_abbr_'):
            block = name.rsplit('.se', 1)[0] if name.endswith('.se') else name[:-len('.act2.attn')]
            rules.append((name + '.', f'{block}.{module._abbr_}.'))
    out = OrderedDict()
    for k, v in state_dict.items():
        if k.startswith(model.pretrained_cfg.get('classifier', 'fc') + '.'):
            continue
        for src, dst in rules:
            if k.startswith(src):
                k = dst + k[len(src):]
                break
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------
# registry

def _create_resnet(variant: str, pretrained: bool, block, layers: Sequence[int], attn_layer, **kwargs):
    """``block_args=dict(attn_layer=...)`` swaps the attention as on timm's own ResNets."""
    kwargs.setdefault('zero_init_last', False)  # official init: every BN weight 1 (the gates' own inits aside)
    block_args = {'attn_layer': attn_layer, **(kwargs.pop('block_args', None) or {})}
    # features_only as timm's ResNets: FeatureListNet over the stem activation and layer1..4 (strides 2..32)
    return build_visionattn_model(
        AttentionResNet, variant, pretrained, checkpoint_filter_fn, feature_cfg={},
        block=block, layers=list(layers), block_args=block_args, **kwargs)


def _create_mbv2(variant: str, pretrained: bool, default_attn_layer, default_position: str, **kwargs):
    """``attn_layer=`` / ``attn_position=`` override the family's module and place."""
    kwargs.setdefault('attn_layer', default_attn_layer)
    kwargs.setdefault('attn_position', default_position)
    # features_only: the stem and the five stride-changing stages ('blocks.i'), strides 2..32
    return build_visionattn_model(
        AttentionMobileNetV2, variant, pretrained, checkpoint_filter_fn, feature_cfg=dict(flatten_sequential=True),
        **kwargs)


def _cfg(origin: str, paper: str, paper_ids: str, first_conv='conv1', classifier='fc', **kwargs) -> Dict:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        # the official train_imagenet.py / imagenet.py evaluate Resize(256) + CenterCrop(224), bilinear
        'crop_pct': 0.875, 'interpolation': 'bilinear', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': first_conv, 'classifier': classifier,
        'license': 'mit', 'paper_name': paper, 'paper_ids': paper_ids, 'origin_url': origin,
        **kwargs,
    }


_CBAM = partial(_cfg, 'https://github.com/Jongchan/attention-module', 'CBAM: Convolutional Block Attention Module',
                'arXiv:1807.06521')
_TRIPLET = partial(_cfg, 'https://github.com/landskape-ai/triplet-attention',
                   'Rotate to Attend: Convolutional Triplet Attention Module', 'arXiv:2010.03045')
_ELA = partial(_cfg, 'https://github.com/Xuwei86/ELA_Code', 'ELA: Efficient Local Attention for Deep Convolutional '
               'Neural Networks', 'arXiv:2403.01123')
_MBV2 = dict(first_conv='conv_stem', classifier='classifier')

default_cfgs = generate_default_cfgs({
    'visionattn_resnet18_cbam': _CBAM(notes=('No released weights.',)),
    'visionattn_resnet34_cbam': _CBAM(notes=('No released weights.',)),
    # official weights on Google Drive share pages only (no direct download, so no pretrained tag): see FAMILY_CARD
    'visionattn_resnet50_cbam': _CBAM(notes=(
        'Official ResNet-50 + CBAM (100 epochs, ACC@1 77.622) on Google Drive (README of the official repo); '
        'load it with pretrained_cfg_overlay=dict(file=...).',)),
    'visionattn_resnet101_cbam': _CBAM(notes=('No released weights.',)),
    'visionattn_resnet18_triplet': _TRIPLET(notes=(
        'Official ResNet-18 + TA k=7 (71.09) on Google Drive (official README); pretrained_cfg_overlay=dict(file=...).',)),
    'visionattn_resnet34_triplet': _TRIPLET(notes=('No released weights.',)),
    'visionattn_resnet50_triplet': _TRIPLET(notes=(
        'Official ResNet-50 + TA k=7 (77.48) on Google Drive (official README); pretrained_cfg_overlay=dict(file=...).',)),
    'visionattn_resnet101_triplet': _TRIPLET(notes=('No released weights.',)),
    'visionattn_mobilenetv2_triplet': _TRIPLET(**_MBV2, notes=(
        'Official MobileNetV2 + TA k=7 (71.99) on Google Drive (official README); pretrained_cfg_overlay=dict(file=...).',)),
    'visionattn_mobilenetv2_ela_l': _ELA(**_MBV2, notes=('No released ImageNet weights (official repo).',)),
    'visionattn_resnet50_ela_b': _ELA(notes=(
        'visionattn variant (ELA-B after the 3x3 conv of every bottleneck); no official weights.',)),
})


def _resnet_entry(variant, pretrained, depth, attn_layer, kwargs):
    block, layers = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
                     50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3))}[depth]
    return _create_resnet(variant, pretrained, block, layers, attn_layer, **kwargs)


_CBAM_LAYER = partial(CBAM, reduction=16, inplace=True)
_TRIPLET_LAYER = partial(TripletAttention, kernel_size=7)


@register_model
def visionattn_resnet18_cbam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-18 + CBAM (r=16, 7x7 spatial gate) in every block."""
    return _resnet_entry('visionattn_resnet18_cbam', pretrained, 18, _CBAM_LAYER, kwargs)


@register_model
def visionattn_resnet34_cbam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-34 + CBAM in every block."""
    return _resnet_entry('visionattn_resnet34_cbam', pretrained, 34, _CBAM_LAYER, kwargs)


@register_model
def visionattn_resnet50_cbam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-50 + CBAM in every bottleneck (the released official checkpoint)."""
    return _resnet_entry('visionattn_resnet50_cbam', pretrained, 50, _CBAM_LAYER, kwargs)


@register_model
def visionattn_resnet101_cbam(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-101 + CBAM in every bottleneck."""
    return _resnet_entry('visionattn_resnet101_cbam', pretrained, 101, _CBAM_LAYER, kwargs)


@register_model
def visionattn_resnet18_triplet(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-18 + Triplet Attention (k=7) in every block."""
    return _resnet_entry('visionattn_resnet18_triplet', pretrained, 18, _TRIPLET_LAYER, kwargs)


@register_model
def visionattn_resnet34_triplet(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-34 + Triplet Attention in every block."""
    return _resnet_entry('visionattn_resnet34_triplet', pretrained, 34, _TRIPLET_LAYER, kwargs)


@register_model
def visionattn_resnet50_triplet(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-50 + Triplet Attention in every bottleneck."""
    return _resnet_entry('visionattn_resnet50_triplet', pretrained, 50, _TRIPLET_LAYER, kwargs)


@register_model
def visionattn_resnet101_triplet(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-101 + Triplet Attention in every bottleneck."""
    return _resnet_entry('visionattn_resnet101_triplet', pretrained, 101, _TRIPLET_LAYER, kwargs)


@register_model
def visionattn_mobilenetv2_triplet(pretrained: bool = False, **kwargs) -> AttentionMobileNetV2:
    """MobileNetV2-1.0 + Triplet Attention (k=7) closing every block; classifier dropout 0.25 (official)."""
    kwargs.setdefault('drop_rate', 0.25)
    return _create_mbv2('visionattn_mobilenetv2_triplet', pretrained, _TRIPLET_LAYER, 'out', **kwargs)


@register_model
def visionattn_mobilenetv2_ela_l(pretrained: bool = False, **kwargs) -> AttentionMobileNetV2:
    """MobileNetV2-1.0 + ELA-L after the depthwise conv of every expanded block (official ``mbv2_ela72``);
    classifier dropout 0.1 (official)."""
    kwargs.setdefault('drop_rate', 0.1)
    return _create_mbv2('visionattn_mobilenetv2_ela_l', pretrained, partial(ELA, variant='L', inplace=True), 'dw',
                        **kwargs)


@register_model
def visionattn_resnet50_ela_b(pretrained: bool = False, **kwargs) -> AttentionResNet:
    """ResNet-50 + ELA-B after the 3x3 conv of every bottleneck, on its width (visionattn variant)."""
    return _create_resnet('visionattn_resnet50_ela_b', pretrained, Conv2AttentionBottleneck, (3, 4, 6, 3),
                          partial(ELA, variant='B', inplace=True), **kwargs)


FAMILY_CARD = dict(
    name='CBAM / Triplet Attention / ELA CNNs',
    paper=(
        'CBAM: Convolutional Block Attention Module -- Woo, Park, Lee, Kweon; ECCV 2018; arXiv:1807.06521. '
        'Rotate to Attend: Convolutional Triplet Attention Module -- Misra, Nalamada, Arasanipalai, Hou; WACV 2021; '
        'arXiv:2010.03045. ELA: Efficient Local Attention for Deep Convolutional Neural Networks -- Xu, Wan; '
        'arXiv:2403.01123'),
    repo=('https://github.com/Jongchan/attention-module, https://github.com/landskape-ai/triplet-attention, '
          'https://github.com/Xuwei86/ELA_Code'),
    license='MIT (CBAM and Triplet Attention code); ELA_Code states no license',
    accuracy={
        'visionattn_resnet18_cbam': '70.73 (paper Table 4, error 29.27)',
        'visionattn_resnet34_cbam': '74.01 (paper Table 4, error 25.99)',
        'visionattn_resnet50_cbam': '77.34 (paper Table 4); released checkpoint 77.622 (README)',
        'visionattn_resnet101_cbam': '78.49 (paper Table 4, error 21.51)',
        'visionattn_resnet18_triplet': '71.09 (README, k=7 checkpoint)',
        'visionattn_resnet34_triplet': '— (no official result)',
        'visionattn_resnet50_triplet': '77.48 (README, k=7 checkpoint)',
        'visionattn_resnet101_triplet': '— (no official result)',
        'visionattn_mobilenetv2_triplet': '71.99 (README, k=7 checkpoint)',
        'visionattn_mobilenetv2_ela_l': '— (paper tables not re-checked; no released ImageNet weights)',
        'visionattn_resnet50_ela_b': '— (visionattn variant, not trained)',
    },
    load_official=(
        "The released CBAM ResNet-50 and Triplet ResNet-18/50 / MobileNetV2 (k=7) checkpoints are Google Drive "
        "share pages (links in the official READMEs: https://github.com/Jongchan/attention-module and "
        "https://github.com/landskape-ai/triplet-attention), not direct downloads, so these models have no "
        "`pretrained=True` tag. Download one in a browser, then e.g. "
        "`timm.create_model('visionattn_resnet50_cbam', pretrained=True, "
        "pretrained_cfg_overlay=dict(file='RESNET50_CBAM_new_name_wrap.pth'))` -- `checkpoint_filter_fn` reads the "
        "official `{'epoch', 'arch', 'state_dict', 'best_prec1', 'optimizer'}` container (DataParallel `module.` "
        "prefix), renames `cbam` / `triplet_attention` to timm's `se` (the modules keep the official inner names "
        "`ChannelGate.mlp.1/3`, `SpatialGate.spatial.conv/bn`, `ChannelGateH/W`), maps the two official "
        "MobileNetV2 layouts (`features.N.conv.K`) onto timm's `blocks.i.j`, and loads strictly. The k=3 Triplet "
        "checkpoints load with `kernel_size=3` modules: `block_args=dict(attn_layer=partial(TripletAttention, "
        "kernel_size=3))`. Files are read with `weights_only=True`; the official files were written by PyTorch "
        "0.4.1 and contain only tensors, numbers and strings."),
    differences=[
        'The official ResNets end in `AvgPool2d(7)` and only run at 224x224; here timm\'s global average pooling '
        'gives the same logits at 224 and runs any input from 32x32 up (`global_pool=` as in timm).',
        'timm\'s `cbam` is not the paper module (MLP without biases, [mean, max] pooling order, BN momentum 0.1, '
        'no zero-init of the spatial BN; 28,074 K params for ResNet-50 vs the official 28,090 K); '
        '`visionattn.layers.CBAM` is the official one. timm\'s `ela` (EfficientLocalAttn) is a different module '
        '(two separate depthwise convs, SiLU, one-group norms; 2x the parameters); `visionattn.layers.ELA` is '
        'the paper / official one with its T/B/S/L settings. timm has no triplet attention.',
        'The Triplet MobileNetV2 module closes each block after the pw-linear BN: it sits in the `act` slot of '
        'that `BatchNormAct2d` (`blocks.i.j.bn3.act`, `blocks.0.0.bn2.act`), which applies BN -> act and has no '
        'activation of its own there.',
        '`visionattn_resnet50_ela_b` is a visionattn variant (no official ImageNet ResNet with ELA exists): ELA-B '
        'after the 3x3 conv + BN + ReLU on the bottleneck width (`layerN.M.act2.attn`; mmdet plugin position '
        '`after_conv2`), not at the block output where timm\'s `attn_layer` goes.',
        'Backbone initialisation is timm\'s (Kaiming fan-out convs, BN weight 1, no zero-init of the last BN as '
        'in the official code); the attention modules initialise as the official code (spatial-gate BN weight 0 '
        'for CBAM and Triplet\'s H-W gate, MLP biases 0, gate BN momentum 0.01). The official MobileNetV2s '
        'initialise the classifier N(0, 0.01).',
        'At inference (no autograd) the CBAM and ELA modules of the models scale their intermediate maps in place '
        '(`inplace=True`), which saves one allocation per gate; results are identical.',
        'The models store their conv weights channels-last (`channels_last=False` keeps NCHW), so oneDNN / cuDNN run '
        'every conv and gate on channels-last activations; outputs are NCHW-shaped tensors with channels-last strides '
        'and equal values (to fp32 rounding of the other conv algorithms). The ratios above compare with timm\'s '
        'models as they are created (NCHW); timm\'s resnet50 moved to channels-last was measured 1.14x faster at '
        'inference and 1.14x for a training step on the same machine.',
    ],
)
