"""Twins (PCPVT / SVT): official fidelity, checkpoint loading, timm parity and the subtle points.

Spec: ../shared/specs/flatten_agent_convit_davit_twins.md section 6; layouts in
tests/fixtures/official_layouts/twins. The generic API matrix lives in test_models.py.
"""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import visionattn  # noqa: F401
from layouts import load_layout, random_state_dict, variants, wrap
from official_checks import assert_filter_maps_layout, assert_loads_file, assert_param_count, meta_model
from visionattn.layers.conv_pos_enc import ConvPosEnc
from visionattn.layers.spatial_reduction_attention import SpatialReductionAttention
from visionattn.layers.window_attention import WindowAttention
from visionattn.models.twins import FAMILY_CARD, checkpoint_filter_fn

VARIANTS = variants('twins')  # (official variant, visionattn name)
TIMM_NAME = {
    'pcpvt_small_v0': 'twins_pcpvt_small', 'pcpvt_base_v0': 'twins_pcpvt_base',
    'pcpvt_large_v0': 'twins_pcpvt_large', 'alt_gvt_small': 'twins_svt_small',
    'alt_gvt_base': 'twins_svt_base', 'alt_gvt_large': 'twins_svt_large',
}
SMALL = [('pcpvt_small_v0', 'visionattn_twins_pcpvt_small'), ('alt_gvt_small', 'visionattn_twins_svt_small')]
PARAMS = {  # spec section 7, official == timm
    'visionattn_twins_pcpvt_small': 24_106_216, 'visionattn_twins_pcpvt_base': 43_828_456,
    'visionattn_twins_pcpvt_large': 60_989_672, 'visionattn_twins_svt_small': 24_060_776,
    'visionattn_twins_svt_base': 56_070_952, 'visionattn_twins_svt_large': 99_271_400,
}


def test_all_variants_registered():
    assert sorted(n for _, n in VARIANTS) == sorted(visionattn.list_models('twins_*')) == sorted(PARAMS)
    assert sorted(FAMILY_CARD['accuracy']) == sorted(PARAMS)


# ------------------------------------------------------------------------------------------
# parameter counts and checkpoint layouts (meta device: no memory, no time)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('variant,name', VARIANTS)
def test_param_count(variant, name):
    assert_param_count(name, 'twins', variant)
    assert_param_count(name, 'twins', variant, timm_layout=True)
    assert load_layout('twins', variant)['params'] == PARAMS[name]


@pytest.mark.parametrize('timm_layout', [False, True], ids=['official', 'timm'])
@pytest.mark.parametrize('variant,name', VARIANTS)
def test_filter_maps_layout(variant, name, timm_layout):
    assert_filter_maps_layout(name, 'twins', variant, timm_layout=timm_layout)


def test_filter_accepts_own_layout_unchanged():
    model = meta_model('visionattn_twins_svt_small')
    sd = model.state_dict()
    out = checkpoint_filter_fn({'state_dict': {f'module.{k}': v for k, v in sd.items()}}, model)
    assert list(out) == list(sd)


def test_key_counts_match_official():
    """304 (PCPVT-S) and 290 (SVT-S) state_dict entries, no buffers, as the official models."""
    assert len(meta_model('visionattn_twins_pcpvt_small').state_dict()) == 304
    assert len(meta_model('visionattn_twins_svt_small').state_dict()) == 290


@pytest.mark.parametrize('container', ['raw', 'model', 'state_dict', 'module'])
@pytest.mark.parametrize('variant,name', SMALL)
def test_loads_official_file(tmp_path, variant, name, container):
    assert_loads_file(tmp_path, name, 'twins', variant, container, input_size=(1, 3, 64, 64))


def test_loads_timm_file_with_new_head_and_in_chans(tmp_path):
    """timm-layout file; timm drops the classifier for num_classes=10 and adapts the stem to 1 channel."""
    sd = random_state_dict(load_layout('twins', 'alt_gvt_small', timm_layout=True), seed=2)
    path = tmp_path / 'twins_svt_small.pth'
    torch.save(wrap(sd, 'raw'), path)
    model = timm.create_model(
        'visionattn_twins_svt_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
        num_classes=10, in_chans=1).eval()
    got = model.state_dict()
    assert torch.equal(got['stages.2.blocks.3.attn.sr.weight'], sd['blocks.2.3.attn.sr.weight'])
    assert torch.equal(got['stages.3.pos_block.proj.weight'], sd['pos_block.3.proj.0.weight'])
    assert got['stem.proj.weight'].shape == (64, 1, 4, 4)
    torch.testing.assert_close(got['stem.proj.weight'][:, 0], sd['patch_embeds.0.proj.weight'].sum(1))
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 10)


def test_checkpoint_missing_or_unexpected_key_raises_clearly():
    layout = load_layout('twins', 'pcpvt_small_v0')
    model = meta_model('visionattn_twins_pcpvt_small')
    sd = {k: torch.empty(shape, device='meta') for k, shape, _ in layout['state_dict']}
    missing = {k: v for k, v in sd.items() if k != 'blocks.1.2.attn.kv.weight'}
    with pytest.raises(ValueError, match=r'1 missing keys: stages\.1\.blocks\.2\.attn\.kv\.weight'):
        checkpoint_filter_fn(missing, model)
    unexpected = dict(sd, **{'blocks.3.0.attn.sr.weight': torch.empty(512, 512, 1, 1, device='meta')})
    with pytest.raises(ValueError, match=r'1 unexpected keys: stages\.3\.blocks\.0\.attn\.sr\.weight'):
        checkpoint_filter_fn(unexpected, model)
    wrong = dict(sd, **{'pos_block.0.proj.0.weight': torch.empty(64, 1, 5, 5, device='meta')})
    with pytest.raises(ValueError, match=r'shape mismatches: stages\.0\.pos_block\.proj\.weight'):
        checkpoint_filter_fn(wrong, model)
    with pytest.raises(ValueError, match='missing'):  # an SVT checkpoint is no PCPVT checkpoint
        checkpoint_filter_fn(random_state_dict(load_layout('twins', 'alt_gvt_small')), model)


# ------------------------------------------------------------------------------------------
# equivalence with timm's Twins (same weights, fp32, eval)
# ------------------------------------------------------------------------------------------

def _fill_random_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Materialise a meta model with random weights of realistic scale (fast: no init routines)."""
    model.to_empty(device='cpu')
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_(1 + 0.1 * r if 'norm' in name and name.endswith('weight') else 0.02 * r)
            else:
                p.copy_(r / math.sqrt(p[0].numel()))
    return model.eval()


def _timm_pair(name: str, timm_name: str):
    ref = _fill_random_(timm.create_model(timm_name, device='meta'))
    ours = timm.create_model(name, device='meta')
    ours.load_state_dict(checkpoint_filter_fn(ref.state_dict(), ours), strict=True, assign=True)
    return ours.eval(), ref


def _max_diff(ours, ref, size, batch=1):
    x = torch.randn(batch, 3, *size)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.abs().max() > 0.1, 'degenerate logits make the comparison meaningless'
    return (a - b).abs().max().item()


@pytest.mark.parametrize('variant,name', SMALL)
def test_matches_timm_small(variant, name):
    ours, ref = _timm_pair(name, TIMM_NAME[variant])
    for size in [(224, 224), (250, 310)]:  # 250x310: not a multiple of the window (zero-pad) nor of 32
        diff = _max_diff(ours, ref, size)
        assert diff <= 1e-5, f'{name} at {size}: max |dlogit| {diff:.2e}'


@pytest.mark.parametrize('variant,name', [v for v in VARIANTS if v not in SMALL])
def test_matches_timm_224(variant, name):
    ours, ref = _timm_pair(name, TIMM_NAME[variant])
    diff = _max_diff(ours, ref, (224, 224))
    assert diff <= 1e-5, f'{name} at 224: max |dlogit| {diff:.2e}'


def test_gradients_match_timm():
    """Training (out-of-place GELU and residual adds under autograd) gives the same gradients as timm's Twins."""
    ours, ref = _timm_pair('visionattn_twins_svt_small', 'twins_svt_small')
    ours.load_state_dict({k: v.clone() for k, v in ours.state_dict().items()})  # unshare storage with ref
    x = torch.randn(2, 3, 64, 96)
    ours(x).square().mean().backward()
    ref(x).square().mean().backward()
    ref_grads = checkpoint_filter_fn({k: p.grad for k, p in ref.named_parameters()}, ours)
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------------------
# the subtle points (spec 6.4)
# ------------------------------------------------------------------------------------------

def test_peg_runs_after_block0_of_every_stage():
    model = _fill_random_(timm.create_model('visionattn_twins_svt_small', device='meta'))
    calls = []
    for s, stage in enumerate(model.stages):
        assert isinstance(stage.pos_block, ConvPosEnc)
        assert stage.pos_block.proj.groups == stage.out_chs and stage.pos_block.proj.kernel_size == (3, 3)
        stage.pos_block.register_forward_hook(lambda *a, s=s: calls.append((s, 'peg')))
        for j, blk in enumerate(stage.blocks):
            blk.register_forward_hook(lambda *a, s=s, j=j: calls.append((s, j)))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    expected = []
    for s, depth in enumerate((2, 2, 10, 4)):
        expected += [(s, 0), (s, 'peg')] + [(s, j) for j in range(1, depth)]
    assert calls == expected
    # a PEG is a residual: x + dwconv(x)
    peg = model.stages[1].pos_block
    x = torch.randn(1, 5, 6, 128)
    with torch.no_grad():
        conv = F.conv2d(x.permute(0, 3, 1, 2), peg.proj.weight, peg.proj.bias, padding=1, groups=128)
        torch.testing.assert_close(peg(x), x + conv.permute(0, 2, 3, 1))


def test_lsa_gsa_alternation_and_sr_ratios():
    svt = meta_model('visionattn_twins_svt_small')
    for s, stage in enumerate(svt.stages):
        kinds = [type(b.attn) for b in stage.blocks]
        assert kinds == [WindowAttention if j % 2 == 0 else SpatialReductionAttention for j in range(len(kinds))]
        for j, blk in enumerate(stage.blocks):
            if j % 2 == 0:
                assert blk.attn.window_size == 7
            else:
                assert blk.attn.sr_ratio == (8, 4, 2, 1)[s]
    assert [type(b.attn).__name__[:6] for b in svt.stages[3].blocks] == ['Window', 'Spatia', 'Window', 'Spatia']
    pcpvt = meta_model('visionattn_twins_pcpvt_small')
    for s, stage in enumerate(pcpvt.stages):
        for blk in stage.blocks:
            assert isinstance(blk.attn, SpatialReductionAttention) and blk.attn.sr_ratio == (8, 4, 2, 1)[s]
            if s < 3:
                assert blk.attn.sr.kernel_size == blk.attn.sr.stride == ((8, 4, 2)[s],) * 2
            else:  # sr = 1: no sr / norm submodules, hence no such keys
                assert blk.attn.sr is None and blk.attn.norm is None
    assert not [k for k in pcpvt.state_dict() if k.startswith('stages.3.') and ('.sr.' in k or 'attn.norm' in k)]


def test_norm_eps():
    model = meta_model('visionattn_twins_pcpvt_small')
    assert model.stem.norm.eps == 1e-5
    for s, stage in enumerate(model.stages):
        if s > 0:
            assert stage.downsample.norm.eps == 1e-5
        for blk in stage.blocks:
            assert blk.norm1.eps == blk.norm2.eps == 1e-6
            if blk.attn.norm is not None:
                assert blk.attn.norm.eps == 1e-5
    assert model.norm.eps == 1e-6


def test_feature_shapes_at_odd_size():
    """Spec 6.5: SVT-S at 230x300 -> 57x75, 28x37, 14x18, 7x9 (floor division in the patch convs)."""
    model = meta_model('visionattn_twins_svt_small', features_only=True)
    outs = model(torch.empty(1, 3, 230, 300, device='meta'))
    assert [tuple(o.shape[1:]) for o in outs] == [(64, 57, 75), (128, 28, 37), (256, 14, 18), (512, 7, 9)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]


def test_default_cfgs_and_kwargs():
    cfg = timm.models.get_pretrained_cfg('visionattn_twins_svt_small')
    assert cfg.hf_hub_id == 'timm/twins_svt_small.in1k'
    assert (cfg.crop_pct, cfg.interpolation, cfg.pool_size) == (0.9, 'bicubic', (7, 7))
    assert (cfg.first_conv, cfg.classifier, cfg.fixed_input_size) == ('stem.proj', 'head.fc', False)
    with pytest.raises(TypeError, match='not_an_arg'):
        timm.create_model('visionattn_twins_svt_small', device='meta', not_an_arg=1)
    model = meta_model('visionattn_twins_svt_small', drop_rate=0.1, drop_path_rate=0.2)
    assert model.head.drop.p == 0.1
    assert model.stages[3].blocks[3].drop_path1.drop_prob == pytest.approx(0.2)
    assert model.no_weight_decay() == {f'stages.{s}.pos_block.proj.{p}' for s in range(4) for p in ('weight', 'bias')}


def test_spatial_reduction_attention_reference():
    """Generic SRA (reused by PVT): equals a direct softmax(q k^T / sqrt(d)) v with reduced keys."""
    torch.manual_seed(0)
    for sr_ratio, (H, W) in [(2, (7, 9)), (1, (3, 5))]:
        attn = SpatialReductionAttention(32, num_heads=4, sr_ratio=sr_ratio).eval()
        x = torch.randn(2, H, W, 32)
        with torch.no_grad():
            out = attn(x)
            q = attn.q(x).reshape(2, H * W, 4, 8).transpose(1, 2)
            kv_in = x.reshape(2, H * W, 32)
            if sr_ratio > 1:
                kv_in = attn.norm(attn.sr(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2))
                assert kv_in.shape[1] == (H // sr_ratio) * (W // sr_ratio)
            k, v = attn.kv(kv_in).reshape(2, -1, 2, 4, 8).permute(2, 0, 3, 1, 4)
            a = (q @ k.transpose(-2, -1) / math.sqrt(8)).softmax(-1)
            ref = attn.proj((a @ v).transpose(1, 2).reshape(2, H, W, 32))
        assert out.shape == x.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert not any('sr' in k or 'norm' in k for k in SpatialReductionAttention(32, 4, sr_ratio=1).state_dict())
