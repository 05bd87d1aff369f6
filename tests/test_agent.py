"""Agent attention (Agent-DeiT / PVT / Swin / CSwin, 18 variants) against the official code.

Spec: ../shared/specs/flatten_agent_convit_davit_twins.md §3.2-3.6 and §7; layouts in
tests/fixtures/official_layouts/agent. The reference is tests/agent_reference.py, a transcription of the official
``agent_transformer/models/agent_{swin,pvt,deit,cswin}.py`` (and of the downstream Agent-Swin attention for the
agent-grid resize); the generic API matrix lives in test_models.py.
"""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import visionattn  # noqa: F401
from agent_reference import (
    REF_VARIANTS, AgentCSWinTransformer, AgentDeiT, AgentPVT, AgentSwinTransformer, DeitAgentAttention,
    build_reference, downstream_agent_attention, official_agent)
from layouts import load_layout, variants
from official_checks import assert_filter_maps_layout, assert_param_count, family_filter, meta_model
from visionattn.layers.agent_attention import AgentAttention, agent_position_biases

VARIANTS = variants('agent')  # (official layout, visionattn name)
PARAMS = {  # spec §3.2 / §7
    'agent_deit_t': 6_015_640, 'agent_deit_s': 22_647_112, 'agent_deit_s_448': 23_070_472,
    'agent_deit_b': 87_204_904,
    'agent_pvt_t': 11_570_352, 'agent_pvt_s': 20_635_066, 'agent_pvt_m': 35_921_746, 'agent_pvt_m_256': 36_083_682,
    'agent_pvt_b': 48_738_180,
    'agent_swin_t': 28_902_964, 'agent_swin_s': 49_666_684, 'agent_swin_s_288': 49_707_964,
    'agent_swin_b': 88_095_096, 'agent_swin_b_384': 88_305_016,
    'agent_cswin_t': 20_458_672, 'agent_cswin_s': 32_814_100, 'agent_cswin_b': 73_249_696,
    'agent_cswin_b_384': 73_328_416,
}
SWIN_T, PVT_T = 'visionattn_agent_swin_tiny', 'visionattn_agent_pvt_tiny'
DEIT_T, CSWIN_T = 'visionattn_agent_deit_tiny', 'visionattn_agent_cswin_tiny'
F64 = torch.float64


def _perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter away from its init at a scale where it matters: the agent / cls / pos biases ~0.5, norms
    1 +- 0.2, other vectors ~0.1, matrices and convs ~1/sqrt(fan-in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype)
            if 'norm' in n and n.endswith('weight'):
                p.copy_(1 + 0.2 * r)
            elif n.endswith(('an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias', 'ac_bias', 'ca_bias',
                             'cls_token')) or 'pos_embed' in n:
                p.copy_(0.5 * r)
            elif p.ndim == 1:
                p.copy_(0.1 * r)
            else:
                p.copy_(r / math.sqrt(p[0].numel()))
    return model


def _pair(name, ref, dtype=F64, **kwargs):
    """(ours, reference): the reference perturbed, its official state dict loaded through the family's
    checkpoint filter into ``name`` (built on meta, strict)."""
    ref = _perturb_(ref.to(dtype)).eval()
    ours = timm.create_model(name, device='meta', **kwargs).eval()
    ours.load_state_dict(family_filter(ours)(ref.state_dict(), ours), strict=True, assign=True)
    return ours, ref


def _perturbed_model(name, **kwargs):
    """A visionattn model with every parameter perturbed, built on meta (no init cost; the agent models hold no
    buffers)."""
    model = timm.create_model(name, device='meta', **kwargs)
    assert not list(model.buffers())
    return _perturb_(model.to_empty(device='cpu')).eval()


def _max_diff(ours, ref, x):
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert b.abs().max() > 0.5, 'degenerate logits make the comparison meaningless'
    return (a - b).abs().max().item()


def _kinds(model):
    return [[type(b.attn).__name__ for b in s.blocks] for s in model.stages]


def test_all_variants_registered():
    assert sorted(visionattn.list_models('agent_*')) == sorted(n for _, n in VARIANTS)
    assert sorted(v for v, _ in VARIANTS) == sorted(PARAMS) == sorted(REF_VARIANTS)


# ------------------------------------------------------------------------------------------
# parameter counts and checkpoint layouts (meta device)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('variant,name', VARIANTS)
def test_param_count_and_layout(variant, name):
    assert load_layout('agent', variant)['params'] == PARAMS[variant]
    assert_param_count(name, 'agent', variant)
    assert_filter_maps_layout(name, 'agent', variant)


@pytest.mark.parametrize('variant', sorted(REF_VARIANTS))
def test_reference_has_the_official_layout(variant):
    """The transcription's state dict is the official one key for key, shape for shape, in order (so the
    equivalence tests below feed the filter exactly the official layout)."""
    layout = load_layout('agent', variant)
    with torch.device('meta'):
        ref = build_reference(variant)
    assert [(k, list(v.shape)) for k, v in ref.state_dict().items()] == [(k, s) for k, s, _ in layout['state_dict']]
    assert sum(p.numel() for p in ref.parameters()) == layout['params']


def test_filter_maps_official_keys_to_the_right_tensors():
    """Key identity through the filter (not only shapes): agent biases, q / kv (PVT), cls biases (DeiT), CSwin
    agent branch, Swin B blocks; Agent-PVT has no final norm."""
    ref = build_reference('agent_pvt_t', img_size=64)
    sd = ref.state_dict()
    model = meta_model(PVT_T, img_size=64)
    out = family_filter(model)(sd, model)
    assert out['stages.1.blocks.1.attn.na_bias'] is sd['block2.1.attn.na_bias']
    assert out['stages.2.blocks.0.attn.kv.weight'] is sd['block3.0.attn.kv.weight']
    assert not any(k.startswith('norm.') for k in out) and 'norm.weight' not in model.state_dict()
    sd = build_reference('agent_deit_t', img_size=64).state_dict()
    model = meta_model(DEIT_T, img_size=64)
    out = family_filter(model)(sd, model)
    assert out['blocks.3.attn.ca_bias'] is sd['blocks.3.attn.ca_bias'] and out['cls_token'] is sd['cls_token']
    sd = build_reference('agent_cswin_t', img_size=64, la_split_size='16-8-4-2', split_size=(1, 2, 2, 2)).state_dict()
    model = meta_model(CSWIN_T, img_size=64, split_sizes=(1, 2, 2, None))
    out = family_filter(model)(sd, model)
    assert out['stages.1.blocks.3.attns.0.ha_bias'] is sd['stage2.3.attns.0.ha_bias']
    assert out['stages.2.blocks.5.attns.1.get_v.weight'] is sd['stage3.5.attns.1.get_v.weight']
    sd = build_reference('agent_swin_t', img_size=64).state_dict()
    model = meta_model(SWIN_T, img_size=64)
    out = family_filter(model)(sd, model)
    assert out['stages.2.blocks.5.attn.wa_bias'] is sd['layers.2.blocks.5.attn.wa_bias']
    assert out['stages.3.blocks.1.attn.relative_position_bias_table'] is \
        sd['layers.3.blocks.1.attn.relative_position_bias_table']


# ------------------------------------------------------------------------------------------
# fidelity against the official transcription (every parameter perturbed)
# ------------------------------------------------------------------------------------------

def test_swin_tiny_matches_official_fp32_224():
    """Agent-Swin-T at its training size: AAAB, global agents over 56² / 28² / 14² (9 / 16 / 49 agents),
    stage 4 W-MSA 7x7 (clamped, no shift); logits <= 1e-5."""
    ours, ref = _pair(SWIN_T, AgentSwinTransformer(), dtype=torch.float32)
    assert _kinds(ours) == [['AgentAttention'] * 2] * 2 + [['AgentAttention'] * 6, ['SwinWindowAttention'] * 2]
    assert [b.attn.agent_shape for s in ours.stages[:3] for b in s.blocks[:1]] == [(3, 3), (4, 4), (7, 7)]
    diff = _max_diff(ours, ref, torch.randn(2, 3, 224, 224))
    assert diff <= 1e-5, f'max |dlogit| {diff:.2e}'


@pytest.mark.parametrize('name,ref_fn,size,kwargs', [
    # Agent-Swin-T at 64: agents over 16² (3x3 from uneven bins) / 8² / 4² (7x7 pooled *up* from 4x4), B window
    # clamped to the 2x2 map
    (SWIN_T, lambda: AgentSwinTransformer(img_size=64), 64, dict(img_size=64)),
    # Agent-PVT-T at its training size 224 (AAAA: 56² -> 3x3, 28² -> 4x4, 14² -> 7x7, 7² -> 7x7; no final norm)
    (PVT_T, lambda: AgentPVT(), 224, {}),
    # Agent-DeiT-T at 224: 197 tokens, h = w = int(sqrt(197)) = 14, cls biases, dwc on patch tokens only
    (DEIT_T, lambda: AgentDeiT(), 224, {}),
    # Agent-CSwin-T at 64 with fewer blocks (the same code per block): AABB, global agent branches over 16² / 8²,
    # stage 3 LePE stripes of 2, stage 4 global LePE
    (CSWIN_T, lambda: AgentCSWinTransformer(img_size=64, depth=(2, 2, 3, 1), split_size=(1, 2, 2, 2),
                                            la_split_size='16-8-4-2'),
     64, dict(img_size=64, depths=(2, 2, 3, 1), split_sizes=(1, 2, 2, None))),
], ids=['swin_t@64', 'pvt_t@224', 'deit_t@224', 'cswin_t@64'])
def test_smallest_variants_match_official_float64(name, ref_fn, size, kwargs):
    ours, ref = _pair(name, ref_fn(), **kwargs)
    diff = _max_diff(ours, ref, torch.randn(1, 3, size, size, dtype=F64))
    assert diff <= 1e-10, f'max |dlogit| {diff:.2e}'


def test_cswin_tiny_agent_branches_are_global():
    model = meta_model(CSWIN_T)
    kinds = [[(type(b.attns[0]).__name__, len(b.attns), b.split_size) for b in s.blocks] for s in model.stages]
    assert kinds == [[('AgentBranch', 1, None)] * 2, [('AgentBranch', 1, None)] * 4,
                     [('CSwinAttention', 2, 7)] * 18, [('CSwinAttention', 1, None)]]
    assert model.stages[0].blocks[0].attns[0].grid_size == (56, 56)


@pytest.mark.parametrize('name,img_size,window,attn_type,depths,windows', [
    # Agent-Swin-B's 'AAMB2': stage 3 = [A, A, B, B shifted by 3 with the Swin mask], B window max(7, 56 // 8) = 7
    ('visionattn_agent_swin_base', 224, 56, 'AAMB2', (2, 2, 4, 2), [(7, 7, 0, 0), (7, 7, 3, 3)]),
    # Agent-Swin-S@288's 'AABB' with agent window 72: B window max(7, 72 // 8) = 9, shifted by 4 at 18x18
    ('visionattn_agent_swin_small_288', 288, 72, 'AABB', (2, 2, 2, 2), [(9, 9, 0, 0), (9, 9, 4, 4)]),
], ids=['AAMB2@224', 'AABB@288'])
def test_swin_narrow_configs_match_official_float64(name, img_size, window, attn_type, depths, windows):
    """The released block patterns on a narrow model at the real training size (float64): global agent stages,
    then Swin W-MSA blocks with the official window rule, shift and mask; stage 4 B clamped to its map."""
    cfg = dict(embed_dim=16, depths=depths, num_heads=(1, 2, 4, 8), attn_type=attn_type, num_classes=10,
               img_size=img_size, window_size=window)
    ours, ref = _pair(name, AgentSwinTransformer(**cfg), embed_dims=(16, 32, 64, 128), depths=depths,
                      num_heads=(1, 2, 4, 8), num_classes=10)
    side = img_size // 16
    blocks = ours.stages[2].blocks
    assert [type(b.attn).__name__ for b in blocks] == \
        ['AgentAttention'] * (depths[2] - 2) + ['SwinWindowAttention'] * 2
    assert [b.window_and_shift(side, side) for b in blocks[-2:]] == windows
    assert ref.layers[2].blocks[-1].attn_mask is not None  # the reference really runs a masked shifted block
    assert ours.stages[0].blocks[1].attn.grid_size == (img_size // 4,) * 2
    diff = _max_diff(ours, ref, torch.randn(1, 3, img_size, img_size, dtype=F64))
    assert diff <= 1e-10, f'max |dlogit| {diff:.2e}'


def test_released_swin_base_block_types():
    model = meta_model('visionattn_agent_swin_base_384')
    kinds = _kinds(model)
    assert kinds[:2] == [['AgentAttention'] * 2] * 2 and kinds[3] == ['SwinWindowAttention'] * 2
    assert kinds[2] == ['AgentAttention'] * 2 + ['SwinWindowAttention'] * 16
    assert model.stages[2].blocks[3].window_and_shift(24, 24) == (12, 12, 6, 6)  # max(7, 96 // 8) = 12
    assert model.stages[0].blocks[0].attn.grid_size == (96, 96)


def test_deit_partial_agent_layer_matches_official_float64():
    """Agent-DeiT-B's ``agent_layer`` on a small DeiT at 96 (6x6 patches): blocks 0-1 agent blocks with 16 agents
    (4x4 from 6x6: uneven bins), blocks 2-3 plain DeiT blocks."""
    ref = AgentDeiT(img_size=96, embed_dim=48, depth=4, num_heads=3, agent_num=(16,) * 4, agent_layer=2)
    ours, ref = _pair(DEIT_T, ref, img_size=96, embed_dim=48, depth=4, num_heads=3, agent_num=16, agent_layer=2)
    assert [type(b.attn).__name__ for b in ours.blocks] == ['AgentAttention'] * 2 + ['Attention'] * 2
    assert [type(b.attn).__name__ for b in meta_model('visionattn_agent_deit_base').blocks] == \
        ['AgentAttention'] * 4 + ['Attention'] * 8
    diff = _max_diff(ours, ref, torch.randn(2, 3, 96, 96, dtype=F64))
    assert diff <= 1e-10, f'max |dlogit| {diff:.2e}'


def test_official_init():
    """All six (DeiT: eight) biases trunc_normal(0.02), linear layers trunc_normal(0.02) with zero bias."""
    torch.manual_seed(0)
    swin = timm.create_model(SWIN_T, img_size=64, embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))
    deit = timm.create_model(DEIT_T, img_size=64, depth=2, embed_dim=48)
    for attn in [swin.stages[2].blocks[0].attn, deit.blocks[0].attn]:
        names = ['an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias'] + \
            (['ac_bias', 'ca_bias'] if attn.num_prefix_tokens else [])
        for n in names:
            p = getattr(attn, n)
            assert 0.014 < p.std().item() < 0.026 and p.abs().max() < 0.1, n
        assert abs(attn.qkv.weight.std().item() - 0.02) < 0.003 and not attn.qkv.bias.any()
    assert abs(swin.stages[2].blocks[0].attn.an_bias.std().item() - 0.02) < 0.002
    with pytest.raises(ValueError, match='perfect square'):
        AgentAttention(16, 2, (4, 4), agent_num=10)


# ------------------------------------------------------------------------------------------
# §3.5 details against hand-written expectations
# ------------------------------------------------------------------------------------------

def _softmax_agent(q, k, v, agents, k_bias, q_bias, heads):
    """Steps 4 and 6 written out for (B, N, C) q / k / v and (B, A, C) agents."""
    B, N, C = q.shape
    d = C // heads
    split = lambda t: t.reshape(B, t.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    q, k, v, a = split(q), split(k), split(v), split(agents)
    agent_v = ((a * d ** -0.5) @ k.transpose(-2, -1) + k_bias).softmax(-1) @ v
    out = ((q * d ** -0.5) @ a.transpose(-2, -1) + q_bias).softmax(-1) @ agent_v
    return out.transpose(1, 2).reshape(B, N, C)


def test_agents_pool_queries_in_uneven_overlapping_bins():
    """56 -> 3 agents per axis: AdaptiveAvgPool2d bins [0, 19), [18, 38), [37, 56) (spec §3.5); the module's
    output equals a hand computation with exactly those bins over the *queries*, and not one with the
    strided bins [0, 18), [18, 36), [36, 54) or one pooling the keys."""
    bins = [(0, 19), (18, 38), (37, 56)]
    t = torch.arange(56, dtype=F64)
    assert torch.equal(F.adaptive_avg_pool1d(t.view(1, 1, 56), 3).flatten(), torch.tensor([9.0, 27.5, 46.0], dtype=F64))
    m = _perturb_(AgentAttention(16, 2, (56, 56), agent_num=9)).to(F64).eval()
    x = torch.randn(2, 56 * 56, 16, dtype=F64)
    q, k, v = m.qkv(x).reshape(2, -1, 3, 16).unbind(2)
    k_bias, q_bias = m.biases(56, 56)

    def hand(src, edges):
        img = src.reshape(2, 56, 56, 16)
        return torch.stack([img[:, r0:r1, c0:c1].mean((1, 2)) for r0, r1 in edges for c0, c1 in edges], 1)

    def expected(agents):
        out = _softmax_agent(q, k, v, agents, k_bias, q_bias, 2)
        dwc = m.dwc(v.reshape(2, 56, 56, 16).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(2, -1, 16)
        return m.proj(out + dwc)

    with torch.no_grad():
        got = m(x, 56, 56)
        torch.testing.assert_close(got, expected(hand(q, bins)), rtol=0, atol=1e-12)
        assert (got - expected(hand(q, [(0, 18), (18, 36), (36, 54)]))).abs().max() > 1e-3
        assert (got - expected(hand(k, bins))).abs().max() > 1e-3


def _random_biases(h, n, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    return dict(an_bias=r(h, n, 7, 7), na_bias=r(h, n, 7, 7), ah_bias=r(1, h, n, H, 1), aw_bias=r(1, h, n, 1, W),
                ha_bias=r(1, h, H, 1, n), wa_bias=r(1, h, 1, W, n))


def test_bias_composition_and_na_bias_transpose():
    """At a 7x7 map (the 7x7 block biases are used as they are), element by element: K side
    ``an[h, a, i, j] + ah[h, a, i] + aw[h, a, j]`` at (agent a, token i * 7 + j), Q side
    ``na[h, a, i, j] + ha[h, i, a] + wa[h, j, a]`` at (token, agent): na_bias transposed, not reshaped."""
    h, n = 2, 4
    b = _random_biases(h, n, 7, 7)
    k_bias, q_bias = agent_position_biases(**b, grid=(7, 7), agent_shape=(2, 2))
    assert k_bias.shape == (1, h, n, 49) and q_bias.shape == (1, h, 49, n)
    for hh in range(h):
        for a in range(n):
            for t in range(49):
                i, j = divmod(t, 7)
                want_k = b['an_bias'][hh, a, i, j] + b['ah_bias'][0, hh, a, i, 0] + b['aw_bias'][0, hh, a, 0, j]
                want_q = b['na_bias'][hh, a, i, j] + b['ha_bias'][0, hh, i, 0, a] + b['wa_bias'][0, hh, 0, j, a]
                assert abs(k_bias[0, hh, a, t] - want_k) < 1e-12 and abs(q_bias[0, hh, t, a] - want_q) < 1e-12
    # a plain reshape of the (h, n, 49) block bias to (h, 49, n) is a different tensor: the check can fail
    assert not torch.allclose(q_bias[0] - (b['ha_bias'] + b['wa_bias']).reshape(h, 49, n),
                              b['na_bias'].reshape(h, 49, n))


def test_biases_at_a_14x10_training_map_match_the_official_construction():
    """A non-square training map (14 x 10, the 7x7 block biases bilinearly resized): the official formulas."""
    h, n, H, W = 3, 9, 14, 10
    b = _random_biases(h, n, H, W, seed=1)
    k_bias, q_bias = agent_position_biases(**b, grid=(H, W), agent_shape=(3, 3))
    want_k = (F.interpolate(b['an_bias'], size=(H, W), mode='bilinear').reshape(1, h, n, -1)
              + (b['ah_bias'] + b['aw_bias']).reshape(1, h, n, -1))
    want_q = (F.interpolate(b['na_bias'], size=(H, W), mode='bilinear').reshape(1, h, n, -1).permute(0, 1, 3, 2)
              + (b['ha_bias'] + b['wa_bias']).reshape(1, h, -1, n))
    torch.testing.assert_close(k_bias, want_k, rtol=0, atol=1e-12)
    torch.testing.assert_close(q_bias, want_q, rtol=0, atol=1e-12)


def test_cls_biases_are_column_and_row_zero():
    """DeiT: ``ac_bias`` is the K-side column of the class token (column 0), ``ca_bias`` the Q-side row of the
    class token (row 0); the patch part is the bias without a class token."""
    h, n = 2, 9
    b = _random_biases(h, n, 5, 5, seed=2)
    ac, ca = torch.randn(1, h, n, 1, dtype=F64), torch.randn(1, h, 1, n, dtype=F64)
    k0, q0 = agent_position_biases(**b, grid=(5, 5), agent_shape=(3, 3))
    k1, q1 = agent_position_biases(**b, grid=(5, 5), agent_shape=(3, 3), ac_bias=ac, ca_bias=ca)
    assert k1.shape == (1, h, n, 26) and q1.shape == (1, h, 26, n)
    torch.testing.assert_close(k1[..., 0], ac[..., 0], rtol=0, atol=0)
    torch.testing.assert_close(q1[:, :, 0], ca[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(k1[..., 1:], k0, rtol=0, atol=0)
    torch.testing.assert_close(q1[:, :, 1:], q0, rtol=0, atol=0)


@pytest.mark.parametrize('h,n,train_grid,grid,agent_shape,prefix', [
    (2, 4, (7, 7), (7, 7), (2, 2), 0),      # nothing resized but the 7x7 block
    (2, 9, (14, 14), (14, 14), (3, 3), 1),  # DeiT at its training size
    (3, 4, (4, 3), (5, 3), (2, 3), 1),      # rows resized, another agent grid
    (2, 9, (6, 5), (9, 4), (4, 2), 0),      # rows and columns resized, another agent grid
], ids=['7x7', 'deit', 'rows_agents', 'rows_cols_agents'])
def test_bias_backward_equals_autograd(h, n, train_grid, grid, agent_shape, prefix):
    """The hand-written gradients of the bias parameters (used by the training path) equal autograd's through
    :func:`agent_position_biases` for random output gradients, float64, every resize combination."""
    from visionattn.layers.agent_attention import agent_position_biases_backward
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64).requires_grad_()  # noqa: E731
    (gh, gw), (H, W) = train_grid, grid
    params = [r(h, n, 7, 7), r(h, n, 7, 7), r(1, h, n, gh, 1), r(1, h, n, 1, gw), r(1, h, gh, 1, n), r(1, h, 1, gw, n)]
    cls = [r(1, h, n, 1), r(1, h, 1, n)] if prefix else [None, None]
    k_bias, q_bias = agent_position_biases(*params, grid, agent_shape, *cls)
    k_grad = torch.randn(k_bias.shape, generator=g, dtype=F64)
    q_grad = torch.randn(q_bias.shape, generator=g, dtype=F64)
    inputs = params + [c for c in cls if c is not None]
    want = torch.autograd.grad((k_bias * k_grad).sum() + (q_bias * q_grad).sum(), inputs)
    got = agent_position_biases_backward(k_grad[0], q_grad[0], n, prefix, train_grid, grid, agent_shape)
    assert (got[6] is None) == (got[7] is None) == (not prefix)
    got = [t for t in got if t is not None]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_dwc_is_not_applied_to_the_class_token():
    """With an identity ``proj``: switching the dwc on changes the patch tokens by exactly ``dwc(v)`` and leaves
    the class token unchanged; the module equals the official Agent-DeiT attention (float64)."""
    m = _perturb_(AgentAttention(12, 3, (4, 4), agent_num=4, num_prefix_tokens=1)).to(F64).eval()
    x = torch.randn(2, 17, 12, dtype=F64)
    with torch.no_grad():
        ref = DeitAgentAttention(12, 3, agent_num=4, window=4).to(F64).eval()
        ref.load_state_dict(m.state_dict(), strict=True)
        torch.testing.assert_close(m(x, 4, 4), ref(x), rtol=0, atol=1e-12)
        m.proj.weight.copy_(torch.eye(12, dtype=F64))
        m.proj.bias.zero_()
        with_dwc = m(x, 4, 4)
        dwc_w, dwc_b = m.dwc.weight.clone(), m.dwc.bias.clone()
        m.dwc.weight.zero_()
        m.dwc.bias.zero_()
        without = m(x, 4, 4)
        v = m.qkv(x)[..., 24:]
        dwc = F.conv2d(v[:, 1:].reshape(2, 4, 4, 12).permute(0, 3, 1, 2), dwc_w, dwc_b, padding=1, groups=12)
    assert torch.equal(with_dwc[:, 0], without[:, 0])
    torch.testing.assert_close(with_dwc[:, 1:] - without[:, 1:], dwc.permute(0, 2, 3, 1).reshape(2, 16, 12),
                               rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# resolution: dynamic sizes, agent grids (official downstream semantics)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,kwargs', [
    (SWIN_T, {}), (PVT_T, {}), (DEIT_T, {}), (CSWIN_T, dict(depths=(1, 2, 3, 1))),
], ids=['swin', 'pvt', 'deit', 'cswin'])
def test_dynamic_size_is_exact_at_the_training_size_and_runs_elsewhere(name, kwargs):
    """Trained at 64x64: dynamic_img_size=True is bit-identical there, and runs at 96x96 and 64x96."""
    fixed = _perturbed_model(name, img_size=64, **kwargs)
    dynamic = timm.create_model(name, img_size=64, dynamic_img_size=True, device='meta', **kwargs).eval()
    dynamic.load_state_dict(fixed.state_dict(), strict=True, assign=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dynamic(x), fixed(x))
        for size in [(96, 96), (64, 96)]:
            out = dynamic(torch.randn(1, 3, *size))
            assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize('separate_q_kv', [False, True], ids=['qkv', 'q_kv'])
@pytest.mark.parametrize('hw,agent_shape', [((10, 13), (5, 3)), ((10, 13), None), ((14, 14), (6, 6))])
def test_agent_attention_matches_official_downstream(hw, agent_shape, separate_q_kv):
    """Trained at 14x14 with 16 agents; run at another (non-square) map and / or agent grid: every bias resized
    to the map and along the 4x4 agent grid to ``agent_shape`` as the official downstream AgentAttention does
    (``downstream_agent_shape``; None = the trained 4x4), float64."""
    m = _perturb_(AgentAttention(24, 3, (14, 14), agent_num=16, agent_shape=agent_shape,
                                 separate_q_kv=separate_q_kv)).to(F64).eval()
    x = torch.randn(2, hw[0] * hw[1], 24, dtype=F64)
    with torch.no_grad():
        got = m(x, *hw)
        want = downstream_agent_attention(m, x, hw, agent_shape or (4, 4))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if agent_shape is not None:  # the resize along the agent axes matters
        m.agent_shape = (4, 4)
        with torch.no_grad():
            assert (m(x, *hw) - want).abs().max() > 1e-3


def test_agent_attention_at_training_map_equals_official_classification():
    """At the training map and grid nothing but the official 7x7 -> map resize happens."""
    m = _perturb_(AgentAttention(24, 3, (14, 14), agent_num=16)).to(F64).eval()
    x = torch.randn(2, 196, 24, dtype=F64)
    with torch.no_grad():
        q, k, v = m.qkv(x).reshape(2, 196, 3, 24).unbind(2)
        out = official_agent(m, q, k, v, 14, 14, (14, 14))
        want = m.proj(out + m.dwc(v.reshape(2, 14, 14, 24).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(2, 196, 24))
        torch.testing.assert_close(m(x, 14, 14), want, rtol=0, atol=1e-12)


def _downstream_with_cls(m, x, hw, agent_shape):
    """The downstream resize extended to the class token (no official code: Agent-DeiT has no downstream
    backbone): ``ac_bias`` / ``ca_bias`` resized along the agent grid like every other bias, the cls row / column
    prepended; agents pool the patch queries; dwc on the patch tokens."""
    b, n, c = x.shape
    H, W = hw
    heads, p = m.num_heads, int(m.an_bias.shape[1] ** 0.5)
    A = agent_shape[0] * agent_shape[1]

    def along_agents(t):  # (heads, p*p, T) -> (heads, A, T)
        T = t.shape[-1]
        t = F.interpolate(t.reshape(heads, p, p, T).permute(0, 3, 1, 2), size=agent_shape, mode='bilinear')
        return t.permute(0, 2, 3, 1).reshape(heads, A, T)

    k_hw = (F.interpolate(m.an_bias, size=hw, mode='bilinear')
            + F.interpolate((m.ah_bias + m.aw_bias)[0], size=hw, mode='bilinear')).reshape(heads, p * p, -1)
    q_hw = (F.interpolate(m.na_bias, size=hw, mode='bilinear')
            + F.interpolate((m.ha_bias + m.wa_bias)[0].permute(0, 3, 1, 2), size=hw, mode='bilinear')
            ).reshape(heads, p * p, -1)
    k_bias = along_agents(torch.cat([m.ac_bias[0], k_hw], -1))[None]
    q_bias = along_agents(torch.cat([m.ca_bias[0].transpose(-2, -1), q_hw], -1)).transpose(1, 2)[None]
    q, k, v = m.qkv(x).reshape(b, n, 3, c).unbind(2)
    agents = F.adaptive_avg_pool2d(q[:, 1:].reshape(b, H, W, c).permute(0, 3, 1, 2), agent_shape)
    out = _softmax_agent(q, k, v, agents.flatten(2).transpose(1, 2), k_bias, q_bias, heads)
    dwc = m.dwc(v[:, 1:].reshape(b, H, W, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, H * W, c)
    return m.proj(torch.cat([out[:, :1], out[:, 1:] + dwc], 1))


@pytest.mark.parametrize('agent_shape', [(5, 3), None])
def test_cls_agent_attention_on_a_non_square_map(agent_shape):
    """Agent-DeiT's attention on a 14 x 10 patch grid (141 tokens: no int(sqrt(N)) grid exists) and another
    agent grid: the downstream resize with the class-token biases resized along the agents too (float64)."""
    m = _perturb_(AgentAttention(24, 3, (14, 14), agent_num=16, agent_shape=agent_shape,
                                 num_prefix_tokens=1)).to(F64).eval()
    x = torch.randn(2, 141, 24, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(m(x, 14, 10), _downstream_with_cls(m, x, (14, 10), agent_shape or (4, 4)),
                                   rtol=0, atol=1e-12)


def test_agent_shapes_reach_every_agent_block():
    """``agent_shapes=`` per stage (None = the trained grid) on the hierarchical hosts, ``agent_shape=`` on DeiT;
    the official checkpoint still loads strictly (the bias parameters keep their trained shapes) and the output
    changes."""
    shapes = [(4, 4), (5, 3), None, None]
    for name, kwargs in [(SWIN_T, {}), (PVT_T, {}), (CSWIN_T, dict(depths=(1, 2, 3, 1)))]:
        model = _perturbed_model(name, img_size=64, agent_shapes=shapes, **kwargs)
        mods = [m for m in model.modules() if hasattr(m, 'agent_shape')]
        stage_of = {id(m): s for s, st in enumerate(model.stages) for m in st.modules()}
        assert mods and all(m.agent_shape == (shapes[stage_of[id(m)]] or (math.isqrt(m.agent_num),) * 2)
                            for m in mods), name
        plain = timm.create_model(name, img_size=64, device='meta', **kwargs).eval()
        plain.load_state_dict(model.state_dict(), strict=True, assign=True)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert (model(x) - plain(x)).abs().max() > 1e-6, name
    deit = meta_model(DEIT_T, agent_shape=(5, 6))
    assert all(b.attn.agent_shape == (5, 6) for b in deit.blocks)
    with pytest.raises(ValueError):
        meta_model(SWIN_T, agent_shapes=[(4, 4)] * 3)


def test_deit_runs_on_a_token_count_that_is_not_a_square_plus_one():
    """224 x 160 -> 14 x 10 patches, 141 tokens (official issue #39): runs, finite, and its first agent block
    equals the cls-extended downstream computation on that grid."""
    model = _perturbed_model(DEIT_T, dynamic_img_size=True)
    x = torch.randn(1, 3, 224, 160)
    feats = {}
    blk = model.blocks[0]
    # clones: without autograd the block adds its residual in place into the attention output
    blk.attn.register_forward_hook(lambda mod, args, out: feats.update(x=args[0].clone(), out=out.clone()))
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, 1000) and torch.isfinite(out).all()
        assert feats['x'].shape == (1, 141, 192)
        want = _downstream_with_cls(blk.attn, feats['x'], (14, 10), (7, 7))
    torch.testing.assert_close(feats['out'], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name,kwargs', [(PVT_T, {}), (DEIT_T, {}), (CSWIN_T, dict(depths=(1, 2, 3, 1)))],
                         ids=['pvt', 'deit', 'cswin'])
def test_img_size_from_a_224_file_equals_dynamic_size(name, kwargs):
    """224 weights loaded with img_size=96 (row / column biases and position embeddings resized on load) and the
    224 model run at 96 with dynamic_img_size=True (resized on the fly): the same model."""
    dynamic = _perturbed_model(name, dynamic_img_size=True, **kwargs)
    fixed = timm.create_model(name, img_size=96, device='meta', **kwargs).eval()
    fixed.load_state_dict(family_filter(fixed)(dynamic.state_dict(), fixed), strict=True, assign=True)
    agent = next(m for m in fixed.modules() if isinstance(m, AgentAttention) or hasattr(m, 'agent_shape'))
    assert agent.ah_bias.shape[-2] == agent.grid_size[0] == (6 if name == DEIT_T else 24)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), dynamic(x), rtol=0, atol=1e-5)


def test_bias_resize_on_load_equals_the_official_downstream_resize():
    """A module trained at 14x14 loaded into one built for 10x13 (``resize_checkpoint_tensor``, the filter's
    hook) computes what the official downstream attention computes from the 14x14 biases at 10x13."""
    m = _perturb_(AgentAttention(24, 3, (14, 14), agent_num=16)).to(F64).eval()
    small = AgentAttention(24, 3, (10, 13), agent_num=16).to(F64).eval()
    small.load_state_dict({k: small.resize_checkpoint_tensor(k, v) for k, v in m.state_dict().items()}, strict=True)
    assert small.ha_bias.shape == (1, 3, 10, 1, 16) and small.aw_bias.shape == (1, 3, 16, 1, 13)
    x = torch.randn(2, 130, 24, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(small(x, 10, 13), downstream_agent_attention(m, x, (10, 13), (4, 4)),
                                   rtol=0, atol=1e-12)


def test_deit_pos_embed_of_another_training_size_is_resized_as_officially():
    """The official agent_deit.py ``checkpoint_filter_fn`` -> ``resize_pos_embed``: class row kept, the 14x14 grid
    resized with ``F.interpolate(mode='bilinear')`` (align_corners=False, no antialias)."""
    sd = build_reference('agent_deit_t').state_dict()
    sd['pos_embed'] = torch.randn(1, 197, 192)
    model = meta_model(DEIT_T, img_size=96)
    out = family_filter(model)(dict(sd), model)
    grid = sd['pos_embed'][:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 6), mode='bilinear').permute(0, 2, 3, 1).reshape(1, 36, 192)
    assert torch.equal(out['pos_embed'][:, :1], sd['pos_embed'][:, :1])
    torch.testing.assert_close(out['pos_embed'][:, 1:], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize('prefix,separate_q_kv', [(0, False), (1, False), (0, True)], ids=['qkv', 'cls', 'q_kv'])
def test_training_path_equals_inference_path_and_gradients_are_exact(prefix, separate_q_kv, monkeypatch):
    """Under autograd the layer runs :class:`_AgentAttentionTrain` (hand-written backward), or with attention dropout
    / autocast the written-out ops (plain autograd); without autograd it runs through SDPA. In float64, at a
    non-square map with another agent grid: both autograd paths equal the SDPA output, the hand-written gradients
    of the input and of every parameter (biases, qkv or q / kv, proj, dwc) equal autograd's through the written-out
    ops to 1e-9 relative, and gradcheck passes for the input against finite differences."""
    from visionattn.layers import agent_attention as agent_module
    from visionattn.layers.agent_attention import AgentBranch
    torch.manual_seed(0)
    m = AgentAttention(8, 2, (4, 3), agent_num=4, agent_shape=(2, 3), num_prefix_tokens=prefix,
                       separate_q_kv=separate_q_kv).to(F64)
    branch = AgentBranch(8, 2, (4, 3), agent_num=4).to(F64)
    for p in list(m.parameters()) + list(branch.parameters()):
        p.data.normal_(0, 0.5)
    H, W = 5, 3
    x = torch.randn(2, prefix + H * W, 8, dtype=F64, requires_grad=True)
    qkv = [torch.randn(2, H * W, 8, dtype=F64, requires_grad=True) for _ in range(3)]
    cases = ((m, [x]), (branch, qkv))
    with torch.no_grad():
        fused = [module(*inputs, H, W) for module, inputs in cases]

    def outputs_and_grads(expected_node):
        results = []
        for (module, inputs), want in zip(cases, fused):
            out = module(*inputs, H, W)
            assert _autograd_reaches(out.grad_fn, expected_node)
            torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
            weights = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
            results.append(torch.autograd.grad((out * weights).sum(), inputs + list(module.parameters())))
        return results

    hand_written = outputs_and_grads('AgentAttentionTrainBackward')
    monkeypatch.setattr(agent_module, '_use_train_path', lambda x, attn_drop: False)
    written_out = outputs_and_grads('SoftmaxBackward')
    for ours, want in zip(hand_written, written_out):
        for a, b in zip(ours, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    monkeypatch.undo()
    assert torch.autograd.gradcheck(lambda x: m(x, H, W), (x,))


def _autograd_reaches(fn, name: str, depth: int = 12) -> bool:
    """Whether a node whose class name contains ``name`` is within ``depth`` steps of ``fn`` in the graph."""
    if fn is None or depth < 0:
        return False
    return name in type(fn).__name__ or any(_autograd_reaches(f, name, depth - 1) for f, _ in fn.next_functions)
