"""CBAM, Triplet Attention and ELA as mmdet ResNet plugins (``visionattn.CBAM``, ``visionattn.TripletAttention``,
``visionattn.ELA``).

mmdet's ``ResNet`` builds ``plugins=[dict(cfg=dict(type='visionattn.CBAM'), stages=(True,) * 4,
position='after_conv3')]`` in every bottleneck of the chosen stages with ``in_channels=`` the width at that
position, under the module's ``_abbr_`` (``cbam``, ``triplet_attention``, ``ela``) -- the attribute names of
the official CBAM / Triplet ResNets, so their checkpoints map onto mmdet's ResNet keys one to one
(``tools/export.py --format mmdet-resnet``). ``after_conv3`` is the official CBAM / Triplet position (after
conv3 + BN, before the shortcut add); ``after_conv2`` is ``visionattn_resnet50_ela_b``'s. mmdet's
``BasicBlock`` (ResNet-18/34) has no plugins.
"""
from visionattn.layers import CBAM, ELA, TripletAttention

__all__ = ['CBAMPlugin', 'TripletAttentionPlugin', 'ELAPlugin', 'PLUGINS']


class CBAMPlugin(CBAM):
    """:class:`visionattn.layers.CBAM` with mmcv's plugin constructor (``in_channels=``)."""

    def __init__(self, in_channels: int, **kwargs):
        super().__init__(in_channels, **kwargs)


class TripletAttentionPlugin(TripletAttention):
    """:class:`visionattn.layers.TripletAttention` with mmcv's plugin constructor (``in_channels=``)."""

    def __init__(self, in_channels: int, **kwargs):
        super().__init__(in_channels, **kwargs)


class ELAPlugin(ELA):
    """:class:`visionattn.layers.ELA` with mmcv's plugin constructor (``in_channels=``)."""

    def __init__(self, in_channels: int, **kwargs):
        super().__init__(in_channels, **kwargs)


#: registry name -> plugin class
PLUGINS = {'CBAM': CBAMPlugin, 'TripletAttention': TripletAttentionPlugin, 'ELA': ELAPlugin}
