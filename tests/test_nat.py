"""NAT / DiNAT / DiNAT_s / isotropic NAT, DiNAT, ViT-rpb: fidelity to the official code.

Spec: ``../shared/specs/biformer_nat_ppma.md`` §2 (layouts in ``tests/fixtures/official_layouts/nat``). Big variants are
checked on the meta device (parameter counts, checkpoint mapping) or on reduced-depth copies with
the variant's own widths, heads, kernel and dilations (backend equality), to stay fast on two CPU
cores.
"""
import pytest
import timm
import torch
import torch.nn.functional as F

import visionattn  # noqa: F401
from visionattn.layers.neighborhood_attention import na_backend
from visionattn.models import nat
from layouts import load_layout, random_state_dict, variants
from official_checks import assert_filter_maps_layout, assert_loads_file, assert_param_count, meta_model

VARIANTS = variants('nat')  # (official variant, visionattn name)
assert len(VARIANTS) == 22, VARIANTS
NA_MODELS = [name for _, name in VARIANTS if 'vitrpb' not in name]
LAYER_SCALE = {'nat_small', 'nat_base', 'dinat_base'}  # official layer_scale=1e-5 (not dinat_small)


# ---------------------------------------------------------------------------------------------
# naive reference: full attention with the neighbourhood as a mask (natten <= 0.17 semantics)

def _axis_neighbourhood(length: int, kernel: int, dilation: int):
    """[L, L] key mask and [L, L] RPB offset index of one axis (spec §2.5)."""
    i = torch.arange(length)
    g, p = i % dilation, i // dilation
    group_len = (length - g + dilation - 1) // dilation
    start = torch.minimum((p - kernel // 2).clamp(min=0), group_len - kernel)
    pj = i[None, :] // dilation
    mask = (i[None, :] % dilation == g[:, None]) & (pj >= start[:, None]) & (pj < start[:, None] + kernel)
    rel = (pj - p[:, None] + kernel - 1).clamp(0, 2 * kernel - 2)
    return mask, rel


def naive_na(q, k, v, kernel, dilation, rpb, scale):
    """Neighbourhood attention as masked full attention; q/k/v ``[B, H, W, heads, D]``."""
    B, H, W, nh, D = q.shape
    assert kernel * dilation <= min(H, W), 'the exact semantics need kernel * dilation <= size'
    mr, rr = _axis_neighbourhood(H, kernel, dilation)
    mc, rc = _axis_neighbourhood(W, kernel, dilation)
    mask = (mr[:, None, :, None] & mc[None, :, None, :]).reshape(H * W, H * W)
    assert (mask.sum(-1) == kernel * kernel).all()
    bias = rpb[:, rr[:, None, :, None], rc[None, :, None, :]].reshape(nh, H * W, H * W)
    logits = torch.einsum('bnhd,bmhd->bhnm', q.reshape(B, -1, nh, D) * scale, k.reshape(B, -1, nh, D)) + bias
    attn = logits.masked_fill(~mask, float('-inf')).softmax(-1)
    return torch.einsum('bhnm,bmhd->bnhd', attn, v.reshape(B, -1, nh, D)).reshape(B, H, W, nh, D)


def naive_block(block: nat.NATBlock, x: torch.Tensor) -> torch.Tensor:
    """The official NATLayer forward, with :func:`naive_na` as the attention core."""
    attn = block.attn
    h = block.norm1(x)
    B, H, W, C = h.shape
    nh = attn.rpb.shape[0]
    q, k, v = attn.qkv(h).reshape(B, H, W, 3, nh, C // nh).unbind(3)
    y = attn.proj(naive_na(q, k, v, block.kernel_size, block.dilation, attn.rpb, (C // nh) ** -0.5).reshape(x.shape))
    x = x + (block.gamma1 * y if block.gamma1 is not None else y)
    y = block.mlp(block.norm2(x))
    return x + (block.gamma2 * y if block.gamma2 is not None else y)


def _randomise_(module: torch.nn.Module):
    """Non-trivial RPB / layer scale / norms so that every term of the block matters."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith('rpb') or 'gamma' in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif 'norm' in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------------
# parameter counts and checkpoints

@pytest.mark.parametrize('variant,name', VARIANTS)
def test_param_count(variant, name):
    assert_param_count(name, 'nat', variant)


@pytest.mark.parametrize('variant,name', VARIANTS)
def test_filter_maps_official_layout(variant, name):
    assert_filter_maps_layout(name, 'nat', variant)


@pytest.mark.parametrize('container', ['raw', 'model', 'state_dict', 'module'])
@pytest.mark.parametrize('variant', ['nat_mini', 'dinat_mini'])
def test_loads_official_file(tmp_path, variant, container):
    assert_loads_file(tmp_path, f'visionattn_{variant}', 'nat', variant, container, input_size=(1, 3, 64, 96))


def test_filter_own_layout_and_errors():
    model = timm.create_model('visionattn_nat_mini', depths=(1, 1, 1, 1))
    own = model.state_dict()
    out = nat.checkpoint_filter_fn({'model': {f'module.{k}': v for k, v in own.items()}}, model)
    assert set(out) == set(own)
    bad = dict(own)
    del bad['stages.1.downsample.norm.weight']
    with pytest.raises(ValueError, match='missing.*stages.1.downsample.norm.weight'):
        nat.checkpoint_filter_fn(bad, model)
    bad = dict(own, **{'stages.0.blocks.0.attn.rpb': torch.zeros(3, 13, 13)})
    with pytest.raises(ValueError, match='shape mismatch'):
        nat.checkpoint_filter_fn(bad, model)
    # isotropic: official layers.i and ViT-rpb's index buffers (rebuilt, not loaded)
    layout = load_layout('nat', 'vitrpb_small')
    model = meta_model('visionattn_vitrpb_small')
    sd = random_state_dict(layout)
    assert any(k.endswith('relative_position_index') for k in sd)
    out = nat.checkpoint_filter_fn(sd, model)
    assert set(out) == set(model.state_dict())


def test_rpb_resize_on_load():
    """7x7 RPB tables load into an 11x11 model (bicubic, as the official 11x11 weights were made)."""
    small = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
    src = timm.create_model('visionattn_nat_mini', **small)
    dst = timm.create_model('visionattn_nat_mini', kernel_size=11, **small)
    out = nat.checkpoint_filter_fn(src.state_dict(), dst)
    assert out['stages.0.blocks.0.attn.rpb'].shape == (1, 21, 21)
    dst.load_state_dict(out, strict=True)


# ---------------------------------------------------------------------------------------------
# architecture details

@pytest.mark.parametrize('variant,name', VARIANTS)
def test_layer_scale(variant, name):
    model = meta_model(name)
    gammas = [n for n, _ in model.named_parameters() if n.endswith(('gamma1', 'gamma2'))]
    if variant in LAYER_SCALE:
        assert len(gammas) == 2 * sum(len(s.blocks) for s in model.stages)
    else:
        assert not gammas
    if variant == 'nat_small':
        small = timm.create_model(name, depths=(1, 1, 1, 1))
        assert torch.all(small.stages[0].blocks[0].gamma1 == 1e-5)


def _block_dilations(model):
    if isinstance(model, nat.NATIsotropic):
        return [b.dilation for b in model.blocks]
    return [[b.dilation for b in s.blocks] for s in model.stages]


def test_dilation_schedules():
    alt = lambda n, d: [1 if i % 2 == 0 else d for i in range(n)]  # noqa: E731
    assert _block_dilations(meta_model('visionattn_nat_tiny')) == [[1] * 3, [1] * 4, [1] * 18, [1] * 5]
    assert _block_dilations(meta_model('visionattn_dinat_tiny')) == [[1, 8, 1], [1, 4, 1, 4], alt(18, 2), [1] * 5]
    assert _block_dilations(meta_model('visionattn_dinat_mini')) == [[1, 8, 1], [1, 4, 1, 4], alt(6, 2), [1] * 5]
    assert _block_dilations(meta_model('visionattn_dinat_large_384')) == [
        [1, 13, 1], [1, 6, 1, 6], alt(18, 3), [1] * 5]
    m = meta_model('visionattn_dinat_large_384_11x11')
    assert _block_dilations(m) == [[1, 8, 1], [1, 4, 1, 4], alt(18, 2), [1] * 5]
    assert m.stages[0].blocks[0].attn.rpb.shape[-1] == 21
    assert _block_dilations(meta_model('visionattn_dinat_s_tiny')) == [[1, 8], [1, 4], alt(6, 2), [1, 1]]
    assert _block_dilations(meta_model('visionattn_dinat_s_large_384')) == [[1, 13], [1, 6], alt(18, 3), [1, 1]]
    assert _block_dilations(meta_model('visionattn_dinat_isotropic_small')) == alt(12, 2)
    assert _block_dilations(meta_model('visionattn_nat_isotropic_small')) == [1] * 12


def test_dilation_argument_detection_schedule():
    """Dense-prediction configs pass their own per-block dilations (spec §2.6)."""
    det = [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7] * 3, [1, 3, 1, 3, 1]]
    model = meta_model('visionattn_dinat_tiny', dilations=det)
    assert _block_dilations(model) == det
    small = timm.create_model('visionattn_dinat_mini', depths=(3, 4, 2, 1), dilations=[
        [1, 28, 1], [1, 7, 1, 14], [1, 3], [1]]).eval()
    with torch.no_grad():
        assert torch.isfinite(small(torch.randn(1, 3, 96, 128))).all()  # k * d far above the map sizes
    with pytest.raises(ValueError, match='dilations'):
        meta_model('visionattn_dinat_tiny', dilations=[[1, 2], [1], [1], [1]])
    with pytest.raises(ValueError, match='dilations'):
        meta_model('visionattn_dinat_tiny', dilations=[[1] * 3, [1] * 4])


def test_stage_outputs_are_pre_downsample():
    model = meta_model('visionattn_nat_tiny', features_only=True)
    outs = model(torch.empty(1, 3, 224, 224, device='meta'))
    assert [tuple(o.shape[1:]) for o in outs] == [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    swin = meta_model('visionattn_dinat_s_tiny', features_only=True)
    outs = swin(torch.empty(1, 3, 230, 250, device='meta'))  # odd sizes are zero-padded
    assert [tuple(o.shape[2:]) for o in outs] == [(58, 63), (29, 32), (15, 16), (8, 8)]


# ---------------------------------------------------------------------------------------------
# numerics against the naive reference

@pytest.mark.parametrize('size,kernel,dilation,layer_scale', [
    ((14, 14), 7, 1, None),
    ((15, 14), 7, 2, 1e-5),   # non-square, sizes not divisible by the dilation
    ((16, 20), 5, 3, None),
    ((7, 7), 7, 1, None),     # kernel == size: full attention, RPB still position dependent
    ((23, 17), 3, 5, 1e-5),
    ((13, 11), 11, 1, None),
])
def test_block_matches_naive_reference(size, kernel, dilation, layer_scale):
    block = nat.NATBlock(64, 2, kernel_size=kernel, dilation=dilation, mlp_ratio=2., layer_scale=layer_scale).eval()
    _randomise_(block)
    x = torch.randn(2, *size, 64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), naive_block(block, x), rtol=0, atol=1e-5)


def test_dinat_blocks_exact_where_defined_and_small_input_policy():
    """DiNAT-M at 224: every block equals the exact (natten) semantics. At 64x64 the dilated blocks
    exceed their maps (k * d > size): the model runs (small-input policy) and every block whose
    k * d fits its map still equals the exact semantics."""
    model = timm.create_model('visionattn_dinat_mini', depths=(3, 4, 2, 1), dilations=[
        [1, 8, 1], [1, 4, 1, 4], [1, 2], [1]]).eval()
    _randomise_(model)
    captured = []
    hooks = [b.register_forward_hook(lambda m, i, o: captured.append((m, i[0], o)))
             for s in model.stages for b in s.blocks]
    for size, expect_policy in ((224, False), (64, True)):
        captured.clear()
        with torch.no_grad():
            out = model(torch.randn(1, 3, size, size))
            assert torch.isfinite(out).all()
            checked = beyond = 0
            for block, x, y in captured:
                if block.kernel_size * block.dilation <= min(x.shape[1:3]):
                    torch.testing.assert_close(y, naive_block(block, x), rtol=0, atol=1e-5)
                    checked += 1
                else:
                    assert torch.isfinite(y).all()
                    beyond += 1
        assert checked >= 4 and (beyond > 0) == expect_policy, (size, checked, beyond)
    for h in hooks:
        h.remove()


def test_vitrpb_attention_matches_official_index():
    """The official MHSARPB index (flipud/fliplr of query-minus-key coordinates) equals our rule."""
    L, dim, nh = 14, 64, 2
    attn = nat.RelPosSelfAttention(dim, nh, grid_size=L).eval()
    _randomise_(attn)
    x = torch.randn(2, L, L, dim)
    coords = torch.stack(torch.meshgrid(torch.arange(L), torch.arange(L), indexing='ij')).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += L - 1
    rel[:, :, 1] += L - 1
    rel[:, :, 0] *= 2 * L - 1
    index = torch.flipud(torch.fliplr(rel.sum(-1)))
    N = L * L
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(2, N, 3, nh, dim // nh).permute(2, 0, 3, 1, 4)
        bias = attn.rpb.permute(1, 2, 0).flatten(0, 1)[index.view(-1)].view(N, N, nh).permute(2, 0, 1)
        a = ((q * attn.scale) @ k.transpose(-2, -1) + bias).softmax(-1)
        ref = attn.proj((a @ v).transpose(1, 2).reshape(2, L, L, dim))
        torch.testing.assert_close(attn(x), ref, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match='dynamic_img_size'):
            attn(torch.randn(1, 10, 10, dim))
        attn.dynamic_size = True
        # a smaller map uses the centre of the table: equals NA with kernel = map size
        y = torch.randn(1, 6, 6, dim)
        q, k, v = attn.qkv(y).reshape(1, 6, 6, 3, nh, dim // nh).unbind(3)
        crop = attn.rpb[:, L - 6:L + 5, L - 6:L + 5]
        ref = attn.proj(naive_na(q, k, v, 6, 1, crop, attn.scale).reshape(1, 6, 6, dim))
        torch.testing.assert_close(attn(y), ref, rtol=0, atol=1e-5)


def test_patch_merging_matches_official():
    merge = nat.PatchMerging(8, 16).eval()
    _randomise_(merge)
    for H, W in ((6, 8), (7, 9)):
        x = torch.randn(2, 8, H, W)
        xh = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, W % 2, 0, H % 2))  # official NHWC padding
        ref = torch.cat([xh[:, 0::2, 0::2], xh[:, 1::2, 0::2], xh[:, 0::2, 1::2], xh[:, 1::2, 1::2]], -1)
        ref = merge.reduction(merge.norm(ref)).permute(0, 3, 1, 2)
        with torch.no_grad():
            torch.testing.assert_close(merge(x), ref)


# ---------------------------------------------------------------------------------------------
# backends: 'auto' equals 'torch' on every NAT / DiNAT model

def _reduced(name):
    """Creation kwargs for a reduced-depth copy (<= 2 blocks per stage, so every stage keeps one
    NA and one DiNA block) with the variant's widths, heads, kernel and dilations."""
    model = meta_model(name)
    if isinstance(model, nat.NATIsotropic):
        return dict(depth=2, dilations=list(model.dilations[:2]))
    depths = [min(2, d) for d in model.depths]
    return dict(depths=depths, dilations=[list(d[:n]) for d, n in zip(model.dilations, depths)])


def _fast_random_model(name, **kwargs):
    """The model with random weights, without timm's (slow) truncated-normal init."""
    model = meta_model(name, **kwargs).to_empty(device='cpu').eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith('rpb') or 'gamma' in n:
                p.copy_(torch.randn(p.shape, generator=g))
            elif 'norm' in n:
                p.copy_(float(n.endswith('weight')) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * min(0.02, p[0].numel() ** -0.5))
    return model


_AUTO_DIFFS = {}  # reduced config -> max |auto - torch| per size (variants sharing a config run once)


@pytest.mark.parametrize('name', NA_MODELS)
def test_auto_backend_matches_torch(name):
    """Reduced depth (every stage keeps an NA and a DiNA block), the variant's own widths, heads,
    kernel and dilations; batch 1 at 224x224 and at a non-square 96x160 (where the large dilations
    of the 384 variants and of stage 1 fall back to the small-input policy)."""
    kwargs = _reduced(name)
    model = meta_model(name, **kwargs)
    key = (type(model).__name__, repr(model))
    if key not in _AUTO_DIFFS:
        model = _fast_random_model(name, **kwargs)
        diffs = {}
        for size in ((224, 224), (96, 160)):
            x = torch.randn(1, 3, *size)
            with torch.no_grad():
                with na_backend('torch'):
                    ref = model(x)
                with na_backend('auto'):
                    out = model(x)
            assert torch.isfinite(ref).all()
            diffs[size] = (out - ref).abs().max().item()
        _AUTO_DIFFS[key] = diffs
    diffs = _AUTO_DIFFS[key]
    assert all(d <= 1e-5 for d in diffs.values()), (name, diffs)
