"""CBAM / Triplet Attention / ELA as mmdet ResNet plugins: registry, official keys, export -> load -> same features,
the two COCO configs (build, loss step, predict).

Needs the det extra (``bash tools/setup_det.sh``); without it this module fails at collection with that instruction.
"""
from pathlib import Path

import pytest
import timm
import torch

try:
    from mmcv.ops import nms  # noqa: F401  (compiled ops, needed by every detector's predict)
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
except ImportError as e:  # pragma: no cover - environment
    pytest.fail(f'tests/test_det_plugins.py needs the det extra: run `bash tools/setup_det.sh`. Import failed: {e}',
                pytrace=False)

import visionattn.det  # noqa: E402,F401
from layouts import load_layout  # noqa: E402
from test_cnn_attention import REFERENCES, perturb_  # noqa: E402
from test_det import _batch  # noqa: E402
from visionattn.det.plugins import CBAMPlugin, ELAPlugin, TripletAttentionPlugin  # noqa: E402
from visionattn.train import export as export_tool  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # model -> (plugin cfg, position)
    'visionattn_resnet50_cbam': (dict(type='visionattn.CBAM'), 'after_conv3'),
    'visionattn_resnet50_triplet': (dict(type='visionattn.TripletAttention'), 'after_conv3'),
    'visionattn_resnet50_ela_b': (dict(type='visionattn.ELA', variant='B'), 'after_conv2'),
}


@pytest.fixture(autouse=True)
def _mmdet_scope():
    init_default_scope('mmdet')


def _resnet(plugin, position, **kw):
    return MODELS.build(dict(type='ResNet', depth=50, out_indices=(0, 1, 2, 3), norm_eval=False, plugins=[
        dict(cfg=plugin, stages=(True,) * 4, position=position)], **kw))


def test_plugins_are_registered():
    for name, cls in (('CBAM', CBAMPlugin), ('TripletAttention', TripletAttentionPlugin), ('ELA', ELAPlugin)):
        assert MODELS.get(f'visionattn.{name}') is cls


@pytest.mark.parametrize('family,variant,att', [('cbam', 'resnet50_cbam', 'CBAM'),
                                                ('triplet', 'resnet50_triplet_attention', 'TripletAttention')])
def test_mmdet_resnet_with_plugin_has_the_official_keys(family, variant, att):
    """mmdet's ResNet-50 + plugin = the official ResNet-50 + module without its classifier, key for key."""
    bb = _resnet(dict(type=f'visionattn.{att}'), 'after_conv3')
    official = [(k, s) for k, s, _ in load_layout(family, variant)['state_dict'] if not k.startswith('fc.')]
    assert [(k, list(v.shape)) for k, v in bb.state_dict().items()] == official


def test_official_checkpoint_loads_into_mmdet_resnet(tmp_path):
    """The released-format CBAM file ({'state_dict': {'module.…'}}) through init_cfg Pretrained gives the official
    network's stage outputs."""
    ref = perturb_(REFERENCES[('cbam', 'resnet50_cbam')]()).double().eval()
    path = tmp_path / 'RESNET50_CBAM.pth'
    torch.save({'epoch': 100, 'arch': 'resnet', 'state_dict': {f'module.{k}': v for k, v in ref.state_dict().items()}},
               path)
    bb = _resnet(dict(type='visionattn.CBAM'), 'after_conv3', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    bb.init_weights()
    bb.double().eval()
    x = torch.randn(1, 3, 96, 128, dtype=torch.float64)
    with torch.no_grad():
        outs = bb(x)
        y = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        for i, out in enumerate(outs):
            y = getattr(ref, f'layer{i + 1}')(y)
            torch.testing.assert_close(out, y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('model_name', sorted(CASES))
def test_export_then_load_gives_identical_features(tmp_path, model_name, capsys):
    """tools/export.py --format mmdet-resnet -> mmdet ResNet + plugin (init_cfg Pretrained): every weight loaded,
    stage outputs identical to the visionattn model's."""
    torch.manual_seed(0)
    model = perturb_(timm.create_model(model_name, channels_last=False)).eval()  # NCHW as mmdet: same conv algorithms
    ckpt = tmp_path / 'cls.pth'
    torch.save({'arch': model_name, 'state_dict': model.state_dict()}, ckpt)
    assert export_tool.main([str(ckpt), '--format', 'mmdet-resnet', '-o', str(tmp_path / 'bb')]) == 0
    exported = torch.load(tmp_path / 'bb_mmdet_resnet.pth', weights_only=True)
    plugin, position = CASES[model_name]
    bb = _resnet(plugin, position, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'bb_mmdet_resnet.pth')))
    assert sorted(exported['state_dict']) == sorted(bb.state_dict())
    bb.init_weights()
    bb.eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        for out, exp in zip(bb(x), expected):
            torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)


def test_export_rejects_basic_block_resnets(tmp_path, capsys):
    model = timm.create_model('visionattn_resnet18_cbam')
    ckpt = tmp_path / 'r18.pth'
    torch.save({'arch': 'visionattn_resnet18_cbam', 'state_dict': model.state_dict()}, ckpt)
    assert export_tool.main([str(ckpt), '--format', 'mmdet-resnet']) == 2
    err = capsys.readouterr().err
    assert err.startswith('ERROR: --format mmdet-resnet: visionattn_resnet18_cbam: only the bottleneck ResNets')
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize('config', ['faster-rcnn_r50-cbam_fpn_1x_coco.py', 'retinanet_r50-triplet_fpn_1x_coco.py'])
def test_plugin_configs_loss_step_and_predict(config):
    cfg = Config.fromfile(str(ROOT / 'configs' / 'det' / config))
    assert cfg.model.backbone.type == 'ResNet' and cfg.model.backbone.init_cfg is None  # nothing downloads
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    plugin = CBAMPlugin if 'cbam' in config else TripletAttentionPlugin
    mods = [m for m in model.backbone.modules() if isinstance(m, plugin)]
    assert len(mods) == 16  # every bottleneck of ResNet-50
    model.train()
    data = model.data_preprocessor(_batch(model, (128, 160)), training=True)
    losses = model(**data, mode='loss')
    total = sum(v.sum() if isinstance(v, torch.Tensor) else sum(x.sum() for x in v) for v in losses.values())
    assert torch.isfinite(total)
    total.backward()
    trainable = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
    gate = [n for n, p in trainable if ('.cbam.' in n or '.triplet_attention.' in n) and p.grad is None]
    assert not gate, f'no gradient reached the attention of the trained stages: {gate[:4]}'
    model.eval()
    with torch.no_grad():
        res = model(**model.data_preprocessor(_batch(model, (128, 160)), training=False), mode='predict')
    assert len(res) == 1 and res[0].pred_instances.bboxes.shape[-1] == 4
