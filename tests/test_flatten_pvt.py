"""FLatten on the PVT / PVTv2 hosts: official fidelity, checkpoints, resolution, numerics, host details.

Spec: ../shared/specs/flatten_agent_convit_davit_twins.md §2.2-2.5 and §7; layouts in
tests/fixtures/official_layouts/flatten. The reference is tests/pvt_reference.py (a transcription of the
official flatten_pvt.py / flatten_pvt_v2.py with official key names); the generic API matrix lives in
test_models.py, the layer itself in test_focused_linear_attention.py.
"""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import visionattn  # noqa: F401
from layouts import load_layout, num_params, random_state_dict, variants
from official_checks import assert_filter_maps_layout, assert_loads_file, assert_param_count, meta_model
from pvt_reference import VARIANTS as REF_VARIANTS, PyramidVisionTransformer, PyramidVisionTransformerV2
from visionattn.layers import FocusedLinearAttention
from visionattn.layers.focused_linear_attention import resample_grid_tokens
from visionattn.layers.spatial_reduction_attention import SpatialReductionAttention
from visionattn.models._builder import remap_keys
from visionattn.models._pvt import Pvt, PvtV2
from visionattn.models.flatten import checkpoint_filter_fn
from visionattn.models.flatten import FAMILY_CARD

VARIANTS = [(v, n) for v, n in variants('flatten') if v.startswith('flatten_pvt')]
PARAMS = {  # spec §2.2 / §7
    'visionattn_flatten_pvt_tiny': 12_150_504, 'visionattn_flatten_pvt_small': 21_670_248,
    'visionattn_flatten_pvt_medium': 37_242_216, 'visionattn_flatten_pvt_large': 50_649_192,
    'visionattn_flatten_pvt_v2_b0': 3_594_824, 'visionattn_flatten_pvt_v2_b1': 12_931_240,
    'visionattn_flatten_pvt_v2_b2': 22_548_264, 'visionattn_flatten_pvt_v2_b3': 38_273_832,
    'visionattn_flatten_pvt_v2_b4': 51_836_968, 'visionattn_flatten_pvt_v2_b5': 67_061_544,
}
# smallest variant per host: model name -> (official layout, reference class, official function)
SMALLEST = {
    'visionattn_flatten_pvt_tiny': ('flatten_pvt_t', PyramidVisionTransformer, 'flatten_pvt_tiny'),
    'visionattn_flatten_pvt_v2_b0': ('flatten_pvt_v2_b0', PyramidVisionTransformerV2, 'flatten_pvt_v2_b0'),
}
SMALL = list(SMALLEST)


def test_all_variants_registered():
    assert sorted(n for _, n in VARIANTS) == sorted(visionattn.list_models('flatten_pvt_*')) == sorted(PARAMS)
    assert set(PARAMS) <= set(FAMILY_CARD['accuracy'])


# ------------------------------------------------------------------------------------------
# parameter counts and checkpoint layouts (meta device)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('variant,name', VARIANTS)
def test_param_count_and_layout(variant, name):
    assert_param_count(name, 'flatten', variant)
    assert load_layout('flatten', variant)['params'] == PARAMS[name]
    assert_filter_maps_layout(name, 'flatten', variant)
    assert len(meta_model(name).state_dict()) == len(load_layout('flatten', variant)['state_dict'])


@pytest.mark.parametrize('name', SMALL)
def test_reference_has_the_official_layout(name):
    """The transcription's state dict is the official one key for key, shape for shape, in order."""
    layout, ref_cls, fn = SMALLEST[name]
    with torch.device('meta'):
        ref = ref_cls(**REF_VARIANTS[fn])
    assert [(k, list(v.shape)) for k, v in ref.state_dict().items()] == [
        (k, s) for k, s, _ in load_layout('flatten', layout)['state_dict']]


@pytest.mark.parametrize('name', SMALL)
def test_filter_accepts_own_layout_unchanged(name):
    model = meta_model(name)
    sd = model.state_dict()
    out = checkpoint_filter_fn({'state_dict': {f'module.{k}': v for k, v in sd.items()}}, model)
    assert list(out) == list(sd)


@pytest.mark.parametrize('container', ['raw', 'model', 'module'])
@pytest.mark.parametrize('name', SMALL)
def test_loads_official_file(tmp_path, name, container):
    """Built at img_size=64: the 224 file's encodings are resampled on load (checked value by value)."""
    assert_loads_file(tmp_path, name, 'flatten', SMALLEST[name][0], container, input_size=(1, 3, 64, 64), img_size=64)


@pytest.mark.parametrize('name', SMALL)
def test_filter_takes_model_beside_ema(name):
    """The official training checkpoint: weights under 'model', main_ema.py's 'state_dict_ema' beside them is not
    used by the filter. (timm's file loader, ``pretrained_cfg_overlay=dict(file=...)``, itself prefers
    'state_dict_ema' before the filter runs.)"""
    sd = random_state_dict(load_layout('flatten', SMALLEST[name][0]), seed=3)
    model = meta_model(name)
    ema = {k: torch.zeros_like(v) for k, v in sd.items()}
    out = checkpoint_filter_fn({'model': sd, 'state_dict_ema': ema, 'epoch': 300}, model)
    assert torch.equal(out['stages.1.blocks.1.attn.kv.weight'], sd['block2.1.attn.kv.weight'])
    assert torch.equal(out['head.fc.weight'], sd['head.weight'])
    assert torch.equal(out['stages.0.blocks.0.attn.positional_encoding'], sd['block1.0.attn.positional_encoding'])


def test_checkpoint_errors_are_clear():
    layout = load_layout('flatten', 'flatten_pvt_t')
    model = meta_model('visionattn_flatten_pvt_tiny')
    sd = {k: torch.empty(shape, device='meta') for k, shape, _ in layout['state_dict']}
    missing = {k: v for k, v in sd.items() if k != 'block2.1.attn.kv.weight'}
    with pytest.raises(ValueError, match=r'1 missing keys: stages\.1\.blocks\.1\.attn\.kv\.weight'):
        checkpoint_filter_fn(missing, model)
    with pytest.raises(ValueError, match='missing'):  # a PVTv2 checkpoint is no PVT checkpoint
        checkpoint_filter_fn(random_state_dict(load_layout('flatten', 'flatten_pvt_v2_b1')), model)
    odd = dict(sd, pos_embed1=torch.empty(1, 3000, 64, device='meta'))
    with pytest.raises(ValueError, match=r'stem\.pos_embed: checkpoint \(1, 3000, 64\) vs model \(1, 3136, 64\)'):
        checkpoint_filter_fn(odd, model)


# ------------------------------------------------------------------------------------------
# fidelity against the official transcription (every parameter perturbed)
# ------------------------------------------------------------------------------------------

def _perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter away from its init, at realistic scales (norms, scale, encodings, dwc included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if 'norm' in n and n.endswith('weight'):
                p.copy_(1 + 0.2 * r)
            elif n.rstrip('0123456789').endswith(('scale', 'pos_embed', 'positional_encoding')):
                p.copy_(0.5 * r)
            elif p.ndim == 1:
                p.copy_(0.1 * r)
            else:
                p.copy_(r / math.sqrt(p[0].numel()))
    return model


def _reference(name, img_size=224, attn_type='LLLL', dtype=torch.float32):
    """The official model, every parameter perturbed (built on meta, then filled: no init cost)."""
    _, ref_cls, fn = SMALLEST[name]
    with torch.device('meta'):
        ref = ref_cls(img_size=img_size, attn_type=attn_type, **REF_VARIANTS[fn])
    return _perturb_(ref.to_empty(device='cpu').to(dtype)).eval()


def _ours(name, ref_sd, **kwargs):
    """Our model with the reference's weights (in their dtype) through the checkpoint filter."""
    model = timm.create_model(name, device='meta', **kwargs).eval()
    model.load_state_dict(checkpoint_filter_fn(ref_sd, model), strict=True, assign=True)
    return model


def _max_diff(a, b):
    assert b.abs().max() > 0.5, 'degenerate logits make the comparison meaningless'
    return (a - b).abs().max().item()


@pytest.mark.parametrize('name', SMALL)
def test_matches_official_fp32_224(name):
    ref = _reference(name)
    ours = _ours(name, ref.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = _max_diff(ours(x), ref(x))
    assert diff <= 1e-5, f'{name}: max |dlogit| {diff:.2e}'


@pytest.mark.parametrize('attn_types', ['LLLL', 'LLSS', 'SSLL'])  # S: spatial reduction 8-4 / 2-1
@pytest.mark.parametrize('name', SMALL)
def test_matches_official_float64(name, attn_types):
    ref = _reference(name, 64, attn_types, torch.float64)
    ours = _ours(name, ref.state_dict(), img_size=64, attn_types=attn_types)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        diff = _max_diff(ours(x), ref(x))
    assert diff <= 1e-10, f'{name} {attn_types}: max |dlogit| {diff:.2e}'


# ------------------------------------------------------------------------------------------
# resolution
# ------------------------------------------------------------------------------------------

def _grids(name, size):
    """The four stage maps the official code forms at ``size`` (PVT: floor; PVTv2: padded convs)."""
    grids, (h, w) = [], size
    for s in range(4):
        if 'v2' in name:
            k, st, p = (7, 4, 3) if s == 0 else (3, 2, 1)
            h, w = (h + 2 * p - k) // st + 1, (w + 2 * p - k) // st + 1
        else:
            h, w = (h // 4, w // 4) if s == 0 else (h // 2, w // 2)
        grids.append((h, w))
    return grids


def _interp(tokens, grid, size):
    """Bilinear resampling of (1, gh * gw, C) tokens, written out with F.interpolate (as official ``_get_pos_embed``)."""
    C = tokens.shape[-1]
    img = tokens.reshape(1, grid[0], grid[1], C).permute(0, 3, 1, 2)
    return F.interpolate(img, size=size, mode='bilinear', align_corners=False).flatten(2).transpose(1, 2)


def _assert_resampled(got, tokens, grid, size):
    """``got`` is ``tokens`` resampled bilinearly, to float32 precision: timm's resampling runs F.interpolate in
    float32, whose source coordinates alone put it ~1e-5 (relative) off the float64 result."""
    want = _interp(tokens, grid, size)
    assert got.shape == want.shape and (got - want).abs().max() <= 2e-5 * want.abs().max()


def _reference_resampled(name, ref_sd, from_size, to_size, attn_type='LLLL'):
    """The official model built at ``to_size`` with the encodings of ``ref_sd`` (built at ``from_size``) resampled."""
    _, ref_cls, fn = SMALLEST[name]
    src, dst = _grids(name, from_size), _grids(name, to_size)
    sd = {}
    for k, v in ref_sd.items():
        if k.startswith('pos_embed') or k.endswith('positional_encoding'):
            s = int(k[len('pos_embed')]) - 1 if k.startswith('pos_embed') else int(k[len('block')]) - 1
            v = resample_grid_tokens(v, src[s], dst[s])  # the library's (float32) resampling, checked above
        sd[k] = v
    with torch.device('meta'):
        ref = ref_cls(img_size=to_size, attn_type=attn_type, **REF_VARIANTS[fn]).eval()
    ref.load_state_dict(sd, strict=True, assign=True)
    return ref


@pytest.mark.parametrize('name', SMALL)
def test_img_size_resamples_a_224_file(name):
    """img_size=96 + a 224 checkpoint: encodings resampled bilinearly on load; equals the official model at 96."""
    ref_sd = _reference(name, 224, dtype=torch.float64).state_dict()
    ours = _ours(name, ref_sd, img_size=96)
    got = ours.state_dict()
    _assert_resampled(got['stages.2.blocks.1.attn.positional_encoding'], ref_sd['block3.1.attn.positional_encoding'],
                      (14, 14), (6, 6))
    if 'v2' not in name:
        _assert_resampled(got['stem.pos_embed'], ref_sd['pos_embed1'], (56, 56), (24, 24))
    ref = _reference_resampled(name, ref_sd, (224, 224), (96, 96))
    x = torch.randn(1, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        diff = _max_diff(ours(x), ref(x))
    assert diff <= 1e-10


@pytest.mark.parametrize('name', SMALL)
def test_dynamic_equals_fixed_at_training_size(name):
    ref_sd = _reference(name, 64).state_dict()
    fixed = _ours(name, ref_sd, img_size=64)
    dynamic = _ours(name, ref_sd, img_size=64, dynamic_img_size=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dynamic(x), fixed(x))
        a = fixed.forward_intermediates(x, intermediates_only=True)
        b = dynamic.forward_intermediates(x, intermediates_only=True)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize('size', [(96, 96), (64, 96)], ids=['96', '64x96'])
@pytest.mark.parametrize('name', SMALL)
def test_dynamic_other_size_matches_official_at_that_size(name, size):
    """dynamic_img_size=True off the training size (also non-square) == the official model built at that size
    with bilinearly resampled encodings (float64); S stages included."""
    ref_sd = _reference(name, 64, 'LLSL', torch.float64).state_dict()
    ours = _ours(name, ref_sd, img_size=64, dynamic_img_size=True, attn_types='LLSL')
    ref = _reference_resampled(name, ref_sd, (64, 64), size, 'LLSL')
    x = torch.randn(1, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        diff = _max_diff(ours(x), ref(x))
    assert diff <= 1e-10


@pytest.mark.parametrize('name', SMALL)
def test_dynamic_odd_size_runs(name):
    """Sizes that are no multiple of 32 (the official models cannot run them): PVT floors, PVTv2 pads."""
    model = timm.create_model(name, img_size=64, dynamic_img_size=True).eval()
    with torch.no_grad():
        out, feats = model.forward_intermediates(torch.randn(1, 3, 72, 100))
        logits = model.forward_head(out)
    assert [tuple(f.shape[2:]) for f in feats] == _grids(name, (72, 100))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


@pytest.mark.parametrize('name', SMALL)
def test_wrong_size_without_dynamic_raises(name):
    model = timm.create_model(name, img_size=64).eval()
    features = timm.create_model(name, img_size=64, features_only=True).eval()
    for m in (model, features):
        with pytest.raises(ValueError, match=r'96x80 does not match .* 64x64 \(img_size=.*dynamic_img_size=True'):
            m(torch.randn(1, 3, 96, 80))


# ------------------------------------------------------------------------------------------
# numerics, host details
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', SMALL)
def test_bf16_autocast_forward_backward_finite(name):
    model = _perturb_(timm.create_model(name, img_size=64, num_classes=10))
    x = torch.randn(2, 3, 64, 64) * 50
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_pvt_unused_final_norm():
    """PVT: the official final norm exists (keys, count), frozen and never applied; PVTv2 / Agent-PVT: none."""
    model = timm.create_model('visionattn_flatten_pvt_tiny', img_size=64).eval()
    assert isinstance(model.norm, nn.Identity) and not model.unused_norm.weight.requires_grad
    assert model.unused_norm.eps == 1e-6
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.unused_norm.weight.mul_(3.).add_(1.)
        assert torch.equal(model(x), before)
    model.prune_intermediate_layers([0, 1], prune_norm=True)
    assert not hasattr(model, 'unused_norm')
    no_norm = meta_model('visionattn_flatten_pvt_tiny', unused_final_norm=False)
    assert not hasattr(no_norm, 'unused_norm') and num_params(no_norm) == PARAMS['visionattn_flatten_pvt_tiny'] - 1024
    v2 = meta_model('visionattn_flatten_pvt_v2_b0')
    assert not hasattr(v2, 'unused_norm') and isinstance(v2.norm, nn.Identity)
    assert all(isinstance(s.norm, nn.LayerNorm) and s.norm.eps == 1e-6 for s in v2.stages)


def test_mixer_placement():
    """attn_types: L = FocusedLinearAttention(q / kv, over the whole stage map), S = the host's SRA (sr 8-4-2-1)."""
    model = meta_model('visionattn_flatten_pvt_small', attn_types='SLMS2')
    attns = [[b.attn for b in s.blocks] for s in model.stages]
    assert all(isinstance(a, SpatialReductionAttention) and a.sr_ratio == 8 for a in attns[0])
    assert all(isinstance(a, FocusedLinearAttention) and a.q is not None for a in attns[1])
    assert [type(a).__name__ for a in attns[2]] == ['FocusedLinearAttention'] * 2 + ['SpatialReductionAttention'] * 4
    assert attns[2][2].sr_ratio == 2 and attns[3][0].sr_ratio == 1
    assert attns[1][0].grid_size == (28, 28) and attns[2][0].positional_encoding.shape == (1, 196, 320)
    with pytest.raises(ValueError, match='mixers'):
        Pvt(depths=(1, 1, 1, 1), mixers=[[None]] * 3, device='meta')


def test_host_attention_is_timm_pvt_v2():
    """The PVTv2 host with its own attention everywhere is timm's pvt_v2_b0 (keys up to the stem / head names)."""
    torch.manual_seed(0)
    ref = _perturb_(timm.create_model('pvt_v2_b0')).eval()
    ours = PvtV2(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                 img_size=64, dynamic_img_size=True).eval()
    sd = remap_keys(ref.state_dict(), [(r'^patch_embed\.', 'stem.'), (r'^head\.(weight|bias)$', r'head.fc.\1')])
    ours.load_state_dict(sd, strict=True)
    assert num_params(ours) == num_params(ref) == 3_666_760
    for size in [(64, 64), (64, 96)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert _max_diff(ours(x), ref(x)) <= 1e-5


def test_official_init_and_no_weight_decay():
    torch.manual_seed(0)
    v1 = timm.create_model('visionattn_flatten_pvt_tiny', img_size=64)
    assert abs(v1.stem.pos_embed.std().item() - 0.02) < 0.003
    attn = v1.stages[0].blocks[0].attn
    assert not attn.scale.any() and not attn.positional_encoding.any() and not attn.q.bias.any()
    assert abs(attn.kv.weight.std().item() - 0.02) < 0.003
    assert {n for n in v1.no_weight_decay() if not n.endswith(('attn.scale', 'attn.positional_encoding'))} == {
        'stem.pos_embed', 'stages.1.downsample.pos_embed', 'stages.2.downsample.pos_embed', 'stages.3.downsample.pos_embed'}
    assert len(v1.no_weight_decay()) == 4 + 2 * 8
    v2 = timm.create_model('visionattn_flatten_pvt_v2_b1', img_size=64)
    for conv in (v2.stem.proj, v2.stages[0].blocks[0].mlp.dwconv, v2.stages[3].blocks[1].attn.dwc):
        fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
        assert abs(conv.weight.std().item() / math.sqrt(2 / fan_out) - 1) < 0.1 and not conv.bias.any()


@pytest.mark.parametrize('name', SMALL)
def test_builds_on_meta(name):
    with torch.device('meta'):
        a = timm.create_model(name)
    b = timm.create_model(name, device='meta', dynamic_img_size=True)
    assert all(t.is_meta for m in (a, b) for t in list(m.parameters()) + list(m.buffers()))
    assert num_params(a) == num_params(b) == PARAMS[name]


def test_script_and_fx_off_the_training_size():
    """TorchScript and timm's FX feature extraction with dynamic_img_size at a non-square size."""
    from timm.models._features_fx import create_feature_extractor
    model = _perturb_(timm.create_model('visionattn_flatten_pvt_tiny', img_size=64, dynamic_img_size=True,
                                        attn_types='LLSS')).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(create_feature_extractor(model, return_nodes=['head'])(x)['head'], want)
