"""Deployment: torch.export and ONNX (checked in onnxruntime) of the smallest model of every architecture.

The architectures come from the registry (``visionattn.deploy.architecture``: the model name without its
size / resolution tokens), so a new family is covered without editing this file.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import visionattn
from visionattn.deploy import architecture, check_onnx, export_onnx, export_program, smallest_per_architecture
from visionattn.layers import BiLevelRoutingAttention
from visionattn.models._swin import SwinStem
from official_checks import keep_block_kinds

pytest.importorskip('onnxruntime', reason='onnx / onnxruntime come from the test extra (tools/setup.sh installs it)')

ROOT = Path(__file__).resolve().parents[1]
EXPORT_MODELS = smallest_per_architecture()
# multi-scale backbones (stage outputs at more than one stride), the ones a detector takes with --features
HIERARCHICAL = [m for m in EXPORT_MODELS
                if len({f['reduction'] for f in timm.create_model(m, device='meta').feature_info}) > 1]
# dynamic-size exports cost 12-45 s each: an architecture whose host and token mixer other models already trace
# is left out of that test (its fixed-size export above still runs); the values name the models that cover it
DYNAMIC_COVERED_BY = {
    'visionattn_mobilenetv2_triplet': ('visionattn_resnet18_triplet',),  # TripletAttention; timm's MobileNetV2
    'visionattn_mobilenetv2_ela_l': ('visionattn_resnet50_ela_b',),  # the ELA module, another variant's settings
    'visionattn_biformer_stl': ('visionattn_biformer_tiny',),  # the legacy BRA; conv / BN stem and downsamplers
    'visionattn_agent_swin_tiny': ('visionattn_flatten_swin_tiny', 'visionattn_agent_pvt_tiny'),  # Swin host; agent
    'visionattn_flatten_pvt_tiny': ('visionattn_agent_pvt_tiny', 'visionattn_flatten_pvt_v2_b0'),  # PVT host; FLatten
    'visionattn_dinat_s_tiny': ('visionattn_flatten_swin_tiny', 'visionattn_dinat_mini'),  # Swin stem / merging; NA
    'visionattn_nat_mini': ('visionattn_dinat_mini',),  # the same stages; DiNAT-Mini has undilated NA blocks too
    'visionattn_twins_pcpvt_small': ('visionattn_twins_svt_small',),  # SVT's GSA blocks are PCPVT's; PEG, embeds
    # the CSwin host's stripes; FLatten with its encodings resampled to symbolic map sizes
    'visionattn_flatten_cswin_tiny': ('visionattn_agent_cswin_tiny', 'visionattn_flatten_pvt_v2_b0'),
}
DYNAMIC = [m for m in HIERARCHICAL if m not in DYNAMIC_COVERED_BY]


def _model(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():  # every parameter and buffer away from its init (layer scales, BN statistics)
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.add_(torch.randn_like(t) * 0.02)
    for m in model.modules():
        # BiFormer's top-k region routing: at the near-uniform affinities of a random init the k-th and (k+1)-th
        # regions often lie within float rounding of each other, and the runtime's summation order picks one or
        # the other; routing to every region keeps the whole graph (means, top-k, gather, attention, padding)
        # with a selection that rounding cannot change (the eager fidelity tests check the selection itself)
        if isinstance(m, BiLevelRoutingAttention):
            m.topk = m.n_win ** 2
    return model


def _size(name):
    return tuple(timm.get_pretrained_cfg_value(name, 'input_size')[1:])


def test_architectures_cover_every_family():
    families = {timm.models._registry._model_to_module[m] for m in visionattn.list_models()}
    covered = {timm.models._registry._model_to_module[m] for m in EXPORT_MODELS}
    assert covered == families
    assert len({architecture(m) for m in EXPORT_MODELS}) == len(EXPORT_MODELS)
    assert {'nat', 'dinat', 'dinat_s', 'resnet_cbam', 'davit', 'twins_svt', 'ppma'} <= {
        architecture(m) for m in EXPORT_MODELS}


@pytest.mark.parametrize('name', EXPORT_MODELS)
def test_export_classifier_matches_eager(name, tmp_path):
    """torch.export (program == eager <= 1e-5, eager untouched afterwards), then ONNX in onnxruntime <= 1e-4.
    Transformer stages keep one block of each kind (the export time grows with the graph)."""
    model = keep_block_kinds(_model(name))
    x = torch.randn(1, 3, *_size(name))
    with torch.no_grad():
        before = model(x)
        program = export_program(model, _size(name))
        exported = program.module()(x)
        after = model(x)
    torch.testing.assert_close(exported, before, rtol=0, atol=1e-5)
    # exporting must leave eager untouched (index tables cached while tracing were fake tensors once)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    path = export_onnx(model, str(tmp_path / 'model.onnx'), _size(name), program=program)
    (row,) = check_onnx(model, path, _size(name))
    assert row['max_abs_diff'][0] <= 1e-4, row


def test_dynamic_coverage_names_traced_models():
    assert set(DYNAMIC_COVERED_BY) <= set(HIERARCHICAL)
    assert {m for covering in DYNAMIC_COVERED_BY.values() for m in covering} <= set(DYNAMIC)


@pytest.mark.parametrize('name', DYNAMIC)
def test_onnx_dynamic_features(name, tmp_path):
    """``--dynamic --features``: batch, height and width symbolic; every stage <= 1e-4 at a non-square size.
    (Without the exporter's optimiser, which the classifier test runs, and with one block of each kind per
    transformer stage.)"""
    # models whose learned encodings fix the input size (FLatten) resample them per input when built dynamic
    dynamic = dict(dynamic_img_size=True) if timm.get_pretrained_cfg_value(name, 'fixed_input_size') else {}
    model = _model(name, features_only=True, **dynamic)
    keep_block_kinds(model)
    # a Swin host clamps windows to maps smaller than them (its last stage at 224): a graph holds for the sizes
    # whose maps are all above or all at the window, so it is traced and checked above (README, Deploy)
    traced, other = ((256, 320), (288, 352)) if isinstance(getattr(model, 'stem', None), SwinStem) else (
        (224, 224), (192, 288))
    path = export_onnx(model, str(tmp_path / 'features.onnx'), traced, dynamic='all', optimize=False)
    rows = check_onnx(model, path, traced, dynamic='all', batch_sizes=(1, 3), check_size=other)
    assert [(row['batch'], row['size']) for row in rows] == [(1, traced), (3, traced), (1, other), (3, other)]
    for row in rows:
        assert len(row['max_abs_diff']) == len(model.feature_info.channels())
        assert max(row['max_abs_diff']) <= 1e-4, row


def test_dynamic_size_of_a_fixed_size_model_is_refused(tmp_path):
    """ConViT's learned position embedding fixes the grid: a dynamic-size export must not be written silently."""
    name = 'visionattn_convit_tiny'
    assert timm.get_pretrained_cfg_value(name, 'fixed_input_size')
    with pytest.raises(ValueError, match=rf"{name}: dynamic='all' is not supported: .*export with a fixed size "
                                         r"or dynamic='batch'"):
        export_onnx(_model(name), str(tmp_path / 'model.onnx'), (224, 224), dynamic='all')


def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / 'tools' / 'export_onnx.py'), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_cli_exports_checkpoint_weights(tmp_path):
    name = 'visionattn_resnet18_cbam'
    model = _model(name)
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'weights.pth')
    out = tmp_path / 'm.onnx'
    result = _cli(name, '--checkpoint', str(tmp_path / 'weights.pth'), '--img', '96', '128', '--output', str(out),
                  '--repeats', '1')
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r'onnxruntime batch 1 96x128: max \|diff\| \S+; latency onnxruntime', result.stdout)
    (row,) = check_onnx(model, str(out), (96, 128))  # the file holds the checkpoint's weights, not a fresh init
    assert row['max_abs_diff'][0] <= 1e-4


@pytest.mark.parametrize('args, message', [
    (['visionattn_nat_mni'], r"model_name='visionattn_nat_mni'.*did you mean"),
    (['davit_tiny'], r"model_name='davit_tiny' is not a visionattn model"),
    (['visionattn_nat_mini', '--img', '224', '224', '3'], r'--img 224 224 3: expected one positive side or H W'),
    (['visionattn_nat_mini', '--opset', '11'], r'--opset 11: .*needs opset >= 18'),
    (['visionattn_nat_mini', '--dynamic', 'width'], r"argument --dynamic: invalid choice: 'width'"),
    (['visionattn_nat_mini', '--checkpoint', 'missing.pth'], r'missing\.pth'),
])
def test_cli_bad_input_is_one_error_line(args, message):
    result = _cli(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('ERROR:') and re.search(message, lines[0]), result.stderr
    assert 'Traceback' not in result.stderr


def test_cli_builds_fixed_size_models_for_the_export_size(tmp_path):
    """FLatten's encodings fix its input size: the CLI builds the model for --img (encodings of the official-size
    file resampled; exported and checked in onnxruntime at 96x96 here) and, with --dynamic, resampling per input,
    so the model runs at another size (that model's dynamic graph is checked in test_onnx_dynamic_features)."""
    from visionattn.train.export_onnx import _load_model, build_parser
    name = 'visionattn_flatten_pvt_v2_b0'
    fixed = _cli(name, '--img', '96', '--repeats', '0', '--output', str(tmp_path / 'g.onnx'))
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert re.search(r'onnxruntime batch 1 96x96: max \|diff\| \S+', fixed.stdout), fixed.stdout

    def features(*args):
        return _load_model(build_parser().parse_args([name, '--img', '96', '128', '--features', *args]), (96, 128))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert [o.shape[-2:] for o in features('--dynamic')(x)] == [(16, 24), (8, 12), (4, 6), (2, 3)]
        with pytest.raises(ValueError, match=r'image of 64x96 does not match this model.s input size 96x128'):
            features()(x)
