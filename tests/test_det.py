"""mmdet integration: ``visionattn.Backbone``, weight export, detection configs.

Needs the det extra (mmcv 2.1.0 with compiled ops, mmengine 0.10.7, mmdet 3.3.0): install it with
``bash tools/setup_det.sh``. Without it this module fails at collection with that instruction
(it does not skip). Every landed family (its smallest variant) is covered; a family lands here
by being registered (``visionattn.list_models()``).
"""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

try:
    import mmcv
    import mmdet
    import mmengine
    from mmcv.ops import nms  # noqa: F401  (compiled ops, needed by every detector's predict)
except ImportError as e:  # pragma: no cover - environment
    pytest.fail(
        f'tests/test_det.py needs the det extra (mmcv 2.1.0 with ops, mmengine 0.10.7, mmdet 3.3.0): run '
        f'`bash tools/setup_det.sh`. Import failed: {e}', pytrace=False)

import timm  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

import visionattn  # noqa: E402
import visionattn.det  # noqa: E402,F401
from visionattn.train import export as export_tool  # noqa: E402
from visionattn.det import VisionAttnBackbone, backbone_channels  # noqa: E402
from visionattn.det.convert import detection_model_kwargs  # noqa: E402
from visionattn.det.families import DET_FAMILIES, family_for, split_official_out_norms  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _tool(name):
    """Import tools/<name>.py under a private module name (tools/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f'_visionattn_tool_{name}', ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_shapes = _tool('make_shapes_dataset')

from layouts import LAYOUTS, load_layout, random_state_dict, wrap  # noqa: E402

# smallest variant per family: (model, official layout (dir, variant), det config stem or None)
SMALLEST = {
    'davit': ('visionattn_davit_tiny', ('davit', 'DaViT_tiny'), 'davit_tiny'),
    'twins_pcpvt': ('visionattn_twins_pcpvt_small', ('twins', 'pcpvt_small_v0'), 'twins_pcpvt_small'),
    'twins_svt': ('visionattn_twins_svt_small', ('twins', 'alt_gvt_small'), 'twins_svt_small'),
    'convit': ('visionattn_convit_tiny', ('convit', 'convit_tiny'), 'convit_tiny'),
    'nat': ('visionattn_nat_mini', ('nat', 'nat_mini'), 'nat_mini'),
    'dinat': ('visionattn_dinat_mini', ('nat', 'dinat_mini'), 'dinat_mini'),
    'dinat_s': ('visionattn_dinat_s_tiny', ('nat', 'dinat_s_tiny'), None),
    'nat_isotropic': ('visionattn_nat_isotropic_small', ('nat', 'nat_isotropic_small'), None),
    'ppma': ('visionattn_ppma_tiny', ('ppma', 'PPMAViT_T'), 'ppma_tiny'),
    'flatten_pvt': ('visionattn_flatten_pvt_tiny', ('flatten', 'flatten_pvt_t'), 'flatten_pvt_tiny'),
    'flatten_pvt_v2': ('visionattn_flatten_pvt_v2_b0', ('flatten', 'flatten_pvt_v2_b0'), None),
    'flatten_swin': ('visionattn_flatten_swin_tiny', ('flatten', 'flatten_swin_t'), 'flatten_swin_tiny'),
    'flatten_cswin': ('visionattn_flatten_cswin_tiny', ('flatten', 'flatten_cswin_t'), None),
    'agent_pvt': ('visionattn_agent_pvt_tiny', ('agent', 'agent_pvt_t'), 'agent_pvt_tiny'),
    'agent_swin': ('visionattn_agent_swin_tiny', ('agent', 'agent_swin_t'), 'agent_swin_tiny'),
    # no official Tiny detection config: the matrix runs BiFormer-T, the configs are the official BiFormer-S ones
    'biformer': ('visionattn_biformer_tiny', ('biformer', 'biformer_tiny'), 'biformer_small'),
    'cnn_attention': ('visionattn_resnet18_cbam', ('cbam', 'resnet18_cbam'), None),
}
REGISTERED = set(visionattn.list_models())
LANDED = [f for f, (m, _, _) in SMALLEST.items() if m in REGISTERED]
SIZE = (256, 320)  # non-square, what pad_size_divisor=32 produces


def _bb_cfg(model, **kw):
    return dict(type='visionattn.Backbone', model_name=model, **kw)


@pytest.fixture(scope='module')
def backbones():
    """One default backbone per landed family, built through mmdet's registry (eval mode)."""
    cache = {}

    def get(family):
        if family not in cache:
            torch.manual_seed(0)
            cache[family] = MODELS.build(_bb_cfg(SMALLEST[family][0])).eval()
        return cache[family]
    return get


def test_versions_and_every_family_has_a_recipe():
    assert mmcv.__version__ == '2.1.0' and mmengine.__version__ == '0.10.7' and mmdet.__version__ == '3.3.0'
    assert LANDED, 'no family landed'
    names = {f.name for f in DET_FAMILIES}
    assert set(SMALLEST) == names, 'SMALLEST must list the smallest variant of every DET_FAMILIES entry'
    for m in sorted(REGISTERED):
        fam = family_for(m)  # explicit line, or the generic recipe (with a warning)
        assert fam.matches(m)
    assert MODELS.get('visionattn.Backbone') is VisionAttnBackbone
    assert MODELS.get('VisionAttnBackbone') is VisionAttnBackbone


@pytest.mark.parametrize('family', LANDED)
def test_registry_build_channels_strides(family, backbones):
    model_name = SMALLEST[family][0]
    bb = backbones(family)
    assert isinstance(bb, VisionAttnBackbone)
    fam = family_for(model_name)
    feats = timm.create_model(model_name, features_only=True, pretrained=False, device='meta',
                              out_indices=tuple(bb._take), **detection_model_kwargs(model_name, {}))
    if fam.plain:  # stride-16 blocks; the simple pyramid makes strides 4..32 with the same channels
        assert bb.out_channels == feats.feature_info.channels()
        assert set(feats.feature_info.reduction()) == {16}
        assert bb.out_strides == [4, 8, 16, 32]
    else:
        assert bb.out_channels == feats.feature_info.channels()
        assert bb.out_strides == feats.feature_info.reduction() == [4, 8, 16, 32]
    assert backbone_channels(model_name) == bb.out_channels
    with torch.no_grad():
        outs = bb(torch.randn(1, 3, *SIZE))
    assert isinstance(outs, tuple) and len(outs) == 4
    for o, c, s in zip(outs, bb.out_channels, bb.out_strides):
        assert tuple(o.shape) == (1, c, SIZE[0] // s, SIZE[1] // s)
        assert torch.isfinite(o).all()
    assert (len(bb.out_norms) == 4) == (fam.out_norm_eps is not None)
    # a subset of levels
    sub = MODELS.build(_bb_cfg(model_name, out_indices=(1, 3), out_norms=False)).eval()
    with torch.no_grad():
        so = sub(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape[1:]) for o in so] == [(bb.out_channels[1], 8, 12), (bb.out_channels[3], 2, 3)]


@pytest.mark.parametrize('family', LANDED)
def test_small_and_odd_padded_sizes(family, backbones):
    bb = backbones(family)
    with torch.no_grad():
        for h, w in ((64, 96), (160, 224)):
            outs = bb(torch.randn(1, 3, h, w))
            assert [tuple(o.shape[2:]) for o in outs] == [(h // s, w // s) for s in bb.out_strides]


@pytest.mark.parametrize('family', LANDED)
def test_frozen_stages_and_norm_eval(family):
    model_name = SMALLEST[family][0]
    bb = MODELS.build(_bb_cfg(model_name, frozen_stages=2, norm_eval=True))
    probe = nn.BatchNorm2d(3)  # the landed families have no BatchNorm: check norm_eval on a probe
    bb.add_module('bn_probe', probe)
    bb.train()
    frozen = [m for k in range(3) for m in bb._stage_modules(k)]
    live = bb._stage_modules(3)
    assert frozen and live
    for m in frozen:
        assert not m.training
        assert all(not p.requires_grad for p in m.parameters())
    for m in live:
        assert m.training
        assert all(p.requires_grad for p in m.parameters())
    assert all(not p.requires_grad for p in bb.model._parameters.values() if p is not None)
    assert not probe.training
    bb.train(False)
    bb.train(True)  # still frozen after another .train()
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert not frozen[0].training and not probe.training
    # with norm_eval=False BatchNorms train
    bb2 = MODELS.build(_bb_cfg(model_name, frozen_stages=-1))
    bb2.add_module('bn_probe', nn.BatchNorm2d(3))
    bb2.train()
    assert bb2.bn_probe.training and all(p.requires_grad for p in bb2.parameters())
    with pytest.raises(ValueError, match='frozen_stages'):
        VisionAttnBackbone(model_name, frozen_stages=9, device='meta')


# timm CNNs: levels = the stride-4..32 feature_info taps, frozen_stages cut in forward order
CNN_STAGES = {  # model: (channels, stages' module names, official layout)
    'visionattn_resnet18_cbam': (
        [64, 128, 256, 512],
        [['conv1', 'bn1', 'act1', 'maxpool'], ['layer1'], ['layer2'], ['layer3'], ['layer4']],
        ('cbam', 'resnet18_cbam')),
    'visionattn_mobilenetv2_ela_l': (  # has ``blocks`` but is hierarchical
        [24, 32, 96, 320],
        [['conv_stem', 'bn1', 'blocks.0'], ['blocks.1'], ['blocks.2'], ['blocks.3', 'blocks.4'], ['blocks.5', 'blocks.6']],
        ('ela', 'mbv2_ela72')),
}


@pytest.mark.parametrize('model_name', [m for m in CNN_STAGES if m in REGISTERED])
def test_cnn_levels_and_frozen_stages(model_name, tmp_path):
    channels, stages, layout = CNN_STAGES[model_name]
    assert not family_for(model_name).plain and family_for(model_name).out_norm_eps is None
    bb = MODELS.build(_bb_cfg(model_name, frozen_stages=2, with_cp=True))
    assert bb.out_channels == channels and bb.out_strides == [4, 8, 16, 32] and not bb.out_norms
    assert bb.feature_info == [dict(num_chs=c, reduction=4 * 2 ** i, level=i) for i, c in enumerate(channels)]
    assert backbone_channels(model_name) == channels and bb.model.grad_checkpointing
    assert bb._stage_paths == stages
    assert not hasattr(bb.model, 'fc') or isinstance(bb.model.fc, nn.Identity)  # head pruned
    bb.train()
    named = dict(bb.model.named_modules())
    for k, paths in enumerate(stages):
        for path in paths:
            frozen = k <= 2
            assert all(p.requires_grad != frozen for p in named[path].parameters()), path
            assert all(m.training != frozen for m in named[path].modules()), path
    outs = bb(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape[1:]) for o in outs] == [(c, 16 // 2 ** i, 24 // 2 ** i) for i, c in enumerate(channels)]
    sum(o.sum() for o in outs).backward()
    assert all((p.grad is not None) == p.requires_grad for p in bb.model.parameters())
    # fewer levels: the tail is pruned, the stages of the pruned levels are empty
    sub = VisionAttnBackbone(model_name, out_indices=(0, 1), frozen_stages=4, device='meta')
    assert sub.out_channels == channels[:2] and not any(p for m in sub._stage_modules(4) for p in m.parameters())
    bns = [m for m in VisionAttnBackbone(model_name, norm_eval=True, device='meta').train().modules()
           if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    # the official container ({'state_dict': {'module.<official key>': ...}}) through the family filter
    sd = random_state_dict(load_layout(*layout))
    torch.save(wrap(sd, 'module'), tmp_path / 'official.pth')
    report = bb.load_pretrained(str(tmp_path / 'official.pth'))
    assert sorted(report.loaded) == sorted(bb.model.state_dict()) and not report.new
    assert sum(v.numel() for v in bb.model.state_dict().values()) == sum(
        v.numel() for k, v in sd.items() if not k.startswith(('fc.', 'classifier.', 'conv.', 'features.18.')))
    assert all(not p.requires_grad for p in bb._stage_modules(0)[0].parameters())  # still frozen


def test_generic_recipe_plain_guess():
    """Without a DET_FAMILIES line: plain only for one-stride models, not for a CNN with ``blocks``."""
    from visionattn.det.families import _generic_family
    for model_name, plain in (('visionattn_mobilenetv2_ela_l', False), ('visionattn_convit_tiny', True)):
        if model_name in REGISTERED:
            with pytest.warns(UserWarning, match='generic'):
                assert _generic_family.__wrapped__(model_name).plain is plain


def test_with_cp_same_output_and_grads():
    family = LANDED[0]
    model_name = SMALLEST[family][0]
    torch.manual_seed(0)
    a = VisionAttnBackbone(model_name, drop_path_rate=0.)
    torch.manual_seed(0)
    b = VisionAttnBackbone(model_name, drop_path_rate=0., with_cp=True)
    b.load_state_dict(a.state_dict())
    stages = getattr(b.model, 'stages', None) or [b.model]
    assert all(getattr(s, 'grad_checkpointing', False) for s in stages)
    x = torch.randn(1, 3, 64, 96)
    a.train(), b.train()
    ya, yb = a(x), b(x)
    for u, v in zip(ya, yb):
        torch.testing.assert_close(u, v)
    sum(o.sum() for o in yb).backward()
    assert all(p.grad is not None for p in b.model.parameters())


def test_errors():
    with pytest.raises(ValueError, match='visionattn_foo'):
        MODELS.build(_bb_cfg('visionattn_foo'))
    with pytest.raises(ValueError, match='registered visionattn model'):
        VisionAttnBackbone('resnet50')
    name = SMALLEST[LANDED[0]][0]
    with pytest.raises(ValueError, match='out_indices'):
        VisionAttnBackbone(name, out_indices=(2, 1), device='meta')
    with pytest.raises(ValueError, match='levels'):
        VisionAttnBackbone(name, out_indices=(0, 4), device='meta')
    with pytest.raises(ValueError, match='cannot be specified'):
        VisionAttnBackbone(name, pretrained='x.pth', init_cfg=dict(type='Pretrained', checkpoint='x.pth'))


# ------------------------------------------------------------------------------------------- weights
def _train_checkpoint(model_name, path, seed=0):
    """What tools/train.py saves: arch + state_dict + state_dict_ema (EMA differs from the raw weights)."""
    torch.manual_seed(seed)
    cls = timm.create_model(model_name, **detection_model_kwargs(model_name, {}))
    sd = cls.state_dict()
    ema = {k: (v + 0.01 * torch.randn_like(v)) if v.is_floating_point() else v.clone() for k, v in sd.items()}
    torch.save({'arch': model_name, 'epoch': 3, 'state_dict': sd, 'state_dict_ema': ema, 'optimizer': {}}, path)
    cls.load_state_dict(ema)
    return cls.eval()


@pytest.mark.parametrize('family', LANDED)
def test_export_roundtrip_matches_forward_intermediates(family, tmp_path, capsys):
    model_name = SMALLEST[family][0]
    ckpt = tmp_path / 'last.pth'
    cls = _train_checkpoint(model_name, ckpt)
    out = tmp_path / 'bb'
    assert export_tool.main([str(ckpt), '--model', model_name, '--ema', '-o', str(out)]) == 0
    report = capsys.readouterr().out
    head = cls.pretrained_cfg['classifier'].split('.')[0]  # 'head' ('head.fc'), 'fc', 'classifier'
    assert '100.0% of backbone values' in report and f'{head}.' in report  # classifier dropped, all covered
    mm = torch.load(str(out) + '_mmdet.pth')
    assert all(k.startswith('backbone.model.') for k in mm['state_dict'])
    assert not any(f'.{head}.' in k or k.startswith(f'backbone.model.{head}') for k in mm['state_dict'])

    x = torch.randn(1, 3, 96, 128)
    for path in (str(out) + '_mmdet.pth', str(out) + '.safetensors'):
        torch.manual_seed(123)  # a different random init: every key must be overwritten
        bb = MODELS.build(_bb_cfg(model_name, out_norms=False,
                                  init_cfg=dict(type='Pretrained', checkpoint=path)))
        bb.init_weights()
        bb.eval()
        own = bb.model.state_dict()
        ref = cls.state_dict()
        for k, v in own.items():  # no backbone key left at its random init
            torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)
        with torch.no_grad():
            outs = bb(x)
            inter = cls.forward_intermediates(x, indices=bb._take, intermediates_only=True)
        if bb.plain:
            with torch.no_grad():
                raw = bb.model.forward_intermediates(x, indices=bb._take, intermediates_only=True)
            for r, i in zip(raw, inter):
                torch.testing.assert_close(r, i, rtol=0, atol=0)
            torch.testing.assert_close(outs[2], inter[2], rtol=0, atol=0)  # level 2 = stride 16, identity
        else:
            for o, i in zip(outs, inter):
                torch.testing.assert_close(o, i, rtol=0, atol=0)


@pytest.mark.parametrize('family', LANDED)
def test_official_checkpoint_through_family_filter(family, tmp_path):
    model_name, (fam_dir, variant), _ = SMALLEST[family]
    if not (LAYOUTS / fam_dir / f'{variant}.json').exists():
        pytest.fail(f'official layout {fam_dir}/{variant}.json missing from the specs')
    sd = random_state_dict(load_layout(fam_dir, variant))
    path = tmp_path / 'official.pth'
    torch.save(wrap(sd, 'model'), path)
    bb = VisionAttnBackbone(model_name, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    bb.init_weights()
    # every backbone tensor now comes from the file (random N(0, .02) values, not the model's init)
    values = {tuple(v.flatten()[:4].tolist()) for v in sd.values() if v.numel() >= 4}
    for k, v in bb.model.state_dict().items():
        if v.numel() >= 4:
            assert tuple(v.flatten()[:4].tolist()) in values, f'{k} was not loaded'
    # a missing backbone key is an error naming it
    key = next(k for k in sd if any(part in k for part in ('.mlp.', '.attn.', '.retention.')))
    broken = {k: v for k, v in sd.items() if k != key}
    torch.save(broken, tmp_path / 'broken.pth')
    bad = VisionAttnBackbone(model_name, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'broken.pth')))
    with pytest.raises(ValueError, match='missing'):
        bad.init_weights()


def test_detector_checkpoint_loads_backbone_and_out_norms(tmp_path):
    model_name = SMALLEST[LANDED[0]][0]
    src = VisionAttnBackbone(model_name)
    with torch.no_grad():
        for p in src.out_norms.parameters():
            p.add_(torch.randn_like(p))
    det = {'meta': {}, 'state_dict': {**{'backbone.' + k: v for k, v in src.state_dict().items()},
                                      'neck.lateral_convs.0.conv.weight': torch.zeros(1)}}
    torch.save(det, tmp_path / 'epoch_12.pth')
    dst = VisionAttnBackbone(model_name, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'epoch_12.pth')))
    dst.init_weights()
    for k, v in dst.state_dict().items():
        torch.testing.assert_close(v, src.state_dict()[k], rtol=0, atol=0, msg=k)


def test_export_errors(tmp_path, capsys):
    model_name = SMALLEST[LANDED[0]][0]
    ckpt = tmp_path / 'c.pth'
    _train_checkpoint(model_name, ckpt)
    assert export_tool.main([str(ckpt), '--model', 'visionattn_nope']) == 2
    assert 'unknown architecture' in capsys.readouterr().err
    other = next(m for f, (m, _, _) in SMALLEST.items() if f in LANDED and m != model_name) if len(LANDED) > 1 else None
    if other:
        assert export_tool.main([str(ckpt), '--model', other]) == 2
        assert 'was trained as' in capsys.readouterr().err
        raw = tmp_path / 'raw.pth'
        torch.save(torch.load(ckpt)['state_dict'], raw)
        assert export_tool.main([str(raw), '--model', other]) == 2  # the filter rejects another architecture
        assert 'cannot be loaded' in capsys.readouterr().err
    sd = torch.load(ckpt)['state_dict']
    sd.pop(next(k for k in sd if k.startswith('stages.') or k.startswith('blocks.')))
    torch.save({'state_dict': sd}, tmp_path / 'missing.pth')
    assert export_tool.main([str(tmp_path / 'missing.pth'), '--model', model_name]) == 2
    assert 'missing' in capsys.readouterr().err
    torch.save({'arch': model_name, 'state_dict': sd}, tmp_path / 'noema.pth')
    assert export_tool.main([str(tmp_path / 'noema.pth'), '--ema']) == 2
    assert 'EMA' in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- detectors
def _config(family, det='retinanet'):
    model_name, _, stem = SMALLEST[family]
    cfg = Config.fromfile(str(ROOT / 'configs' / 'det' / f'{det}_{stem or "davit_tiny"}_fpn_1x_coco.py'))
    if stem is None:
        cfg.model.backbone.model_name = model_name
        cfg.model.neck.in_channels = backbone_channels(model_name)
    return cfg


def _batch(model, size, n_obj=3, masks=False):
    h, w = size
    sample = DetDataSample(metainfo=dict(img_shape=size, ori_shape=size, pad_shape=size, scale_factor=(1., 1.),
                                         batch_input_shape=size))
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(n_obj, 2, generator=g) * torch.tensor([w * .6, h * .6])
    wh = 24 + torch.rand(n_obj, 2, generator=g) * 60
    inst = InstanceData(bboxes=torch.cat([xy, xy + wh], 1), labels=torch.tensor([0, 5, 17][:n_obj]))
    if masks:
        from mmdet.structures.mask import BitmapMasks
        m = torch.zeros(n_obj, h, w, dtype=torch.uint8)
        for i, b in enumerate(inst.bboxes.int().tolist()):
            m[i, b[1]:b[3], b[0]:b[2]] = 1
        inst.masks = BitmapMasks(m.numpy(), h, w)
    sample.gt_instances = inst
    img = (torch.rand(3, h, w, generator=g) * 255).to(torch.uint8)
    return dict(inputs=[img], data_samples=[sample])


@pytest.mark.parametrize('family', LANDED)
def test_retinanet_loss_step_and_predict(family):
    _retinanet_loss_step_and_predict(family, SIZE)


@pytest.mark.parametrize('family', [f for f in ('flatten_swin', 'agent_swin') if f in LANDED])
def test_retinanet_at_detection_resolution(family):
    """A family whose classifiers are tied to their training size, at a COCO-like 800x1216: the learned
    encodings / agent biases follow the map, the global stages stay global."""
    _retinanet_loss_step_and_predict(family, (800, 1216))


def _retinanet_loss_step_and_predict(family, size):
    cfg = _config(family)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert isinstance(model.backbone, VisionAttnBackbone)
    assert list(cfg.model.neck.in_channels) == model.backbone.out_channels
    model.train()
    data = model.data_preprocessor(_batch(model, size), training=True)
    assert tuple(data['inputs'].shape[-2:]) == size
    losses = model(**data, mode='loss')
    total = sum(v.sum() if isinstance(v, torch.Tensor) else sum(x.sum() for x in v) for v in losses.values())
    assert all(torch.isfinite(v if isinstance(v, torch.Tensor) else torch.stack(v)).all() for v in losses.values())
    total.backward()
    grads = {k: p.grad for k, p in model.backbone.model.named_parameters()}
    missing = [k for k, g in grads.items() if g is None]
    assert not missing, f'no gradient reached {missing[:5]}'
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(g.abs().sum() for g in grads.values()) > 0
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(_batch(model, size), training=False)
        res = model(**data, mode='predict')
    assert len(res) == 1 and res[0].pred_instances.bboxes.shape[-1] == 4


@pytest.mark.parametrize('family', [f for f in ('twins_svt', 'agent_pvt', 'agent_swin', 'biformer') if f in LANDED] or LANDED[:1])
def test_mask_rcnn_loss_step(family):
    cfg = _config(family, 'mask-rcnn')
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    data = model.data_preprocessor(_batch(model, (128, 160), masks=True), training=True)
    losses = model(**data, mode='loss')
    assert {'loss_rpn_cls', 'loss_cls', 'loss_bbox', 'loss_mask'} <= set(losses)
    total = sum(v.sum() if isinstance(v, torch.Tensor) else sum(x.sum() for x in v) for v in losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for p in model.backbone.model.parameters())


def test_all_configs_build_with_right_channels_and_no_decay():
    from mmengine.optim import build_optim_wrapper
    cfgs = {p: Config.fromfile(str(p)) for p in sorted((ROOT / 'configs' / 'det').glob('*_coco.py'))}
    ours = {p: c for p, c in cfgs.items() if c.model.backbone.type == 'visionattn.Backbone'}
    # the others are mmdet ResNet + visionattn plugin configs, covered by tests/test_det_plugins.py
    assert all(c.model.backbone.type == 'ResNet' and c.model.backbone.plugins for p, c in cfgs.items() if p not in ours)
    assert len(ours) == 2 * sum(1 for _, _, stem in SMALLEST.values() if stem)
    for path, cfg in ours.items():
        bb = cfg.model.backbone
        lr, wd = OFFICIAL_OPTIM.get(path.name, (1e-4, 0.05))
        assert cfg.optim_wrapper.optimizer.type == 'AdamW' and cfg.optim_wrapper.optimizer.lr == lr, path.name
        assert cfg.optim_wrapper.optimizer.weight_decay == wd, path.name
        if bb.model_name not in REGISTERED:
            continue
        assert list(cfg.model.neck.in_channels) == backbone_channels(bb.model_name), path.name
        fam = family_for(bb.model_name)
        paramwise = cfg.optim_wrapper.get('paramwise_cfg')
        if paramwise is None:  # the official recipe decays everything (Agent-PVT)
            assert path.name in OFFICIAL_OPTIM and not fam.no_decay, path.name
            continue
        keys = paramwise.custom_keys
        assert paramwise.norm_decay_mult == 0 and all(keys[k]['decay_mult'] == 0 for k in fam.no_decay), path.name
    # no decay on norms and position tables, decay on weights, in a real optimizer
    cfg = _config(LANDED[0])
    model = MODELS.build(cfg.model)
    ow = build_optim_wrapper(model, cfg.optim_wrapper)
    decay = {id(p): g['weight_decay'] for g in ow.optimizer.param_groups for p in g['params']}
    for name, p in model.backbone.named_parameters():
        if '.norm' in name or 'out_norms' in name or any(k in name for k in family_for(cfg.model.backbone.model_name).no_decay):
            assert decay[id(p)] == 0, name
    nd = [n for n, p in model.backbone.named_parameters() if p.ndim > 1 and decay[id(p)] > 0]
    assert nd, 'weights must be decayed'


# ------------------------------------------------------------------------------------------- agent attention
# the official COCO recipes (LeapLabTHU/Agent-Attention downstream/detection/configs/agent_{pvt,swin}/*): lr, wd
OFFICIAL_OPTIM = {
    'retinanet_agent_pvt_tiny_fpn_1x_coco.py': (1e-4, 1e-4),    # agent_pvt_t_rtn_1x_12-16-28-28.py
    'mask-rcnn_agent_pvt_tiny_fpn_1x_coco.py': (2e-4, 1e-4),    # agent_pvt_t_mrcnn_1x_12-16-28-28.py
    'retinanet_agent_swin_tiny_fpn_1x_coco.py': (1e-4, 0.05),   # derived from the Mask R-CNN one (no official)
    'mask-rcnn_agent_swin_tiny_fpn_1x_coco.py': (1e-4, 0.05),   # agent_swin_t_mrcnn_1x_9-12-14-7.py
    # rayleizhu/BiFormer object_detection/configs/coco/*.1x.biformer_small.py
    'retinanet_biformer_small_fpn_1x_coco.py': (1e-4, 1e-4),    # retinanet.1x.biformer_small.py (no paramwise_cfg)
    'mask-rcnn_biformer_small_fpn_1x_coco.py': (1e-4, 0.05),    # maskrcnn.1x.biformer_small.py
}
# downstream_agent_shapes of the official configs (file suffixes 12-16-28-28 / 9-12-14-7)
AGENT_DET_SHAPES = {'agent_pvt': [(12, 12), (16, 16), (28, 28), (28, 28)],
                    'agent_swin': [(9, 9), (12, 12), (14, 14), (7, 7)]}
# custom_keys with decay_mult 0 of the official agent_swin_t_mrcnn_1x_9-12-14-7.py, less 'norm' (norm_decay_mult=0
# here) and 'absolute_pos_embed' (ape=False: no such parameter)
AGENT_SWIN_NO_DECAY = ('relative_position_bias_table', 'an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias')
AGENT_FAMILIES = [f for f in AGENT_DET_SHAPES if f in LANDED]


@pytest.mark.parametrize('family', AGENT_FAMILIES)
def test_agent_backbone_uses_the_official_downstream_agent_shapes(family, backbones, monkeypatch):
    """Every agent block pools the official dense-task grid, at a non-square size; the grid changes the
    features (the same weights with the classification grids give other outputs)."""
    from visionattn.layers.agent_attention import AgentAttention
    bb = copy.deepcopy(backbones(family))
    assert bb.model.dynamic_img_size
    attns = {}
    for name, m in bb.model.named_modules():
        if isinstance(m, AgentAttention):
            attns.setdefault(int(name.split('.')[1]), []).append(m)
    # Agent-PVT: every stage agent (AAAA); Agent-Swin: AAAB, stage 4 is Swin window attention
    assert sorted(attns) == ([0, 1, 2, 3] if family == 'agent_pvt' else [0, 1, 2])
    assert sum(map(len, attns.values())) == (8 if family == 'agent_pvt' else 10)
    for stage, mods in attns.items():
        assert all(m.agent_shape == AGENT_DET_SHAPES[family][stage] for m in mods), stage
        assert all(m.agent_num == (9, 16, 49, 49)[stage] for m in mods), stage  # the trained agent count
    with torch.no_grad():  # peaked softmaxes: at the N(0, .02) init the agent grid barely changes the outputs
        for p in (p for mods in attns.values() for m in mods for p in m.parameters()):
            p.normal_(0, 0.3)
    # every agent block pools its whole stage map (64x80 .. 8x10 at 256x320) to those grids
    seen = []
    import visionattn.layers.agent_attention as agent_layer
    real_pool = agent_layer.adaptive_avg_pool_tokens

    def spy(x, size):  # x: the NHWC patch map
        seen.append((tuple(x.shape[1:3]), tuple(size)))
        return real_pool(x, size)
    monkeypatch.setattr(agent_layer, 'adaptive_avg_pool_tokens', spy)
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        outs = bb(x)
    monkeypatch.undo()
    assert [tuple(o.shape[2:]) for o in outs] == [(64, 80), (32, 40), (16, 20), (8, 10)]
    assert all(torch.isfinite(o).all() for o in outs)
    assert seen == [((SIZE[0] // 4 >> s, SIZE[1] // 4 >> s), AGENT_DET_SHAPES[family][s])
                    for s in sorted(attns) for _ in attns[s]]
    # the classification grids (sqrt(n) x sqrt(n)) on the same weights give other features
    cls_grid = MODELS.build(_bb_cfg(SMALLEST[family][0], agent_shapes=None)).eval()
    cls_grid.load_state_dict(bb.state_dict())
    with torch.no_grad():
        other = cls_grid(x)
    for a, b in zip(outs, other):
        assert (a - b).abs().max() > 0.05 * a.abs().max()


def test_agent_family_lines():
    """Agent-Swin: a LayerNorm (eps 1e-5, nn.LayerNorm's default, official norm{i}) per output; Agent-PVT: raw
    stage maps; both resize to the input."""
    for family, model_name in (('agent_swin', 'visionattn_agent_swin_small'),
                               ('agent_pvt', 'visionattn_agent_pvt_large'),
                               ('agent_pvt', 'visionattn_agent_pvt_medium_256')):
        fam = family_for(model_name)
        assert fam.name == family and not fam.plain and fam.module == 'visionattn.models.agent'
        kwargs = detection_model_kwargs(model_name, {})
        assert kwargs['dynamic_img_size'] is True
        assert [tuple(s) for s in kwargs['agent_shapes']] == AGENT_DET_SHAPES[family]
        assert detection_model_kwargs(model_name, dict(agent_shapes=None))['agent_shapes'] is None  # user wins
    assert family_for('visionattn_agent_swin_tiny').out_norm_eps == 1e-5
    assert family_for('visionattn_agent_pvt_tiny').out_norm_eps is None
    assert set(family_for('visionattn_agent_swin_tiny').no_decay) == set(AGENT_SWIN_NO_DECAY)
    assert family_for('visionattn_agent_pvt_tiny').no_decay == ()
    for m in REGISTERED:  # the patterns take every Agent-PVT / Agent-Swin variant and nothing else
        agent = [f.name for f in DET_FAMILIES if f.matches(m) and f.name.startswith('agent_')]
        prefix = next((f for f in ('agent_pvt', 'agent_swin') if m.startswith(f'visionattn_{f}_')), None)
        assert agent == ([prefix] if prefix else []), m


@pytest.mark.parametrize('det', ['retinanet', 'mask-rcnn'])
@pytest.mark.parametrize('family', AGENT_FAMILIES)
def test_agent_configs_official_optimizer_and_pipeline(family, det):
    """The configs build a real optimizer with the official settings: Agent-Swin no decay exactly on the norms,
    relative_position_bias_table and the six agent biases (each key matches parameters); Agent-PVT wd 1e-4 on
    every parameter; drop path 0.1; the training pipeline builds (Agent-Swin Mask R-CNN: multi-scale + crop)."""
    from mmengine.dataset import Compose
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = _config(family, det)
    name = f'{det}_{SMALLEST[family][2]}_fpn_1x_coco.py'
    lr, wd = OFFICIAL_OPTIM[name]
    assert cfg.model.backbone.drop_path_rate == 0.1 and cfg.model.backbone.model_name == SMALLEST[family][0]
    model = MODELS.build(cfg.model)
    ow = build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper))
    assert type(ow.optimizer).__name__ == 'AdamW'
    group = {id(p): g for g in ow.optimizer.param_groups for p in g['params']}
    assert all(g['lr'] == lr for g in group.values())
    no_decay = AGENT_SWIN_NO_DECAY if family == 'agent_swin' else ()
    hits = {k: 0 for k in no_decay}
    norms = {id(p) for m in model.backbone.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    assert norms
    for pname, p in model.backbone.named_parameters():
        keys = [k for k in no_decay if k in pname]
        for k in keys:
            hits[k] += 1
        expect = 0. if (keys or id(p) in norms) and family == 'agent_swin' else wd
        assert group[id(p)]['weight_decay'] == expect, pname
    assert all(hits.values()), hits  # every official key names real parameters
    if family == 'agent_swin':
        assert len(model.backbone.out_norms) == 4 and all(
            group[id(p)]['weight_decay'] == 0 for p in model.backbone.out_norms.parameters())
    pipeline = cfg.train_dataloader.dataset.pipeline
    with DefaultScope.overwrite_default_scope('mmdet'):
        assert len(Compose(pipeline).transforms) == len(pipeline)
    multi_scale = [t for t in pipeline if t['type'] == 'RandomChoice']
    assert bool(multi_scale) == (family == 'agent_swin' and det == 'mask-rcnn')
    if multi_scale:
        first, second = multi_scale[0]['transforms']
        assert [tuple(s) for s in first[0]['scales']] == [(480 + 32 * i, 1333) for i in range(11)]
        assert [t['type'] for t in second] == ['RandomChoiceResize', 'RandomCrop', 'RandomChoiceResize']
        assert tuple(second[1]['crop_size']) == (384, 600)


# ------------------------------------------------------------------------------------------- BiFormer
BIFORMER_BNS = ['stages.1.downsample.norm', 'stages.2.downsample.norm', 'stages.3.downsample.norm', 'stem.proj.1',
                'stem.proj.4']


def test_biformer_family_line():
    """BiFormer_mm: n_win 16 and auto_pad (every official detection config), a LayerNorm2d (eps 1e-6) per output
    (official extra_norms.{i}); T / S / B only (the STL variants have no official detection backbone)."""
    from timm.layers import LayerNorm2d
    from visionattn.layers.bilevel_routing_attention import BiLevelRoutingAttention
    for model_name in ('visionattn_biformer_tiny', 'visionattn_biformer_small', 'visionattn_biformer_base'):
        fam = family_for(model_name)
        assert fam in DET_FAMILIES and fam.name == 'biformer' and fam.module == 'visionattn.models.biformer'
        assert fam.out_norm_eps == 1e-6 and not fam.plain and fam.no_decay == ()
        assert fam.official_out_norms == 'extra_norms.{i}'
        kwargs = detection_model_kwargs(model_name, {})
        assert kwargs['n_win'] == 16 and kwargs['auto_pad'] is True
    assert detection_model_kwargs('visionattn_biformer_small', dict(n_win=8))['n_win'] == 8  # user wins (ADE20k: 8)
    for model_name in ('visionattn_biformer_stl', 'visionattn_biformer_stl_nchw'):
        if model_name in REGISTERED:
            assert family_for(model_name) not in DET_FAMILIES  # the generic recipe
    bb = VisionAttnBackbone('visionattn_biformer_small', device='meta')
    attns = [m for m in bb.model.modules() if isinstance(m, BiLevelRoutingAttention)]
    assert len(attns) == 4 + 4 + 18 and all(m.n_win == 16 and m.auto_pad for m in attns)
    assert [type(m) for m in bb.out_norms.values()] == [LayerNorm2d] * 4
    assert [(m.normalized_shape, m.eps) for m in bb.out_norms.values()] == [((c,), 1e-6) for c in (64, 128, 256, 512)]


def test_official_detection_out_norm_names():
    """An official detection checkpoint's per-output norms (BiFormer extra_norms.{i}, PPMA outnorm{i}) are the
    wrapper's out_norms.{i}; nothing else moves."""
    w = [torch.full((2,), float(i)) for i in range(4)]
    cls_sd = {'stages.0.0.norm1.weight': w[0], 'extra_norms.0.weight': w[1], 'extra_norms.3.bias': w[2],
              'outnorm2.weight': w[3]}
    cls, det = split_official_out_norms(family_for('visionattn_biformer_small'), cls_sd, {})
    assert list(cls) == ['stages.0.0.norm1.weight', 'outnorm2.weight']
    assert det == {'out_norms.0.weight': w[1], 'out_norms.3.bias': w[2]}
    cls, det = split_official_out_norms(family_for('visionattn_ppma_tiny'), cls_sd, {'out_norms.1.bias': w[0]})
    assert list(cls) == ['stages.0.0.norm1.weight', 'extra_norms.0.weight', 'extra_norms.3.bias']
    assert det == {'out_norms.1.bias': w[0], 'out_norms.2.weight': w[3]}
    cls, det = split_official_out_norms(family_for('visionattn_davit_tiny'), cls_sd, {})
    assert cls == cls_sd and det == {}


def test_biformer_frozen_stages_and_norm_eval_on_its_batchnorms():
    """The BatchNorms of the stem and the downsamplers stay in eval mode with norm_eval (BiFormer_mm's default) and
    keep their statistics; frozen_stages=1 freezes the stem, stage 1 and its output norm only."""
    bb = MODELS.build(_bb_cfg('visionattn_biformer_tiny', frozen_stages=1, norm_eval=True)).train()
    bns = {n: m for n, m in bb.model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert sorted(bns) == BIFORMER_BNS and not any(m.training for m in bns.values())
    stats = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in bns.items()}
    frozen = [bb.model.stem, bb.model.stages[0], bb.out_norms['0']]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in (bb.model.stages[1], bb.out_norms['1']) for p in m.parameters())
    assert bb.model.stages[1].downsample.norm.weight.requires_grad  # trainable, statistics frozen
    outs = bb(torch.randn(2, 3, 64, 96))
    sum(o.sum() for o in outs).backward()
    for n, m in bns.items():
        assert torch.equal(m.running_mean, stats[n][0]) and torch.equal(m.running_var, stats[n][1]), n
    assert bb.model.stages[1].downsample.norm.weight.grad is not None
    live = MODELS.build(_bb_cfg('visionattn_biformer_tiny', norm_eval=False)).train()
    assert all(m.training for m in live.modules() if isinstance(m, nn.BatchNorm2d))


def _perturb(module, seed):
    """Every parameter and buffer of ``module`` randomised (norm weights near 1, BN variances in [0.5, 1.5])."""
    g = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in module.modules() if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d))}
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g, dtype=t.dtype)
            if name.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
            elif id(t) in norms:
                t.copy_(1 + 0.2 * r)
            else:
                t.copy_(r * (0.5 / max(1, t[0].numel()) ** 0.5 if t.ndim > 1 else 0.1))
    return module


def test_biformer_backbone_equals_official_detection_backbone_float64(tmp_path):
    """The detection backbone (family kwargs: n_win 16, auto_pad) equals BiFormer_mm's forward_features (the
    transcription, extra norms included) at a size that is no multiple of anything, every parameter perturbed; the
    weights reach it as an official classification checkpoint ('model', with norm / head; issue #49)."""
    import biformer_reference as ref
    torch.manual_seed(0)
    reference = _perturb(ref.build_reference('biformer_tiny', n_win=16, auto_pad=True).to(torch.float64), 0).eval()
    extra_norms = _perturb(ref.build_extra_norms(reference).to(torch.float64), 1).eval()
    torch.save({'model': reference.state_dict(), 'epoch': 300}, tmp_path / 'biformer_tiny_in1k.pth')
    bb = VisionAttnBackbone('visionattn_biformer_tiny', drop_path_rate=0.,
                            init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'biformer_tiny_in1k.pth')))
    bb = bb.to(torch.float64)
    bb.init_weights()
    for i, norm in enumerate(extra_norms):  # official extra_norms.{i} -> out_norms.{i}
        bb.out_norms[str(i)].load_state_dict(norm.state_dict())
    bb.eval()
    x = torch.randn(1, 3, 200, 264, dtype=torch.float64)
    with torch.no_grad():
        want = ref.reference_backbone_outputs(reference, x, extra_norms)
        got = bb(x)
    assert [tuple(o.shape) for o in got] == [(1, 64, 50, 66), (1, 128, 25, 33), (1, 256, 13, 17), (1, 512, 7, 9)]
    for i, (a, b) in enumerate(zip(got, want)):
        assert b.abs().max() > 0.1  # not degenerate
        assert (a - b).abs().max().item() < 1e-10, i
    with torch.no_grad():  # the raw stage outputs too (out_norms=False)
        raw = bb.model.forward_intermediates(x, indices=bb._take, intermediates_only=True)
        for a, b in zip(raw, ref.reference_backbone_outputs(reference, x)):
            assert (a - b).abs().max().item() < 1e-10


def test_biformer_official_classification_checkpoint(tmp_path):
    """biformer_small_in1k.pth ('model'; issue #49: head / norm unexpected, extra_norms missing, officially loaded
    with strict=False): every backbone tensor loads, head and the BatchNorm norm are dropped, the four output norms
    are new (reported), and the report says so."""
    sd = random_state_dict(load_layout('biformer', 'biformer_small'))
    torch.save(wrap(sd, 'model'), tmp_path / 'biformer_small_in1k.pth')
    bb = VisionAttnBackbone('visionattn_biformer_small')
    report = bb.load_pretrained(str(tmp_path / 'biformer_small_in1k.pth'))
    assert sorted(report.loaded) == sorted(bb.model.state_dict())
    assert sorted(report.dropped) == sorted(['head.fc.weight', 'head.fc.bias'] + [  # official head.* is head.fc.*
        f'norm.{p}' for p in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')])
    assert sorted(report.new) == sorted(f'out_norms.{i}.{p}' for i in range(4) for p in ('weight', 'bias'))
    assert sum(v.numel() for v in bb.model.state_dict().values()) == sum(
        v.numel() for k, v in sd.items() if not k.startswith(('head.', 'norm.')))
    torch.testing.assert_close(bb.model.stages[2].blocks[17].mlp.fc2.weight, sd['stages.2.17.mlp.3.weight'],
                               rtol=0, atol=0)


@pytest.mark.parametrize('family', ['biformer', 'ppma'])
def test_official_detection_checkpoint(family, tmp_path):
    """An official mmdet 2.x detector checkpoint ({'state_dict': {'backbone.<official key>', neck, heads}}: BiFormer_mm,
    Backbone_PPMAViT; no head / final norm) loads whole: the backbone through the family filter, the official
    per-output norms (extra_norms.{i} / outnorm{i}) as out_norms.{i}."""
    model_name, layout, _ = SMALLEST[family]
    head = ('head.', 'norm.', 'avgpool.', 'proj.', 'swish.')
    sd = {k: v for k, v in random_state_dict(load_layout(*layout)).items() if not k.startswith(head)}
    template = family_for(model_name).official_out_norms
    extra = {template.format(i=i) + f'.{p}': torch.randn(c) for i, c in enumerate((64, 128, 256, 512))
             for p in ('weight', 'bias')}
    det = {'meta': {}, 'state_dict': {**{'backbone.' + k: v for k, v in {**sd, **extra}.items()},
                                      'neck.lateral_convs.0.conv.weight': torch.zeros(1)}}
    torch.save(det, tmp_path / 'detector.pth')
    bb = VisionAttnBackbone(model_name)
    report = bb.load_pretrained(str(tmp_path / 'detector.pth'))
    assert sorted(report.loaded) == sorted(bb.model.state_dict()) and not report.new
    for i in range(4):
        for p in ('weight', 'bias'):
            torch.testing.assert_close(getattr(bb.out_norms[str(i)], p), extra[template.format(i=i) + f'.{p}'],
                                       rtol=0, atol=0)


@pytest.mark.parametrize('det', ['retinanet', 'mask-rcnn'])
def test_biformer_configs_official_recipe(det):
    """The official BiFormer-S recipes: drop path 0.2, norm_eval, native AMP with a static loss scale of 512, AdamW
    lr 1e-4; Mask R-CNN: wd 0.05 except where the official key 'norm' matches (the LayerNorms: norm1 / norm2 and the
    output norms), the stem / downsampler BatchNorms (officially downsample_layers.i.j) decayed; RetinaNet: wd 1e-4
    on every parameter, find_unused_parameters (FPN start_level=1 leaves the stride-4 output unused)."""
    from mmengine.optim import build_optim_wrapper
    cfg = _config('biformer', det)
    bb_cfg = cfg.model.backbone
    assert bb_cfg.model_name == 'visionattn_biformer_small' and bb_cfg.drop_path_rate == 0.2 and bb_cfg.norm_eval
    assert bb_cfg.frozen_stages == -1 and list(cfg.model.neck.in_channels) == [64, 128, 256, 512]
    ow_cfg = copy.deepcopy(cfg.optim_wrapper)
    assert ow_cfg.type == 'AmpOptimWrapper' and ow_cfg.loss_scale == 512.
    assert cfg.get('find_unused_parameters', False) == (det == 'retinanet')
    assert cfg.train_cfg.max_epochs == 12 and cfg.param_scheduler[1].milestones == [8, 11]
    ow_cfg.type = 'OptimWrapper'  # AmpOptimWrapper needs a GPU; the parameter groups are the same
    ow_cfg.pop('loss_scale')
    model = MODELS.build(cfg.model)
    assert model.backbone.model.stages[3].blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    ow = build_optim_wrapper(model, ow_cfg)
    assert type(ow.optimizer).__name__ == 'AdamW'
    group = {id(p): g for g in ow.optimizer.param_groups for p in g['params']}
    assert all(g['lr'] == 1e-4 and g['betas'] == (0.9, 0.999) for g in group.values())
    wd = 0.05 if det == 'mask-rcnn' else 1e-4
    layer_norms = {id(p) for m in model.backbone.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    batch_norms = {id(p) for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert len(layer_norms) == 2 * (2 * (4 + 4 + 18 + 4) + 4) and len(batch_norms) == 2 * len(BIFORMER_BNS)
    for name, p in model.named_parameters():
        expect = 0. if det == 'mask-rcnn' and id(p) in layer_norms else wd
        assert group[id(p)]['weight_decay'] == pytest.approx(expect), name


def test_shapes_config_and_dataset(tmp_path):
    cfgs = sorted((ROOT / 'configs' / 'det').glob('*shapes*.py'))
    assert cfgs, 'the embedded shapes job config is missing'
    cfg = Config.fromfile(str(cfgs[0]))
    root = make_shapes.ensure_dataset(str(tmp_path / 'shapes'), num_train=6, num_val=2, size=cfg.shapes_dataset.get('size', 160))
    from pycocotools.coco import COCO
    coco = COCO(os.path.join(root, 'annotations', 'train.json'))
    assert len(coco.getImgIds()) == 6 and coco.getAnnIds() and len(coco.getCatIds()) == 3
    ann = coco.loadAnns(coco.getAnnIds())[0]
    assert coco.annToMask(ann).sum() > 0 and len(ann['bbox']) == 4
    assert cfg.model.backbone.model_name in REGISTERED
    bb = VisionAttnBackbone(**{k: v for k, v in cfg.model.backbone.items() if k != 'type'})
    assert list(cfg.model.neck.in_channels) == bb.out_channels


class _WritesMarker:
    """Unpickling this creates the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def _det_train(*args, timeout=600):
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'det_train.py'), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD='1', OMP_NUM_THREADS='2'))
    return proc.returncode, proc.stdout + proc.stderr


def test_malicious_checkpoint_never_runs_in_the_backbone(tmp_path):
    marker, evil = tmp_path / 'pwned', tmp_path / 'evil.pth'
    torch.save({'state_dict': {'x': torch.zeros(1)}, 'payload': _WritesMarker(str(marker))}, evil)
    bb = VisionAttnBackbone(SMALLEST[LANDED[0]][0], init_cfg=dict(type='Pretrained', checkpoint=str(evil)))
    with pytest.raises(ValueError, match='pickles Python objects other than tensors'):
        bb.init_weights()
    assert not marker.exists()


def test_det_train_resumes_its_own_checkpoints_and_refuses_malicious_ones(tmp_path):
    """The embedded job, 2 + 2 iterations on 6 images: its checkpoints load with weights_only=True and resume;
    a malicious file as --pretrained, load_from or --resume is one ERROR line (exit 2) and never runs."""
    data = tmp_path / 'shapes'
    cfg = tmp_path / 'tiny.py'
    cfg.write_text(
        f"_base_ = [{str(ROOT / 'configs' / 'det' / 'retinanet_davit_shapes.py')!r}]\n"
        f"shapes_dataset = dict(root={str(data)!r}, num_train=6, num_val=2, size=96, seed=0)\n"
        f"train_dataloader = dict(batch_size=2, dataset=dict(data_root={str(data) + '/'!r}))\n"
        f"val_dataloader = dict(batch_size=2, dataset=dict(data_root={str(data) + '/'!r}))\n"
        "test_dataloader = val_dataloader\n"
        f"val_evaluator = dict(ann_file={str(data / 'annotations' / 'val.json')!r})\n"
        "test_evaluator = val_evaluator\n"
        "time_budget_minutes = None\ntime_schedule = None\n"
        "param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]\n"
        "train_cfg = dict(max_iters=2, val_interval=100)\n"
        "default_hooks = dict(checkpoint=dict(interval=2), logger=dict(interval=1))\n")
    work = tmp_path / 'work'
    rc, out = _det_train(cfg, '--work-dir', work)
    assert rc == 0, out[-3000:]
    from visionattn.det.checkpoint import weights_only_runner_checkpoints
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(work / 'iter_2.pth'))
    assert unsafe and all(g.startswith('numpy.') for g in unsafe), unsafe  # no HistoryBuffer, no getattr
    with weights_only_runner_checkpoints():
        ckpt = torch.load(work / 'iter_2.pth', map_location='cpu', weights_only=True)
    assert ckpt['meta']['iter'] == 2
    rc, out = _det_train(cfg, '--work-dir', work, '--resume', '--cfg-options', 'train_cfg.max_iters=4')
    assert rc == 0 and 'resumed epoch: 0, iter: 2' in out and (work / 'iter_4.pth').exists(), out[-3000:]

    marker, evil = tmp_path / 'pwned', tmp_path / 'evil.pth'
    torch.save({'state_dict': {'x': torch.zeros(1)}, 'meta': {}, 'payload': _WritesMarker(str(marker))}, evil)
    for args in (['--pretrained', evil], ['--cfg-options', f'load_from={evil}'], ['--resume', evil]):
        rc, out = _det_train(cfg, '--work-dir', tmp_path / 'w2', *args)
        errors = [line for line in out.splitlines() if line.startswith('ERROR:')]
        assert rc == 2 and len(errors) == 1 and 'Traceback' not in out, (args, out[-3000:])
        assert 'pickles Python objects other than tensors' in errors[0] and not marker.exists(), errors[0]
