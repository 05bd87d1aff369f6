"""FLatten-CSwin (T / S / B / B@384) on the shared CSwin host against the official layouts and a transcription
of the official model (tests/cswin_reference.py).

Spec: ../shared/specs/flatten_agent_convit_davit_twins.md §2.2-2.5. The focused linear branch itself is tested
in test_focused_linear_attention.py; the API matrix in test_models.py.
"""
import pytest
import timm
import torch
import torch.nn.functional as F

import visionattn  # noqa: F401
from cswin_reference import CSWinTransformer, seg_lepe_attention
from layouts import load_layout, random_state_dict
from official_checks import assert_filter_maps_layout, assert_loads_file, assert_param_count
from visionattn.layers import CSwinAttention, FocusedLinearBranch
from visionattn.models._cswin import CSwinBlock
from visionattn.models.flatten import checkpoint_filter_fn

VARIANTS = [
    ('flatten_cswin_t', 'visionattn_flatten_cswin_tiny'),
    ('flatten_cswin_s', 'visionattn_flatten_cswin_small'),
    ('flatten_cswin_b', 'visionattn_flatten_cswin_base'),
    ('flatten_cswin_b_384', 'visionattn_flatten_cswin_base_384'),
]
TINY = 'visionattn_flatten_cswin_tiny'
# small training sizes: the official model needs splits that divide the stage maps (16-8-4-2 at 64); fewer
# blocks (the same code per block) keep the float64 checks fast
SMALL_SPLITS = dict(split_sizes=(1, 2, 2, None))
SMALL_DEPTHS = (1, 2, 3, 1)


def _reference(img_size=224, split_size=(1, 2, 7, 7), dtype=torch.float32, depth=(2, 4, 18, 1)):
    """The official FLatten-CSwin-T (LLSS, LA splits = the stage maps) with every parameter perturbed."""
    torch.manual_seed(0)
    s = img_size // 4
    ref = CSWinTransformer(img_size, depth=depth, split_size=split_size,
                           la_split_size=f'{s}-{s // 2}-{s // 4}-{s // 8}')
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ref.to(dtype).eval()


def _ours(ref, dtype=torch.float32, **kwargs):
    model = timm.create_model(TINY, **kwargs).to(dtype).eval()
    model.load_state_dict(checkpoint_filter_fn(ref.state_dict(), model), strict=True)
    return model


@pytest.mark.parametrize('variant,name', VARIANTS)
def test_param_count(variant, name):
    assert_param_count(name, 'flatten', variant)


@pytest.mark.parametrize('variant,name', VARIANTS)
def test_filter_maps_layout(variant, name):
    assert_filter_maps_layout(name, 'flatten', variant)


@pytest.mark.parametrize('container', ['raw', 'module'])
def test_loads_official_file(tmp_path, container):
    assert_loads_file(tmp_path, TINY, 'flatten', 'flatten_cswin_t', container)


def test_filter_reads_model_container_ignoring_ema():
    """The training checkpoint: weights under 'model'; main_ema.py's 'state_dict_ema' beside them is not used by
    the filter. (timm's file loader, ``pretrained_cfg_overlay=dict(file=...)``, unwraps such a file itself and
    prefers 'state_dict_ema' before the filter runs.)"""
    layout = load_layout('flatten', 'flatten_cswin_t')
    sd, ema = random_state_dict(layout, seed=1), random_state_dict(layout, seed=2)
    model = timm.create_model(TINY, device='meta')
    out = checkpoint_filter_fn({'model': sd, 'state_dict_ema': ema, 'epoch': 300}, model)
    assert out['stages.2.blocks.0.attns.1.get_v.weight'] is sd['stage3.0.attns.1.get_v.weight']
    assert out['stem.conv.weight'] is sd['stage1_conv_embed.0.weight']
    assert out['stages.3.downsample.norm.bias'] is sd['merge3.norm.bias'] and out['head.fc.bias'] is sd['head.bias']


def test_matches_official_fp32_224():
    """FLatten-CSwin-T at its training size, batch 2: stages 1-2 global focused linear attention, stage 3
    two stripe branches of width 7 (LePE softmax), stage 4 global LePE softmax; logits <= 1e-5."""
    ref = _reference()
    model = _ours(ref)
    kinds = [[(type(b.attns[0]).__name__, len(b.attns), b.split_size) for b in st.blocks] for st in model.stages]
    assert kinds == [[('FocusedLinearBranch', 1, None)] * 2, [('FocusedLinearBranch', 1, None)] * 4,
                     [('CSwinAttention', 2, 7)] * 18, [('CSwinAttention', 1, None)]]
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out, want = model(x), ref(x)
    assert (out - want).abs().max() <= 1e-5, (out - want).abs().max()


def _float64_pair(img_size):
    ref = _reference(img_size, split_size=(1, 2, 2, 2), dtype=torch.float64, depth=SMALL_DEPTHS)
    return ref, _ours(ref, torch.float64, img_size=img_size, depths=SMALL_DEPTHS, **SMALL_SPLITS)


def test_matches_official_float64_small():
    """float64 at img_size=64 (maps 16-8-4-2; stage 3: stripes of 2, two per branch), depths 1-2-3-1, <= 1e-10."""
    ref, model = _float64_pair(64)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-10)


def _resampled(tokens, old, new):
    """(1, old*old, C) -> (1, new*new, C), bilinear without antialias, written out; in float32 as timm's
    ``resample_abs_pos_embed`` computes it (float64 encodings come back float32-rounded)."""
    C = tokens.shape[-1]
    grid = tokens.float().reshape(1, old, old, C).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(new, new), mode='bilinear', align_corners=False).flatten(2).transpose(1, 2)
    return out.to(tokens.dtype)


def test_other_training_size_and_dynamic_size_match_official_at_that_size():
    """A file trained at 64 loaded with img_size=96 (encodings resampled on load), and the 64 model with
    dynamic_img_size=True run at 96 (resampled on the fly), both equal the official model built at 96
    with the resampled encodings (float64)."""
    ref64 = _reference(64, split_size=(1, 2, 2, 2), dtype=torch.float64, depth=SMALL_DEPTHS)
    ref96 = _reference(96, split_size=(1, 2, 2, 3), dtype=torch.float64, depth=SMALL_DEPTHS)
    maps = {'stage1': (16, 24), 'stage2': (8, 12)}  # the global L stages at 64 and at 96
    sd96 = {k: _resampled(v, *maps[k.split('.')[0]]) if 'positional_encoding' in k else v
            for k, v in ref64.state_dict().items()}
    ref96.load_state_dict(sd96)
    loaded = timm.create_model(TINY, img_size=96, depths=SMALL_DEPTHS, **SMALL_SPLITS).double().eval()
    loaded.load_state_dict(checkpoint_filter_fn(ref64.state_dict(), loaded))
    dynamic = _ours(ref64, torch.float64, img_size=64, dynamic_img_size=True, depths=SMALL_DEPTHS, **SMALL_SPLITS)
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        want = ref96(x)
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=1e-10)
        torch.testing.assert_close(dynamic(x), want, rtol=0, atol=1e-10)


def test_img_size_resamples_official_224_file(tmp_path):
    layout = load_layout('flatten', 'flatten_cswin_t')
    sd = random_state_dict(layout, seed=3)
    path = tmp_path / 'flatten_cswin_t.pth'
    torch.save({'model': sd}, path)
    model = timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=64).eval()
    got = model.state_dict()
    torch.testing.assert_close(got['stages.0.blocks.1.attns.0.positional_encoding'],
                               _resampled(sd['stage1.1.attns.0.positional_encoding'], 56, 16))
    torch.testing.assert_close(got['stages.1.blocks.3.attns.0.positional_encoding'],
                               _resampled(sd['stage2.3.attns.0.positional_encoding'], 28, 8))
    torch.testing.assert_close(got['stages.2.blocks.17.qkv.weight'], sd['stage3.17.qkv.weight'])
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_dynamic_at_training_size_is_exact_and_fixed_size_refuses_others():
    torch.manual_seed(0)
    fixed = timm.create_model(TINY, img_size=64).eval()
    dynamic = timm.create_model(TINY, img_size=64, dynamic_img_size=True).eval()
    dynamic.load_state_dict(fixed.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fixed(x), dynamic(x))
        with pytest.raises(ValueError, match=r'96x80.*64x64.*img_size=\(96, 80\).*dynamic_img_size=True'):
            fixed(torch.randn(1, 3, 96, 80))
        with pytest.raises(ValueError, match='img_size='):
            timm.create_model(TINY, features_only=True, img_size=64)(torch.randn(1, 3, 96, 96))


@pytest.mark.parametrize('size', [(64, 96), (80, 80), (100, 68)])
def test_other_and_non_square_sizes(size):
    """Stage 3 keeps stripes of 7 (maps 4x6, 5x5, 7x5: zero-padded symmetrically), stages 1-2 and 4 stay global."""
    torch.manual_seed(0)
    model = timm.create_model(TINY, img_size=64, dynamic_img_size=True, features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, *size))
    h, w = (size[0] - 3) // 4 + 1, (size[1] - 3) // 4 + 1
    for i, f in enumerate(feats):
        assert f.shape[-2:] == (h, w) and torch.isfinite(f).all()
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1


def _seg_block(block, x):
    """The official segmentation CSWinBlock forward (padded stripes) with ``block``'s weights, x (B, H, W, C)."""
    B, H, W, C = x.shape
    temp = block.qkv(block.norm1(x)).reshape(B, H, W, 3, C).permute(0, 3, 4, 1, 2)
    if len(block.attns) == 2:
        heads = block.attns[0].num_heads
        outs = [seg_lepe_attention(temp[:, :, i * C // 2:(i + 1) * C // 2], block.attns[i].get_v, i,
                                   block.split_size, heads) for i in range(2)]
        attn = torch.cat(outs, dim=2)
    else:
        attn = seg_lepe_attention(temp, block.attns[0].get_v, -1, 0, block.attns[0].num_heads)
    x = x.reshape(B, H * W, C) + block.proj(attn)
    return (x + block.mlp(block.norm2(x))).reshape(B, H, W, C)


@pytest.mark.parametrize('split', [2, 3, None])
@pytest.mark.parametrize('hw', [(5, 9), (7, 4), (6, 6)])
def test_block_matches_official_segmentation_padding(split, hw):
    """Maps that are not multiples of the stripe: symmetric zero padding of q / k / v, no mask, crop back --
    the official segmentation backbone's LePE attention (float64)."""
    torch.manual_seed(0)
    block = CSwinBlock(32, 4, (6, 6), split_size=split).double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        x = torch.randn(2, *hw, 32, dtype=torch.float64)
        torch.testing.assert_close(block(x), _seg_block(block, x), rtol=0, atol=1e-12)


def test_mixer_factories_get_branch_width_heads_and_window():
    """The contract Agent-CSwin plugs into: factory(dim, num_heads, grid_size, device=, dtype=) per branch."""
    calls = []

    def factory(dim, num_heads, grid_size, device=None, dtype=None):
        calls.append((dim, num_heads, grid_size))
        return CSwinAttention(dim, num_heads, grid_size, device=device, dtype=dtype)

    depths = (1, 1, 2, 1)
    model = timm.create_model(
        TINY, img_size=(96, 128), depths=depths, split_sizes=(1, 2, 3, None), mixer_split_sizes=(None, 4, 7, None),
        mixers=[[factory], [factory], [None, factory], [factory]], device='meta')
    # stage maps 24x32, 12x16, 6x8, 3x4; stage 2 stripes of 4, stage 3 block 1 stripes of 7
    assert calls == [(64, 2, (24, 32)), (64, 2, (12, 4)), (64, 2, (4, 16)), (128, 4, (6, 7)), (128, 4, (7, 8)),
                     (512, 16, (3, 4))]
    assert [b.split_size for b in model.stages[2].blocks] == [3, 7]
    with pytest.raises(ValueError, match=r'mixers: expected one sequence per stage with one entry per block '
                                         r'\(depths=\(1, 1, 2, 1\)\), got lengths \[1, 1, 1, 1\]'):
        timm.create_model(TINY, depths=depths, mixers=[[None]] * 4, device='meta')


def test_attn_types_no_weight_decay_and_meta_build():
    with torch.device('meta'):
        plain = timm.create_model(TINY, attn_types='SSSS')
    assert not any(isinstance(m, FocusedLinearBranch) for m in plain.modules())
    assert all(p.is_meta for p in plain.parameters()) and plain.no_weight_decay() == set()
    model = timm.create_model(TINY, device='meta')
    nwd = model.no_weight_decay()
    assert len(nwd) == 2 * 6 and all(k.endswith(('.positional_encoding', '.scale')) for k in nwd)
    assert model.stages[0].blocks[0].attns[0].positional_encoding.shape == (1, 56 * 56, 64)


def test_bf16_autocast_forward_backward_finite():
    torch.manual_seed(0)
    model = timm.create_model(TINY, img_size=64, depths=SMALL_DEPTHS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(2, 3, 64, 64) * 50
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_empty_batch_and_scripted_block():
    model = timm.create_model(TINY, img_size=64, depths=(1, 1, 1, 1)).eval()
    with torch.no_grad():
        assert model(torch.randn(0, 3, 64, 64)).shape == (0, 1000)
    block = CSwinBlock(32, 4, (5, 9), split_size=2).eval()
    x = torch.randn(2, 5, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(block)(x), block(x))
