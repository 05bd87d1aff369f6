"""DaViT: official fidelity, checkpoint loading, timm parity and the subtle points.

Spec: ../shared/specs/flatten_agent_convit_davit_twins.md section 5; layouts in
tests/fixtures/official_layouts/davit. The generic API matrix lives in test_models.py.
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
from visionattn.layers.channel_attention import ChannelAttention, channel_attention, folded_channel_attention
from visionattn.layers.fused_linear import fused_linear
from visionattn.models.davit import FAMILY_CARD, FusedConvPosEnc, checkpoint_filter_fn

VARIANTS = variants('davit')  # (official variant, visionattn name), from name_map.json
TIMM_NAME = {
    'DaViT_tiny': 'davit_tiny', 'DaViT_small': 'davit_small', 'DaViT_base': 'davit_base',
    'DaViT_large_window12_384': 'davit_large',
}
PARAMS = {  # spec section 5.1 (official == timm); huge / giant are timm-only
    'visionattn_davit_tiny': 28_360_168, 'visionattn_davit_small': 49_745_896,
    'visionattn_davit_base': 87_954_408, 'visionattn_davit_large': 196_811_752,
    'visionattn_davit_huge': 348_922_856, 'visionattn_davit_giant': 1_406_470_120,
}


def test_all_variants_registered():
    assert sorted(visionattn.list_models('davit_*')) == sorted(PARAMS)
    assert sorted(n for _, n in VARIANTS) == sorted(set(PARAMS) - {'visionattn_davit_huge', 'visionattn_davit_giant'})
    assert sorted(FAMILY_CARD['accuracy']) == sorted(PARAMS)


# ------------------------------------------------------------------------------------------
# parameter counts and checkpoint layouts (meta device: no memory, no time)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('variant,name', VARIANTS)
def test_param_count_official(variant, name):
    assert_param_count(name, 'davit', variant)
    assert_param_count(name, 'davit', variant, timm_layout=True)
    assert load_layout('davit', variant)['params'] == PARAMS[name]


@pytest.mark.parametrize('name', ['visionattn_davit_huge', 'visionattn_davit_giant'])
def test_param_count_timm_only(name):
    model = meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    ref = timm.create_model(name.replace('visionattn_', ''), device='meta')
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@pytest.mark.parametrize('timm_layout', [False, True], ids=['official', 'timm'])
@pytest.mark.parametrize('variant,name', VARIANTS)
def test_filter_maps_layout(variant, name, timm_layout):
    assert_filter_maps_layout(name, 'davit', variant, timm_layout=timm_layout)


def test_own_layout_is_timm_layout():
    """212 state_dict entries, no buffers, keys in timm's order; the filter passes them through."""
    model = meta_model('visionattn_davit_tiny')
    sd = model.state_dict()
    assert len(sd) == 212 and not list(model.buffers())
    assert list(sd) == [k for k, _, _ in load_layout('davit', 'DaViT_tiny', timm_layout=True)['state_dict']]
    out = checkpoint_filter_fn({'model': {f'module.{k}': v for k, v in sd.items()}}, model)
    assert list(out) == list(sd)


@pytest.mark.parametrize('container', ['raw', 'model', 'state_dict', 'module'])
def test_loads_official_file(tmp_path, container):
    assert_loads_file(tmp_path, 'visionattn_davit_tiny', 'davit', 'DaViT_tiny', container, input_size=(1, 3, 64, 64))


def test_loads_timm_file_with_new_head_and_in_chans(tmp_path):
    """timm-layout file; timm drops the classifier for num_classes=10 and adapts the stem to 1 channel."""
    sd = random_state_dict(load_layout('davit', 'DaViT_tiny', timm_layout=True), seed=2)
    path = tmp_path / 'davit_tiny.pth'
    torch.save(wrap(sd, 'state_dict'), path)
    model = timm.create_model(
        'visionattn_davit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
        num_classes=10, in_chans=1).eval()
    got = model.state_dict()
    assert torch.equal(got['stages.2.blocks.1.1.attn.qkv.weight'], sd['stages.2.blocks.1.1.attn.qkv.weight'])
    assert got['stem.conv.weight'].shape == (96, 1, 7, 7) and got['head.fc.weight'].shape == (10, 768)
    torch.testing.assert_close(got['stem.conv.weight'][:, 0], sd['stem.conv.weight'].sum(1))
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 10)


def test_checkpoint_missing_or_unexpected_key_raises_clearly():
    layout = load_layout('davit', 'DaViT_tiny')
    model = meta_model('visionattn_davit_tiny')
    sd = {k: torch.empty(shape, device='meta') for k, shape, _ in layout['state_dict']}
    missing = {k: v for k, v in sd.items() if k != 'main_blocks.2.1.1.cpe.1.proj.weight'}
    with pytest.raises(ValueError, match=r'1 missing keys: stages\.2\.blocks\.1\.1\.cpe2\.proj\.weight'):
        checkpoint_filter_fn(missing, model)
    unexpected = dict(sd, **{'main_blocks.3.1.0.attn.qkv.weight': torch.empty(2304, 768, device='meta')})
    with pytest.raises(ValueError, match=r'1 unexpected keys: stages\.3\.blocks\.1\.0\.attn\.qkv\.weight'):
        checkpoint_filter_fn(unexpected, model)
    wrong = dict(sd, **{'patch_embeds.2.norm.weight': torch.empty(384, device='meta')})
    with pytest.raises(ValueError, match=r'shape mismatches: stages\.2\.downsample\.norm\.weight'):
        checkpoint_filter_fn(wrong, model)
    with pytest.raises(ValueError, match='unexpected'):  # a DaViT-S checkpoint is no DaViT-T checkpoint
        checkpoint_filter_fn({k: torch.empty(s, device='meta') for k, s, _ in
                              load_layout('davit', 'DaViT_small')['state_dict']}, model)


# ------------------------------------------------------------------------------------------
# equivalence with timm's DaViT (same weights, fp32, eval)
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


def _timm_pair(name: str, timm_name: str, **kwargs):
    ref = _fill_random_(timm.create_model(timm_name, device='meta', **kwargs))
    ours = timm.create_model(name, device='meta', **kwargs)
    ours.load_state_dict(checkpoint_filter_fn(ref.state_dict(), ours), strict=True, assign=True)
    return ours.eval(), ref


def _max_diff(ours, ref, x):
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.abs().max() > 0.1, 'degenerate logits make the comparison meaningless'
    return (a - b).abs().max().item()


def test_matches_timm_tiny():
    ours, ref = _timm_pair('visionattn_davit_tiny', 'davit_tiny')
    for size in [(224, 224), (250, 310)]:  # 250x310: stem pad, odd maps for the 2x2 downsample, window pad
        diff = _max_diff(ours, ref, torch.randn(1, 3, *size))
        assert diff <= 1e-5, f'davit_tiny at {size}: max |dlogit| {diff:.2e}'


@pytest.mark.parametrize('fold', [False, True], ids=['literal', 'folded'])
def test_matches_timm_tiny_window12(fold):
    """The official large model's window (12) at a size that needs padding in every stage, with both
    channel-attention evaluations (stage 1 has 825 tokens >= 96 channels, so it folds when asked)."""
    ours, ref = _timm_pair('visionattn_davit_tiny', 'davit_tiny', window_size=12)
    if fold:
        folded = timm.create_model('visionattn_davit_tiny', device='meta', window_size=12, channel_attn_fold=True)
        folded.load_state_dict(ours.state_dict(), strict=True, assign=True)
        ours = folded.eval()
        assert ours.stages[0].blocks[0][1].attn.fold
    assert ours.stages[0].blocks[0][0].attn.window_size == 12
    diff = _max_diff(ours, ref, torch.randn(1, 3, 100, 130))
    assert diff <= 1e-5, f'davit_tiny window 12 ({"folded" if fold else "literal"}): max |dlogit| {diff:.2e}'


@pytest.mark.parametrize('variant', ['DaViT_small', 'DaViT_base'])
def test_matches_timm_small_base(variant):
    """Reduced, non-square input keeps the suite fast; 224x224 was checked when the family landed
    (max |dlogit| 8.3e-7 small, 8.9e-7 base)."""
    name = dict(VARIANTS)[variant]
    ours, ref = _timm_pair(name, TIMM_NAME[variant])
    diff = _max_diff(ours, ref, torch.randn(1, 3, 64, 96))
    assert diff <= 1e-5, f'{name}: max |dlogit| {diff:.2e}'


@pytest.mark.parametrize('fold', [False, True], ids=['literal', 'folded'])
def test_gradients_and_grad_mode_match_timm(fold):
    """Training path (plain ops, no fusion) and its backward, literal or folded, equal timm's; the
    fused inference path (oneDNN linears) agrees with the training path to fp32 round-off."""
    ref = _fill_random_(timm.create_model('davit_tiny', device='meta'))
    ours = timm.create_model('visionattn_davit_tiny', channel_attn_fold=fold).eval()
    ours.load_state_dict(checkpoint_filter_fn(ref.state_dict(), ours), strict=True)
    x = torch.randn(2, 3, 64, 64)  # stage 1: 256 tokens >= 96 channels (folded if asked); later stages literal
    out = ours(x)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), out, rtol=0, atol=1e-5)  # inference path == training path
    out.square().mean().backward()
    ref(x).square().mean().backward()
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------------------
# the subtle points (spec 5.3 / 5.5)
# ------------------------------------------------------------------------------------------

def _official_channel_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads):
    """Transcription of the official ChannelAttention.forward (dingmyu/davit) on [B, N, C]."""
    B, N, C = x.shape
    qkv = F.linear(x, qkv_w, qkv_b).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    k = k * (C // heads) ** -0.5
    attention = (k.transpose(-1, -2) @ v).softmax(dim=-1)
    out = (attention @ q.transpose(-1, -2)).transpose(-1, -2)
    return F.linear(out.transpose(1, 2).reshape(B, N, C), proj_w, proj_b)


@pytest.mark.parametrize('qkv_bias', [True, False])
@pytest.mark.parametrize('fold', [True, False])
@pytest.mark.parametrize('hw', [(12, 10), (3, 5)], ids=['tokens>=channels', 'tokens<channels'])
def test_channel_attention_role_order(hw, fold, qkv_bias):
    """Equals the official formula (q as values, k scaled by head_dim^-0.5), to fp32 round-off,
    in both evaluations (the folded one only applies where tokens >= channels).

    Weights of std 0.3 give peaky channel softmaxes; the reference is the official formula in fp64,
    and the tolerance is the order of the official fp32 code's own error against it.
    """
    C, heads = 64, 4
    attn = ChannelAttention(C, heads, qkv_bias=qkv_bias, fold=fold).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, *hw, C)
    with torch.no_grad():
        w = {k: v.double() for k, v in attn.state_dict().items()}
        expected = _official_channel_attention(
            x.double().reshape(2, -1, C), w['qkv.weight'], w.get('qkv.bias'), w['proj.weight'], w['proj.bias'],
            heads).reshape(x.shape)
        got = attn(x).double()
        tol = 4e-6 * expected.abs().max().item()
        assert (got - expected).abs().max().item() <= tol
        # the paper-notation reading (softmax(q^T k) applied to v) is a different function
        q, k, v = F.linear(x.reshape(2, -1, C), attn.qkv.weight, attn.qkv.bias).reshape(
            2, -1, 3, heads, C // heads).unbind(2)
        paper = attn.proj(torch.einsum('bnhj,bhij->bnhi', v, torch.einsum(
            'bnhi,bnhj->bhij', q * (C // heads) ** -0.5, k).softmax(-1)).reshape(2, -1, C))
        assert (paper.reshape(x.shape).double() - expected).abs().max() > 1e-2


def test_channel_attention_functions_agree():
    """Literal and folded forms on the same weights, on a stage-1-sized map (3136 tokens)."""
    C, heads = 96, 3
    attn = ChannelAttention(C, heads)
    x = torch.randn(1, 56 * 56, C)
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(1, -1, 3, heads, C // heads).unbind(2)
        literal = attn.proj(channel_attention(q, k, v, attn.scale).reshape(x.shape))
        folded = folded_channel_attention(
            x, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, heads, attn.scale)
    torch.testing.assert_close(folded, literal, rtol=0, atol=1e-5 * literal.abs().max().item())


@pytest.mark.parametrize('act', ['none', 'gelu'])
@pytest.mark.parametrize('with_residual', [False, True])
def test_fused_linear_matches_plain_ops(act, with_residual):
    """oneDNN-fused (inference) and plain (autograd) paths compute act(x W^T + b) + residual."""
    x, w, b = torch.randn(3, 5, 7, 48), torch.randn(96, 48) / 7, torch.randn(96)
    res = torch.randn(3, 5, 7, 96) if with_residual else None
    res_copy = res.clone() if with_residual else None
    expected = F.linear(x, w, b)
    expected = (F.gelu(expected) if act == 'gelu' else expected) + (res if with_residual else 0)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear(x, w, b, act=act, residual=res), expected, rtol=1e-5, atol=1e-5)
    wg = w.clone().requires_grad_()
    out = fused_linear(x, wg, b, act=act, residual=res)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert wg.grad is not None
    if with_residual:
        assert torch.equal(res, res_copy)  # inputs are never modified
    with pytest.raises(ValueError, match='act'):
        fused_linear(x, w, b, act='relu')


def test_cpe_is_residual_depthwise_conv():
    cpe = FusedConvPosEnc(32, 3)
    x = torch.randn(2, 5, 7, 32)
    with torch.no_grad():
        conv = F.conv2d(x.permute(0, 3, 1, 2), cpe.proj.weight, cpe.proj.bias, padding=1, groups=32)
        torch.testing.assert_close(cpe(x), x + conv.permute(0, 2, 3, 1))
    assert [k for k, _ in cpe.named_parameters()] == ['proj.weight', 'proj.bias']


def test_block_structure():
    """Two CPEs per block in both block types; spatial then channel; stem/downsample/head order."""
    model = _fill_random_(timm.create_model('visionattn_davit_tiny', device='meta'))
    pair = model.stages[2].blocks[1]
    assert [type(b).__name__ for b in pair] == ['SpatialBlock', 'ChannelBlock']
    for blk in pair:
        assert [n for n, _ in blk.named_children()][:6] == ['cpe1', 'norm1', 'attn', 'drop_path1', 'cpe2', 'norm2']
        assert blk.cpe1.proj.groups == blk.cpe2.proj.groups == 384
    # downsample: LayerNorm over the *input* channels, then 2x2/s2 conv; stem: 7x7/s4 conv then norm
    ds = model.stages[1].downsample
    assert ds.norm.normalized_shape == (96,) and ds.conv.kernel_size == (2, 2) and ds.conv.stride == (2, 2)
    assert model.stem.conv.kernel_size == (7, 7) and model.stem.norm.normalized_shape == (96,)
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.LayerNorm))
    # stem pads to a multiple of 4, downsample to even: 65x70 -> 17x18 -> 9x9 -> 5x5 -> 3x3
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, 65, 70), intermediates_only=True)
        assert [tuple(f.shape[-2:]) for f in feats] == [(17, 18), (9, 9), (5, 5), (3, 3)]
        # head: global average pool -> LayerNorm -> Linear
        f = feats[-1]
        head = model.head
        pooled = F.layer_norm(f.mean((2, 3)), (768,), head.norm.weight, head.norm.bias, eps=1e-5)
        torch.testing.assert_close(model.forward_head(f), head.fc(pooled))


def test_drop_path_follows_official_linspace():
    """One rate per spatial / channel block, linear over all 2 * sum(depths) of them (official code)."""
    model = meta_model('visionattn_davit_tiny', drop_path_rate=0.3)
    rates = []
    for stage in model.stages:
        for pair in stage.blocks:
            for blk in pair:
                r1, r2 = (getattr(blk.drop_path1, 'drop_prob', 0.), getattr(blk.drop_path2, 'drop_prob', 0.))
                assert r1 == r2
                rates.append(r1)
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 12))


def test_pretrained_cfgs():
    for size in ('tiny', 'small', 'base'):
        cfg = timm.models.get_pretrained_cfg(f'visionattn_davit_{size}.msft_in1k')
        assert cfg.hf_hub_id == f'timm/davit_{size}.msft_in1k'
        ref = timm.models.get_pretrained_cfg(f'davit_{size}.msft_in1k')
        for key in ('input_size', 'pool_size', 'crop_pct', 'interpolation', 'mean', 'std', 'first_conv', 'classifier'):
            assert getattr(cfg, key) == getattr(ref, key), key
    large = timm.models.get_pretrained_cfg('visionattn_davit_large')
    assert large.input_size == (3, 384, 384) and large.pool_size == (12, 12)
    model = meta_model('visionattn_davit_large')
    assert model.stages[0].blocks[0][0].attn.window_size == 12
    assert meta_model('visionattn_davit_giant').stages[0].blocks[0][0].attn.window_size == 7
    with pytest.raises(TypeError):
        timm.create_model('visionattn_davit_tiny', device='meta', not_an_argument=1)
