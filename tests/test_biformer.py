"""BiFormer: official fidelity, checkpoint containers, the lean routed attention and its pitfalls.

Spec: ../shared/specs/biformer_nat_ppma.md section 1; layouts in tests/fixtures/official_layouts/biformer.
The reference is the naive transcription of the official code in tests/biformer_reference.py (it gathers
the topk copies of K/V, as the official code does). The generic API matrix lives in test_models.py,
detection in test_det.py, the Triton kernels in test_bra_triton.py.
"""
import pytest
import timm
import torch

import visionattn  # noqa: F401
import biformer_reference as ref
from layouts import load_layout, random_state_dict, variants, wrap
from official_checks import assert_filter_maps_layout, assert_param_count, meta_model
from visionattn.layers import bilevel_routing_attention as bra
from visionattn.models.biformer import FAMILY_CARD, checkpoint_filter_fn

VARIANTS = variants('biformer')  # (official variant, visionattn name)
PARAMS = {  # spec section 0
    'visionattn_biformer_tiny': 13_142_760, 'visionattn_biformer_small': 25_536_232,
    'visionattn_biformer_base': 56_804_968, 'visionattn_biformer_stl': 28_372_552,
    'visionattn_biformer_stl_nchw': 28_372_552}
OFFICIAL = {name: variant for variant, name in VARIANTS}


def test_all_variants_registered():
    assert sorted(n for _, n in VARIANTS) == sorted(visionattn.list_models('biformer_*')) == sorted(PARAMS)
    assert sorted(FAMILY_CARD['accuracy']) == sorted(PARAMS)


# ------------------------------------------------------------------------------------------
# parameter counts and layouts (meta device)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('variant,name', VARIANTS)
def test_param_count(variant, name):
    assert_param_count(name, 'biformer', variant)
    assert load_layout('biformer', variant)['params'] == PARAMS[name]


@pytest.mark.parametrize('variant,name', VARIANTS)
def test_filter_maps_layout(variant, name):
    assert_filter_maps_layout(name, 'biformer', variant)


def test_attention_per_stage():
    """Routed stages: heads = qk_dim // 32, topk 1 / 4 / 16; the last stage: full attention, 8 heads."""
    tiny = meta_model('visionattn_biformer_tiny')
    attns = [stage.blocks[0].attn for stage in tiny.stages]
    assert [(a.num_heads, a.topk, a.mode) for a in attns[:3]] == [(2, 1, 'legacy'), (4, 4, 'legacy'),
                                                                  (8, 16, 'legacy')]
    assert attns[0].scale == 64 ** -0.5  # the full q/k width, not the head width (pitfall a)
    assert isinstance(attns[3], bra.GlobalAttentionLePE) and attns[3].num_heads == 8 and attns[3].qkv.bias is None
    base = meta_model('visionattn_biformer_base')
    assert [s.blocks[0].attn.num_heads for s in base.stages] == [3, 6, 12, 8]
    nchw = meta_model('visionattn_biformer_stl_nchw')
    assert [s.blocks[0].attn.mode for s in nchw.stages[:3]] == ['nchw'] * 3
    assert nchw.stages[3].blocks[0].attn.lepe_on_v and not meta_model('visionattn_biformer_stl').stages[
        3].blocks[0].attn.lepe_on_v


# ------------------------------------------------------------------------------------------
# checkpoint containers
# ------------------------------------------------------------------------------------------

def _create_from(tmp_path, obj, name, **kwargs):
    path = tmp_path / 'ckpt.pth'
    torch.save(obj, path)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


@pytest.mark.parametrize('container', ['raw', 'model', 'state_dict', 'module'])
@pytest.mark.parametrize('name', ['visionattn_biformer_tiny', 'visionattn_biformer_stl_nchw'])
def test_loads_every_official_container(tmp_path, container, name):
    official = random_state_dict(load_layout('biformer', OFFICIAL[name]), seed=1)
    model = _create_from(tmp_path, wrap(official, container), name)
    got = model.state_dict()
    expected = checkpoint_filter_fn(dict(official), model)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    if name.endswith('tiny'):
        assert torch.equal(got['stages.1.downsample.reduction.weight'], official['downsample_layers.1.0.weight'])
        assert torch.equal(got['stages.0.blocks.1.attn.qkv.weight'], official['stages.0.1.attn.qkv.qkv.weight'])
        assert torch.equal(got['stages.3.blocks.0.attn.proj.bias'], official['stages.3.0.attn.proj.bias'])
    else:  # 1x1 conv weights become Linear weights
        w = official['stages.0.blocks.0.attn.qkv_linear.weight']
        assert w.shape == (288, 96, 1, 1)
        assert torch.equal(got['stages.0.blocks.0.attn.qkv.weight'], w[:, :, 0, 0])
        assert torch.equal(got['stages.1.downsample.norm.running_var'], official['downsample_layers.1.0.running_var'])


def test_wrong_file_fails_loudly():
    model = meta_model('visionattn_biformer_tiny')
    sd = random_state_dict(load_layout('biformer', 'biformer_tiny'))
    del sd['stages.2.3.attn.lepe.weight']
    with pytest.raises(ValueError, match=r'missing keys: stages\.2\.blocks\.3\.attn\.lepe\.conv\.weight'):
        checkpoint_filter_fn(sd, model)
    with pytest.raises(ValueError, match='BiFormer checkpoint does not match'):
        checkpoint_filter_fn(random_state_dict(load_layout('biformer', 'biformer_small')), model)


def test_filter_accepts_own_layout():
    model = meta_model('visionattn_biformer_stl')
    sd = model.state_dict()
    assert list(checkpoint_filter_fn({'state_dict': {f'module.{k}': v for k, v in sd.items()}}, model)) == list(sd)


# ------------------------------------------------------------------------------------------
# fidelity against the transcription, every parameter and buffer perturbed
# ------------------------------------------------------------------------------------------

def perturbed_reference(variant, seed=0, dtype=torch.float64, **kwargs):
    """The official transcription with every parameter and buffer randomised (BN statistics included)."""
    torch.manual_seed(seed)
    model = ref.build_reference(variant, **kwargs).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g, dtype=dtype)
            if name.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=g, dtype=dtype) + 0.5)
            elif 'norm' in name and name.endswith('weight'):
                t.copy_(1 + 0.2 * r)
            else:
                t.copy_(r * (0.5 / max(1, t[0].numel()) ** 0.5 if t.ndim > 1 else 0.1))
    return model


def ours_from(reference, name, **kwargs):
    model = timm.create_model(name, **kwargs).to(next(reference.parameters()).dtype).eval()
    model.load_state_dict(checkpoint_filter_fn(reference.state_dict(), model), strict=True)
    return model


def _max_diff(ours, reference, x):
    with torch.no_grad():
        want = reference(x)
        got = ours(x)
    assert want.abs().max() > 1e-2  # the perturbed model is not degenerate
    return (got - want).abs().max().item()


@pytest.fixture(scope='module')
def tiny_pair():
    reference = perturbed_reference('biformer_tiny', auto_pad=True)
    return reference, ours_from(reference, 'visionattn_biformer_tiny')


@pytest.mark.parametrize('size', [(224, 224), (250, 310), (96, 160)])
def test_tiny_logits_equal_reference_float64(tiny_pair, size):
    """224: no padding; 250x310 and 96x160: the unmasked pad tokens of auto_pad (pitfall d)."""
    reference, ours = tiny_pair
    assert _max_diff(ours, reference, torch.randn(2, 3, *size, dtype=torch.float64)) < 1e-10


@pytest.mark.parametrize('size', [(224, 224), (250, 310)])
def test_tiny_logits_equal_reference_float32(size):
    """A seeded input: top-k routing is discontinuous, so at a near-tie of two region affinities float32 rounding
    (1e-7) can pick another region and move the logits by about 1e-5 (seen with an unseeded input)."""
    reference = perturbed_reference('biformer_tiny', dtype=torch.float32, auto_pad=True)
    ours = ours_from(reference, 'visionattn_biformer_tiny')
    diff = _max_diff(ours, reference, torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0)))
    assert diff <= 1e-5, diff


def test_detection_size_with_16_regions_float32():
    """n_win=16 at 320x480 (the official detection setting): 16 x 16 regions, padded maps in every stage."""
    reference = perturbed_reference('biformer_tiny', dtype=torch.float32, auto_pad=True, n_win=16)
    ours = ours_from(reference, 'visionattn_biformer_tiny', n_win=16)
    diff = _max_diff(ours, reference, torch.randn(1, 3, 320, 480))
    assert diff <= 1e-5, diff


@pytest.mark.parametrize('variant,size', [
    ('biformer_stl', (224, 224)), ('biformer_stl', (256, 320)),
    ('biformer_stl_nchw', (224, 224)), ('biformer_stl_nchw', (250, 310))])
def test_stl_equal_reference_float64(variant, size):
    """STL (legacy BRA, LePE of x in stage 4); STL-NCHW (ceil-mode regions, zero pads after the projection)."""
    reference = perturbed_reference(variant, seed=2, auto_pad=True)
    ours = ours_from(reference, f'visionattn_{variant}')
    assert _max_diff(ours, reference, torch.randn(1, 3, *size, dtype=torch.float64)) < 1e-10


@pytest.mark.parametrize('variant', ['biformer_small', 'biformer_base'])
def test_small_and_base_equal_reference_float64(variant):
    reference = perturbed_reference(variant, seed=3, auto_pad=True)
    ours = ours_from(reference, f'visionattn_{variant}')
    assert _max_diff(ours, reference, torch.randn(1, 3, 112, 144, dtype=torch.float64)) < 1e-10


def test_auto_pad_is_exact_at_multiples_of_112():
    """At multiples of 16 * n_win nothing is padded: auto_pad on and off give bit-equal logits."""
    torch.manual_seed(0)
    padded = timm.create_model('visionattn_biformer_tiny').eval()
    strict = timm.create_model('visionattn_biformer_tiny', auto_pad=False).eval()
    strict.load_state_dict(padded.state_dict())
    x = torch.randn(1, 3, 224, 336)
    with torch.no_grad():
        assert torch.equal(padded(x), strict(x))
    with pytest.raises(ValueError, match=r'a 64x64 map is not divisible into n_win=7 regions per side'):
        strict(torch.randn(1, 3, 256, 256))


def test_backbone_outputs_equal_reference(tiny_pair):
    reference, ours = tiny_pair
    x = torch.randn(1, 3, 160, 192, dtype=torch.float64)
    with torch.no_grad():
        want = ref.reference_backbone_outputs(reference, x)
        got = ours.forward_intermediates(x, intermediates_only=True)
    for w, g in zip(want, got):
        assert (g - w).abs().max() < 1e-10


def test_gradients_equal_reference(tiny_pair):
    """Through the lean custom backward; no gradient flows through the routing (pitfall e)."""
    reference, ours = tiny_pair
    x = torch.randn(2, 3, 96, 128, dtype=torch.float64)
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
# the operator
# ------------------------------------------------------------------------------------------

def naive_routed_attention(q, k, v, index, scale):
    """Gathers the topk key regions explicitly (the official way)."""
    n, r, t, m, d = q.shape
    topk = index.shape[-1]
    batch = torch.arange(n)[:, None, None]
    kg = k[batch, index].reshape(n, r, topk * t, m, d)
    vg = v[batch, index].reshape(n, r, topk * t, m, v.shape[-1])
    s = torch.einsum('nrqmd,nrkmd->nrmqk', q, kg) * scale
    return torch.einsum('nrmqk,nrkmd->nrqmd', s.softmax(-1), vg)


def _operator_inputs(n=2, r=6, t=5, m=2, dq=4, dv=6, topk=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, r, t, m * (2 * dq + dv), generator=g, dtype=torch.float64)
    q, k, v = qkv.split([m * dq, m * dq, m * dv], dim=-1)  # strided views, as in the module
    index = torch.stack([torch.randperm(r, generator=g)[:topk] for _ in range(n * r)]).view(n, r, topk)
    return (q.unflatten(-1, (m, dq)), k.unflatten(-1, (m, dq)), v.unflatten(-1, (m, dv))), index


def _assert_equals_explicit_gather(q, k, v, index):
    """routed_attention's output and q / k / v gradients equal the naive gather's (float64 inputs)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = bra.routed_attention(*leaves, index, 0.7)
    want_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want = naive_routed_attention(*want_leaves, index, 0.7)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)
    for got, exp in zip(leaves, want_leaves):
        torch.testing.assert_close(got.grad, exp.grad, rtol=1e-10, atol=1e-12)
    return want


@pytest.mark.parametrize('block_elements', [1, 1 << 22])
def test_routed_attention_equals_explicit_gather(monkeypatch, block_elements):
    """One query region per block and one block for all give the naive result, forward and backward."""
    monkeypatch.setattr(bra, 'BLOCK_ELEMENTS', block_elements)
    monkeypatch.setattr(bra, 'DENSE_MAX_WASTE', 0)  # the blocked path
    (q, k, v), index = _operator_inputs()
    want = _assert_equals_explicit_gather(q, k, v, index)
    with torch.no_grad():
        torch.testing.assert_close(bra.routed_attention(q, k, v, index, 0.7), want.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('dv', [4, 6])  # SDPA's fused kernel (one head size) and its math path
def test_dense_routed_attention_equals_explicit_gather(monkeypatch, dv):
    """Routing to many of few regions runs as one masked attention over the region table: the naive result,
    forward and backward, in float64; the rule's two limits send other calls to the blocked path."""
    dense = []
    monkeypatch.setattr(bra, '_dense_routed_attention',
                        lambda *a, _fn=bra._dense_routed_attention: dense.append(a[3].shape) or _fn(*a))
    (q, k, v), index = _operator_inputs(r=16, t=4, dv=dv, topk=4)
    _assert_equals_explicit_gather(q, k, v, index)
    assert dense == [(2, 16, 4)]
    (q, k, v), index = _operator_inputs(r=17, t=4, topk=4)  # 17 regions > 4 x topk
    bra.routed_attention(q, k, v, index, 0.7)
    (q, k, v), index = _operator_inputs(r=16, t=17, topk=4)  # 272 tokens > DENSE_MAX_TOKENS
    bra.routed_attention(q, k, v, index, 0.7)
    assert dense == [(2, 16, 4)]


def test_routed_attention_gradcheck(monkeypatch):
    monkeypatch.setattr(bra, 'BLOCK_ELEMENTS', 200)  # several blocks
    monkeypatch.setattr(bra, 'DENSE_MAX_WASTE', 0)
    (q, k, v), index = _operator_inputs(n=1, r=4, t=3, m=2, dq=2, dv=3, topk=2)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda q, k, v: bra.routed_attention(q, k, v, index, 0.5), leaves)


def test_training_never_keeps_the_topk_copies():
    """What autograd saves for one BRA layer at 16 routed regions stays a few maps, not topk copies of K/V."""
    torch.manual_seed(0)
    attn = bra.BiLevelRoutingAttention(64, 2, n_win=4, topk=16)
    x = torch.randn(2, 32, 32, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = attn(x)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    map_bytes = x.numel() * 4
    assert sum(storages.values()) < 8 * map_bytes  # the official gather alone would keep 16 x 2 maps of K/V
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_routing_follows_region_affinity():
    """Each query region routes to the key regions of highest mean-query x mean-key affinity."""
    q_r = torch.tensor([[[1., 0.], [0., 1.], [1., 1.]]])
    k_r = torch.tensor([[[3., 0.], [0., 2.], [-1., -1.]]])
    index = bra.route_regions(q_r, k_r, topk=2)
    assert index.tolist() == [[[0, 1], [1, 0], [0, 1]]]


def test_bfloat16_autocast_is_finite():
    model = timm.create_model('visionattn_biformer_tiny')
    x = torch.randn(2, 3, 96, 128) * 50
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_backend_choice(monkeypatch):
    (q, k, v), index = _operator_inputs()
    with pytest.raises(ValueError, match=r"unknown routed-attention backend 'cuda'"):
        bra.routed_attention(q, k, v, index, 1.0, backend='cuda')
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    with bra.bra_backend('triton'), pytest.raises(RuntimeError, match=r"backend 'triton': needs CUDA tensors"):
        bra.routed_attention(q, k, v, index, 1.0)
    monkeypatch.setenv(bra.BRA_ENV_VAR, 'torch')
    torch.testing.assert_close(bra.routed_attention(q, k, v, index, 1.0), naive_routed_attention(q, k, v, index, 1.0))


def test_errors():
    with pytest.raises(ValueError, match=r"mode='fast': expected 'legacy' or 'nchw'"):
        bra.BiLevelRoutingAttention(64, 2, mode='fast')
    with pytest.raises(ValueError, match=r'topk=50, n_win=7: expected n_win >= 1 and 1 <= topk <= n_win\*\*2'):
        bra.BiLevelRoutingAttention(64, 2, n_win=7, topk=50)
    with pytest.raises(ValueError, match=r'num_heads=3 must divide dim=64'):
        bra.BiLevelRoutingAttention(64, 3)
    with pytest.raises(ValueError, match=r"layout='swin': expected 'biformer' or 'stl'"):
        timm.create_model('visionattn_biformer_tiny', layout='swin', device='meta')
    with pytest.raises(ValueError, match=r'topks=\(1, 4\): expected 4 values'):
        timm.create_model('visionattn_biformer_tiny', topks=(1, 4), device='meta')
    model = timm.create_model('visionattn_biformer_stl_nchw').eval()
    with pytest.raises(ValueError, match=r'image of 96x128 is smaller than .* minimum input size 112x112'):
        model(torch.randn(1, 3, 96, 128))
