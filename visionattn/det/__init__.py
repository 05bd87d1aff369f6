"""visionattn backbones for mmdet 3.x.

``import visionattn.det`` (or, in a config,
``custom_imports = dict(imports=['visionattn.det'], allow_failed_imports=False)``) registers one
backbone type in mmdet's ``MODELS`` registry that wraps any ``visionattn_*`` model, and the three CNN attention
modules as mmdet ResNet plugins (``visionattn.CBAM``, ``visionattn.TripletAttention``, ``visionattn.ELA``;
see :mod:`visionattn.det.plugins`)::

    backbone=dict(type='visionattn.Backbone', model_name='visionattn_nat_tiny', out_indices=(0, 1, 2, 3),
                  frozen_stages=-1, norm_eval=False, with_cp=False, out_norms=True, drop_path_rate=0.2,
                  init_cfg=dict(type='Pretrained', checkpoint='...'), **model_kwargs)

``visionattn.Backbone`` lives in a child registry (scope ``visionattn``) of mmdet's ``MODELS``,
which is how mmengine resolves a scoped type from mmdet's scope; the same class is also
registered in mmdet's ``MODELS`` itself as ``VisionAttnBackbone``. Needs the ``det`` extra
(``bash tools/setup_det.sh``: mmcv 2.1.0 with ops, mmengine 0.10.7, mmdet 3.3.0).
"""
try:
    import mmdet  # noqa: F401
    import mmengine  # noqa: F401
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmengine.registry import Registry
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f'visionattn.det needs mmdet 3.3.0 / mmengine 0.10.7 / mmcv 2.1.0 (with ops): run '
        f'`bash tools/setup_det.sh` (installs the det extra into ./.venv). Import failed with: {e}') from e

import visionattn  # noqa: F401,E402  (registers the models in timm)

from .backbone import SimplePyramidLevel, VisionAttnBackbone  # noqa: E402
from .convert import load_checkpoint_file, select_state_dict  # noqa: E402
from .families import DET_FAMILIES, DetFamily, family_for  # noqa: E402
from .plugins import PLUGINS  # noqa: E402

#: child registry of mmdet's MODELS; ``type='visionattn.Backbone'`` resolves here from mmdet's scope
MODELS = Registry('model', parent=MMDET_MODELS, scope='visionattn', locations=['visionattn.det'])
MODELS.register_module(name='Backbone', module=VisionAttnBackbone)
MMDET_MODELS.register_module(name='VisionAttnBackbone', module=VisionAttnBackbone)
for _name, _plugin in PLUGINS.items():  # mmdet ResNet plugins: type='visionattn.CBAM' etc.
    MODELS.register_module(name=_name, module=_plugin)

__all__ = ['MODELS', 'VisionAttnBackbone', 'SimplePyramidLevel', 'DET_FAMILIES', 'DetFamily', 'family_for',
           'load_checkpoint_file', 'select_state_dict', 'backbone_channels']


def backbone_channels(model_name: str, out_indices=(0, 1, 2, 3), **model_kwargs):
    """``neck.in_channels`` for a backbone config (built on the meta device, no weights)."""
    bb = VisionAttnBackbone(model_name, out_indices=out_indices, device='meta', **model_kwargs)
    return list(bb.out_channels)
