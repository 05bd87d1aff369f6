"""PPMA: official fidelity, checkpoint containers, the lean polyline attention and its pitfalls.

Spec: ../shared/specs/biformer_nat_ppma.md section 3; layouts in tests/fixtures/official_layouts/ppma.
The reference is the naive transcription of the official code in tests/ppma_reference.py. The generic
API matrix lives in test_models.py, detection in test_det.py.
"""
import logging

import pytest
import timm
import torch

import visionattn  # noqa: F401
import ppma_reference as ref
from layouts import load_layout, random_state_dict, variants, wrap
from official_checks import assert_filter_maps_layout, assert_param_count, meta_model
from visionattn.layers import polyline_attention as pa
from visionattn.models.ppma import FAMILY_CARD, checkpoint_filter_fn

VARIANTS = variants('ppma')  # (official variant, visionattn name)
PARAMS = {  # spec section 0
    'visionattn_ppma_tiny': 14_335_272, 'visionattn_ppma_small': 26_969_472, 'visionattn_ppma_base': 54_158_524}
ENTRIES = {'visionattn_ppma_tiny': 412, 'visionattn_ppma_small': 787, 'visionattn_ppma_base': 1253}
OFFICIAL = {name: variant for variant, name in VARIANTS}


def test_all_variants_registered():
    assert sorted(n for _, n in VARIANTS) == sorted(visionattn.list_models('ppma_*')) == sorted(PARAMS)
    assert sorted(FAMILY_CARD['accuracy']) == sorted(PARAMS)


# ------------------------------------------------------------------------------------------
# parameter counts and layouts (meta device)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('variant,name', VARIANTS)
def test_param_count_and_entries(variant, name):
    assert_param_count(name, 'ppma', variant)
    assert load_layout('ppma', variant)['params'] == PARAMS[name]
    sd = meta_model(name).state_dict()
    assert len(sd) == ENTRIES[name] == len(load_layout('ppma', variant)['state_dict'])
    # the Relpos.angle buffers are persistent (state_dict entries), one per stage, of the head dim
    angles = [k for k in sd if k.endswith('rel_pos.angle')]
    assert [tuple(sd[k].shape) for k in angles] == [(16,), (32,), (32,), (32,)]


@pytest.mark.parametrize('variant,name', VARIANTS)
def test_filter_maps_layout(variant, name):
    assert_filter_maps_layout(name, 'ppma', variant)


def test_modes_per_stage():
    assert meta_model('visionattn_ppma_tiny').modes == ('chunk', 'chunk', 'whole', 'whole')
    assert meta_model('visionattn_ppma_small').modes == ('chunk', 'chunk', 'chunk', 'whole')
    base = meta_model('visionattn_ppma_base')
    assert base.modes == ('chunk', 'chunk', 'chunk', 'whole')
    assert not any('ls1' in k for k in base.state_dict() if k.startswith(('stages.0.', 'stages.1.')))
    assert base.stages[2].blocks[0].ls1.gamma.shape == (320,)


# ------------------------------------------------------------------------------------------
# checkpoint containers
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_official_sd():
    return random_state_dict(load_layout('ppma', 'PPMAViT_T'), seed=1)


def _create_from(tmp_path, obj, name='visionattn_ppma_tiny', **kwargs):
    path = tmp_path / 'ckpt.pth'
    torch.save(obj, path)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


@pytest.mark.parametrize('container', ['raw', 'model', 'state_dict', 'module', 'models'])
def test_loads_every_official_container(tmp_path, tiny_official_sd, container):
    obj = {'models': tiny_official_sd, 'epoch': 3} if container == 'models' else wrap(tiny_official_sd, container)
    model = _create_from(tmp_path, obj)
    expected = checkpoint_filter_fn(dict(tiny_official_sd), model)
    got = model.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in got)
    official_downsample = tiny_official_sd['layers.0.downsample.reduction.weight']
    assert torch.equal(got['stages.1.downsample.reduction.weight'], official_downsample)
    assert torch.equal(got['norm.fc.weight'], tiny_official_sd['proj.weight'])
    assert torch.equal(got['norm.bn.running_var'], tiny_official_sd['norm.running_var'])


def test_ema_preferred_and_reported(tiny_official_sd, caplog):
    """best.pth holds 'models' and 'model_ema': the EMA weights are used (the README accuracies are EMA)."""
    model = meta_model('visionattn_ppma_tiny')
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in tiny_official_sd.items()}
    with caplog.at_level(logging.INFO, logger='visionattn.models.ppma'):
        out = checkpoint_filter_fn({'models': tiny_official_sd, 'model_ema': ema, 'epoch': 299}, model)
    assert torch.equal(out['stem.proj.0.weight'], ema['patch_embed.proj.0.weight'])
    assert 'EMA' in caplog.text
    out = checkpoint_filter_fn({'models': tiny_official_sd}, model)
    assert torch.equal(out['stem.proj.0.weight'], tiny_official_sd['patch_embed.proj.0.weight'])


def test_wrong_file_fails_loudly(tiny_official_sd):
    model = meta_model('visionattn_ppma_tiny')
    sd = dict(tiny_official_sd)
    del sd['layers.2.blocks.3.retention.path_embed.A_log']
    with pytest.raises(ValueError, match=r'missing keys: stages\.2\.blocks\.3\.attn\.path_embed\.A_log'):
        checkpoint_filter_fn(sd, model)
    small = random_state_dict(load_layout('ppma', 'PPMAViT_S'))
    with pytest.raises(ValueError, match='PPMA checkpoint does not match'):
        checkpoint_filter_fn(small, model)


def test_filter_accepts_own_layout_and_layer_scale_shape():
    model = meta_model('visionattn_ppma_base')
    sd = model.state_dict()
    out = checkpoint_filter_fn({'state_dict': {f'module.{k}': v for k, v in sd.items()}}, model)
    assert list(out) == list(sd)
    official = {k: torch.empty(s, device='meta') for k, s, _ in load_layout('ppma', 'PPMAViT_B')['state_dict']}
    assert official['layers.2.blocks.0.gamma_1'].shape == (1, 1, 1, 320)
    assert checkpoint_filter_fn(official, model)['stages.2.blocks.0.ls1.gamma'].shape == (320,)


# ------------------------------------------------------------------------------------------
# fidelity against the transcription, every parameter and buffer perturbed
# ------------------------------------------------------------------------------------------

def perturbed_reference(variant, seed=0, dtype=torch.float64):
    """The official transcription with every parameter and buffer randomised (BN stats, gammas, path params)."""
    torch.manual_seed(seed)
    model = ref.PPMARef(**ref.VARIANTS[variant]).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g, dtype=dtype)
            if name.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=g, dtype=dtype) + 0.5)
            elif name.endswith('angle'):
                t.mul_(1 + 0.1 * r)  # pairs no longer equal: both halves of each pair must be used
            elif 'norm' in name and name.endswith('weight') or name.endswith(('gamma_1', 'gamma_2')):
                t.copy_(1 + 0.2 * r)
            elif name.endswith(('dt_bias', 'A_log')):
                t.copy_(0.5 * r)
            elif name.endswith('dt_linear.weight'):
                t.copy_(0.3 * r)
            else:
                t.copy_(r * (0.5 / max(1, t[0].numel()) ** 0.5 if t.ndim > 1 else 0.1))
    return model


def ours_from(reference, name, **kwargs):
    model = timm.create_model(name, **kwargs).to(next(reference.parameters()).dtype).eval()
    model.load_state_dict(checkpoint_filter_fn(reference.state_dict(), model), strict=True)
    return model


@pytest.fixture(scope='module')
def tiny_pair():
    reference = perturbed_reference('PPMAViT_T')
    return reference, ours_from(reference, 'visionattn_ppma_tiny')


@pytest.mark.parametrize('size', [(224, 224), (160, 192)])
def test_tiny_logits_equal_reference_float64(tiny_pair, size):
    reference, ours = tiny_pair
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        want = reference(x)
        got = ours(x)
    assert want.abs().max() > 1e-2  # the perturbed model is not degenerate
    assert (got - want).abs().max() < 1e-10


def test_tiny_logits_equal_reference_float32_224():
    reference = perturbed_reference('PPMAViT_T', dtype=torch.float32)
    ours = ours_from(reference, 'visionattn_ppma_tiny')
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (ours(x) - reference(x)).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize('variant,name', [
    ('PPMAViT_S', 'visionattn_ppma_small'), ('PPMAViT_B', 'visionattn_ppma_base')])
def test_small_and_base_equal_reference_float64(variant, name):
    """S: chunk mode in stage 3; B: layer scale and 5 / 10 heads."""
    reference = perturbed_reference(variant, seed=3)
    ours = ours_from(reference, name)
    x = torch.randn(1, 3, 96, 128, dtype=torch.float64)
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max() < 1e-10


def test_backbone_outputs_are_pre_downsample_stage_outputs(tiny_pair):
    reference, ours = tiny_pair
    x = torch.randn(1, 3, 96, 160, dtype=torch.float64)
    with torch.no_grad():
        want = reference.backbone_outputs(x)
        got = ours.forward_intermediates(x, intermediates_only=True)
    for w, g in zip(want, got):
        assert (g - w.permute(0, 3, 1, 2)).abs().max() < 1e-10


def test_gradients_equal_reference(tiny_pair):
    """Training mode is eval-BN here (drop path 0); the lean whole mode's custom backward included."""
    reference, ours = tiny_pair
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    w = torch.randn(2, 1000, dtype=torch.float64)
    (reference(x) * w).sum().backward()
    (ours(x) * w).sum().backward()
    ref_grads = checkpoint_filter_fn({k: p.grad for k, p in reference.named_parameters()}
                                     | {k: b for k, b in reference.named_buffers()}, ours)
    for k, p in ours.named_parameters():
        assert p.grad is not None, k
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-8, atol=1e-10, msg=k)
    reference.zero_grad()
    ours.zero_grad()


# ------------------------------------------------------------------------------------------
# the operator and its pitfalls
# ------------------------------------------------------------------------------------------

def test_segment_sum_excludes_the_lower_endpoint():
    a = torch.tensor([1., 10., 100., 1000.], dtype=torch.float64)
    s = pa.segment_sum(a)
    assert s[0, 3] == s[3, 0] == 1110.  # a_1 + a_2 + a_3, not a_0
    assert s[1, 2] == 100. and torch.all(s.diagonal() == 0)
    torch.testing.assert_close(s, ref.segment_sum_1d(a), rtol=0, atol=0)


def test_whole_mask_is_asymmetric_and_matches_the_l_shaped_path():
    torch.manual_seed(0)
    alpha, beta = -torch.rand(1, 1, 3, 4, dtype=torch.float64), -torch.rand(1, 1, 3, 4, dtype=torch.float64)
    m = ref.whole_mask(alpha, beta)[0, 0]
    assert (m - m.T).abs().max() > 0.1
    # query (0, 0) -> key (2, 3): horizontally along row 0 (w 1..3), then down column 3 (h 1..2)
    assert torch.isclose(m[0, 2 * 4 + 3], alpha[0, 0, 0, 1:].sum() + beta[0, 0, 1:, 3].sum())
    # the lean operator uses M for the first softmax and M^T for the second; a symmetric mask would differ
    q, k, v = (torch.randn(1, 1, 3, 4, 8, dtype=torch.float64) for _ in range(3))
    mw, mh = pa.segment_sum(alpha), pa.segment_sum(beta.transpose(2, 3))
    out = pa.polyline_whole_attention(q, k, v, mw, mh)[0, 0]
    s = q.reshape(12, 8) @ k.reshape(12, 8).T
    want = 0.5 * (torch.softmax(s + m, -1) + torch.softmax(s + m.T, -1)) @ v.reshape(12, 8)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    summed_logits = torch.softmax(s + 0.5 * (m + m.T), -1) @ v.reshape(12, 8)
    assert (out - summed_logits).abs().max() > 1e-4  # averaging probabilities, not logits


def test_rope_uses_the_raster_index():
    """Token (1, 0) sits at position W: its rotation depends on the map width."""
    rope = pa.PolylineRoPE(8)
    sin4, _ = rope(torch.zeros(1, 2, 4, 1))
    sin6, _ = rope(torch.zeros(1, 2, 6, 1))
    torch.testing.assert_close(sin4[1, 0], torch.sin(4 * rope.angle))
    torch.testing.assert_close(sin6[1, 0], torch.sin(6 * rope.angle))
    assert torch.equal(rope.angle[0::2], rope.angle[1::2])
    torch.testing.assert_close(rope.angle[::2], 1 / 10000 ** torch.linspace(0, 1, 4))
    x = torch.randn(2, 3, 2, 4, 8, dtype=torch.float64)
    sin, cos = ref.rope_tables(rope.angle.double(), 2, 4)
    torch.testing.assert_close(pa.apply_rope(x, sin, cos), ref.theta_shift(x, sin, cos), rtol=0, atol=1e-15)


@pytest.mark.parametrize('mode', ['whole', 'chunk'])
def test_blocking_does_not_change_results(monkeypatch, mode):
    """One query row (whole) / one head (chunk) per block equals the single-block computation."""
    torch.manual_seed(0)
    attn = pa.PolylinePathAttention(32, 4, mode=mode).double()
    with torch.no_grad():
        attn.path_embed.dt_linear.weight.normal_()
    x = torch.randn(2, 5, 7, 32, dtype=torch.float64)
    rope = pa.PolylineRoPE(8).double()(x)
    with torch.no_grad():
        full = attn(x, rope)
        monkeypatch.setattr(pa, 'BLOCK_ELEMENTS', 1)
        blocked = attn(x, rope)
    torch.testing.assert_close(blocked, full, rtol=1e-12, atol=1e-12)
    if mode == 'whole':  # the custom backward over one-row blocks
        xg = x.clone().requires_grad_()
        attn(xg, rope).pow(2).sum().backward()
        monkeypatch.setattr(pa, 'BLOCK_ELEMENTS', 1 << 22)
        xr = x.clone().requires_grad_()
        attn(xr, rope).pow(2).sum().backward()
        torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('mode', ['whole', 'chunk'])
def test_custom_backward_gradcheck(mode):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 3, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    a = (-torch.rand(2, 2, 3, 4, dtype=torch.float64)).requires_grad_()
    b = (-torch.rand(2, 2, 3, 4, dtype=torch.float64)).requires_grad_()

    def fn(q, k, v, a, b):
        if mode == 'chunk':
            return pa.polyline_chunk_attention(q, k, v, a, b)
        return pa.polyline_whole_attention(q, k, v, pa.segment_sum(a), pa.segment_sum(b.transpose(2, 3)))
    assert torch.autograd.gradcheck(fn, (q, k, v, a, b))


def test_errors():
    with pytest.raises(ValueError, match=r"mode='axial': expected 'whole' or 'chunk'"):
        pa.PolylinePathAttention(32, 4, mode='axial')
    with pytest.raises(ValueError, match=r'num_heads=5 does not divide dim=32'):
        pa.PolylinePathAttention(32, 5)
    with pytest.raises(ValueError, match=r'modes=\(.chunk.,\): expected 4 values'):
        timm.create_model('visionattn_ppma_tiny', modes=('chunk',), device='meta')
    model = timm.create_model('visionattn_ppma_tiny').eval()
    with pytest.raises(ValueError, match=r'image of 16x64 is smaller than .* minimum input size 32x32'):
        model(torch.randn(1, 3, 16, 64))
