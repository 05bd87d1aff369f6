"""FLatten-Swin (T / S / B / B@384) on the Swin host: official fidelity, checkpoints, windows, resolution, numerics.

Spec: ../shared/specs/flatten_agent_convit_davit_twins.md §2.2-2.5 and §7; layouts in
tests/fixtures/official_layouts/flatten. The reference is tests/swin_reference.py, a transcription of the official
``models/flatten_swin.py``; the generic API matrix lives in test_models.py.
"""
import pytest
import timm
import torch
from timm.layers import resize_rel_pos_bias_table

import visionattn  # noqa: F401
from layouts import load_layout, random_state_dict, wrap
from official_checks import assert_filter_maps_layout, assert_loads_file, assert_param_count, meta_model
from swin_reference import FLattenSwinTransformer, SwinTransformerBlock, swin_det_block
from visionattn.layers import FocusedLinearAttention, SwinWindowAttention
from visionattn.layers.focused_linear_attention import resample_grid_tokens
from visionattn.layers.window_attention import relative_position_index, shift_window_mask
from visionattn.models._builder import parse_attn_types
from visionattn.models._swin import Swin, SwinBlock
from visionattn.models.flatten import FAMILY_CARD, checkpoint_filter_fn

VARIANTS = [  # official variant, visionattn name, params (spec §7)
    ('flatten_swin_t', 'visionattn_flatten_swin_tiny', 29_192_384),
    ('flatten_swin_s', 'visionattn_flatten_swin_small', 50_510_288),
    ('flatten_swin_b', 'visionattn_flatten_swin_base', 88_972_488),
    ('flatten_swin_b_384', 'visionattn_flatten_swin_base_384', 91_433_928),
]
TINY = 'visionattn_flatten_swin_tiny'
# a small custom FLatten-Swin: 'L' stage 1 in windows of 28 (shifted on block 1, no mask), 'M1' stage 2 (block 0
# global 'L', block 1 'S' in shifted, masked 7x7 windows), 'S' stages 3-4
SMALL_CFG = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=28, attn_type='LMSS1')


def _perturb_(module, std, seed=1):
    """Every parameter (norms, scale, positional encodings, bias tables, dwc, ...) moved off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def _small_swin(img_size=224, **kwargs):
    """Our host with SMALL_CFG's blocks (the official window 28 for 'L', 7 for 'S')."""
    depths = SMALL_CFG['depths']
    flags = parse_attn_types(SMALL_CFG['attn_type'], depths)
    mixers = [[FocusedLinearAttention if f else None for f in stage] for stage in flags]
    return Swin(img_size=img_size, embed_dims=(16, 32, 64, 128), depths=depths, num_heads=SMALL_CFG['num_heads'],
                window_size=7, mixer_window_size=28, mixers=mixers, **kwargs)


def _load_reference(ours, ref):
    ours.load_state_dict(ours.filter_checkpoint(ref.state_dict()), strict=True)
    return ours.eval(), ref.eval()


def _max_diff(ours, ref, x):
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert b.abs().max() > 0.1, 'degenerate logits make the comparison meaningless'
    return (a - b).abs().max().item()


def test_all_variants_registered():
    assert sorted(visionattn.list_models('flatten_swin_*')) == sorted(n for _, n, _ in VARIANTS)
    assert all(n in FAMILY_CARD['accuracy'] for _, n, _ in VARIANTS)


# ------------------------------------------------------------------------------------------
# parameter counts and checkpoints (meta device for the big ones)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('variant,name,params', VARIANTS)
def test_param_count_and_layout(variant, name, params):
    assert load_layout('flatten', variant)['params'] == params
    assert_param_count(name, 'flatten', variant)
    assert_filter_maps_layout(name, 'flatten', variant)


def test_state_dict_follows_the_official_order_without_its_buffers():
    """196 official entries = 185 tensors (same order after the renaming) + 11 buffers the host rebuilds."""
    layout = load_layout('flatten', 'flatten_swin_t')['state_dict']
    model = meta_model(TINY)
    sd = {k: torch.empty(s, device='meta') for k, s, _ in layout}
    assert len(sd) == 196
    mapped, ours = list(checkpoint_filter_fn(sd, model)), list(model.state_dict())
    assert mapped == ours
    assert len(ours) == 185 and not list(model.buffers())


@pytest.mark.parametrize('container,img_size', [('raw', 224), ('module', 64)])
def test_loads_official_file(tmp_path, container, img_size):
    assert_loads_file(tmp_path, TINY, 'flatten', 'flatten_swin_t', container, input_size=(1, 3, img_size, img_size),
                      img_size=img_size)


def test_filter_reads_model_container_ignoring_ema():
    """main_ema.py checkpoints: {'model', 'state_dict_ema', ...}; the filter takes 'model'. (timm's file loader,
    ``pretrained_cfg_overlay=dict(file=...)``, unwraps such a file itself and prefers 'state_dict_ema'.)"""
    layout = load_layout('flatten', 'flatten_swin_t')
    sd, ema = random_state_dict(layout, seed=1), random_state_dict(layout, seed=2)
    out = checkpoint_filter_fn({'model': sd, 'state_dict_ema': ema, 'epoch': 300}, meta_model(TINY))
    assert out['stages.2.blocks.1.attn.qkv.weight'] is sd['layers.2.blocks.1.attn.qkv.weight']
    assert out['stages.1.downsample.reduction.weight'] is sd['layers.0.downsample.reduction.weight']
    assert out['stem.proj.weight'] is sd['patch_embed.proj.weight'] and out['head.fc.weight'] is sd['head.weight']


def test_filter_refuses_a_wrong_file():
    layout = load_layout('flatten', 'flatten_swin_t')['state_dict']
    model = meta_model(TINY)
    sd = {k: torch.empty(s, device='meta') for k, s, _ in layout}
    with pytest.raises(ValueError, match=r'1 missing keys: stages\.2\.blocks\.3\.attn\.qkv\.weight'):
        checkpoint_filter_fn({k: v for k, v in sd.items() if k != 'layers.2.blocks.3.attn.qkv.weight'}, model)
    with pytest.raises(ValueError, match=r'unexpected keys: stages\.2\.blocks\.6\.'):  # a Swin-S file
        checkpoint_filter_fn({k: torch.empty(s, device='meta') for k, s, _ in
                              load_layout('flatten', 'flatten_swin_s')['state_dict']}, model)


# ------------------------------------------------------------------------------------------
# fidelity against the official model (same weights, every parameter perturbed)
# ------------------------------------------------------------------------------------------

def test_matches_official_tiny_224_fp32():
    torch.manual_seed(0)
    ref = _perturb_(FLattenSwinTransformer(), std=0.05)
    ours, ref = _load_reference(timm.create_model(TINY), ref)
    diff = _max_diff(ours, ref, torch.randn(2, 3, 224, 224))
    assert diff <= 1e-5, f'max |dlogit| {diff:.2e}'


def test_matches_official_small_config_float64():
    """Windowed + shifted 'L' blocks (no mask), an 'M1' stage, shifted and masked 'S' stages, in float64."""
    torch.manual_seed(0)
    ref = _perturb_(FLattenSwinTransformer(num_classes=10, **SMALL_CFG).double(), std=0.3)
    ours, ref = _load_reference(_small_swin(num_classes=10).double(), ref)
    blocks = [list(s.blocks) for s in ours.stages]
    assert [(b.is_global, b.window_and_shift(56, 56)) for b in blocks[0]] == [(False, (28, 28, 0, 0)),
                                                                               (False, (28, 28, 14, 14))]
    assert blocks[1][0].is_global and not blocks[1][0].own_attention
    assert blocks[1][1].own_attention and blocks[1][1].window_and_shift(28, 28) == (7, 7, 3, 3)
    assert blocks[2][1].window_and_shift(14, 14) == (7, 7, 3, 3) and blocks[3][1].window_and_shift(7, 7) == (7, 7, 0, 0)
    diff = _max_diff(ours, ref, torch.randn(1, 3, 224, 224, dtype=torch.float64))
    assert diff <= 1e-10, f'max |dlogit| {diff:.2e}'


def test_matches_official_tiny_at_img_size_64_float64():
    """img_size=64 (test_models' size): 'L' stages global at 16 / 8, 'S' windows clamped to 4 and 2."""
    torch.manual_seed(0)
    ref = _perturb_(FLattenSwinTransformer(img_size=64).double(), std=0.3)
    ours, ref = _load_reference(timm.create_model(TINY, img_size=64).double(), ref)
    assert ours.stages[2].blocks[1].attn.window_size == (4, 4)
    diff = _max_diff(ours, ref, torch.randn(2, 3, 64, 64, dtype=torch.float64))
    assert diff <= 1e-10, f'max |dlogit| {diff:.2e}'


def test_padded_shifted_block_matches_swin_detection():
    """A 10x13 map in 7x7 windows shifted by 3: zero-pad to 14x14, shift, mask of the padded map, crop (official
    Swin detection block), float64."""
    torch.manual_seed(0)
    ref = _perturb_(SwinTransformerBlock(32, (14, 14), 2, ws=7, shift=3, attn_type='S').double(), std=0.3)
    ours = SwinBlock(32, 2, (14, 14), window_size=7, shifted=True).double().eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.endswith(('_index', 'attn_mask'))})
    x = torch.randn(2, 10, 13, 32, dtype=torch.float64)
    with torch.no_grad():
        want = swin_det_block(ref, x.reshape(2, 130, 32), 10, 13).reshape(2, 10, 13, 32)
        torch.testing.assert_close(ours(x), want, rtol=0, atol=1e-12)


def test_shift_mask_and_relative_position_index_are_the_official_ones():
    ref = SwinTransformerBlock(32, (14, 14), 2, ws=7, shift=3, attn_type='S')
    assert torch.equal(shift_window_mask(14, 14, (7, 7), (3, 3), torch.device('cpu')), ref.attn_mask)
    assert torch.equal(relative_position_index((7, 7), (7, 7), torch.device('cpu')),
                       ref.attn.relative_position_index.reshape(-1))
    # a smaller window uses the centre of the table: offsets (dr, dc) keep their entries
    small = relative_position_index((3, 2), (7, 7), torch.device('cpu')).reshape(6, 6)
    full = ref.attn.relative_position_index
    assert torch.equal(small[5, 0], full[2 * 7 + 1, 0])  # query (2, 1), key (0, 0): offset (2, 1)


# ------------------------------------------------------------------------------------------
# block layout of the released variants
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,size,expected', [
    # per stage: (own attention, global, (wh, ww, sh, sw) of block 1 at the training map)
    (TINY, 224, [(False, True, (56, 56, 0, 0)), (False, True, (28, 28, 0, 0)),
                 (True, False, (7, 7, 3, 3)), (True, False, (7, 7, 0, 0))]),
    ('visionattn_flatten_swin_base_384', 384, [(False, True, (96, 96, 0, 0)), (False, True, (48, 48, 0, 0)),
                                               (True, False, (12, 12, 6, 6)), (True, False, (12, 12, 0, 0))]),
])
def test_released_block_layout(name, size, expected):
    """LLSS: 'L' stages one global window (the LA window 56 / 96 covers the map), 'S' stages Swin windows of 7 (12
    at 384) shifted on odd blocks, the last stage one window without shift (the official clamp)."""
    model = meta_model(name)
    for s, (stage, (own, is_global, window)) in enumerate(zip(model.stages, expected)):
        side = size // 4 // 2 ** s
        block = stage.blocks[1]
        assert (block.own_attention, block.is_global, block.window_and_shift(side, side)) == (own, is_global, window)
        assert isinstance(block.attn, SwinWindowAttention if own else FocusedLinearAttention)
    assert model.stages[0].blocks[0].attn.positional_encoding.shape == (1, (size // 4) ** 2, model.stages[0].out_chs)


def test_mixer_blocks_get_window_tokens():
    """The mixer interface: factory(dim, num_heads, window, **dd), called with (B * nW, wh * ww, C) and (wh, ww)."""
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, dim, num_heads, grid_size, device=None, dtype=None):
            super().__init__()
            calls.append(('init', dim, num_heads, tuple(grid_size)))

        def forward(self, x, H: int, W: int):
            calls.append(('call', tuple(x.shape), H, W))
            return x

    model = Swin(img_size=64, embed_dims=(8, 16, 32, 64), depths=(2, 1, 1, 1), num_heads=(1, 2, 4, 8),
                 mixer_window_size=4, mixers=[[Recorder, Recorder], [Recorder], [None], [None]],
                 dynamic_img_size=True).eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
        model(torch.randn(2, 3, 40, 64))
    assert calls[:3] == [('init', 8, 1, (4, 4)), ('init', 8, 1, (4, 4)), ('init', 16, 2, (4, 4))]
    assert calls[3:6] == [('call', (32, 16, 8), 4, 4)] * 2 + [('call', (8, 16, 16), 4, 4)]
    # 10x16 map: padded to 12x16 (3 x 4 windows); 5x8 map: windows of 4 padded to 8x8
    assert calls[6:] == [('call', (24, 16, 8), 4, 4)] * 2 + [('call', (8, 16, 16), 4, 4)]


def test_official_init_and_no_weight_decay():
    torch.manual_seed(0)
    model = timm.create_model(TINY, img_size=64)
    attn = model.stages[0].blocks[0].attn
    assert not attn.scale.any() and not attn.positional_encoding.any()
    assert abs(attn.qkv.weight.std().item() - 0.02) < 0.003 and not attn.qkv.bias.any()
    table = model.stages[2].blocks[0].attn.relative_position_bias_table
    assert abs(table.std().item() - 0.02) < 0.005
    assert torch.all(model.stages[1].blocks[0].norm1.weight == 1) and not model.norm.bias.any()
    nwd = model.no_weight_decay()
    assert 'stages.0.blocks.1.attn.positional_encoding' in nwd and 'stages.1.blocks.0.attn.scale' in nwd
    assert 'stages.3.blocks.1.attn.relative_position_bias_table' in nwd
    assert not any(k.endswith('weight') for k in nwd)


# ------------------------------------------------------------------------------------------
# resolution
# ------------------------------------------------------------------------------------------

def test_img_size_resamples_the_encodings_of_a_224_file(tmp_path):
    """img_size=96: the 'L' encodings (56 -> 24, 28 -> 12) resampled bilinearly, the 'S' bias tables of the
    clamped windows (7 -> 6 and 3) resized with timm's resize_rel_pos_bias_table."""
    sd = random_state_dict(load_layout('flatten', 'flatten_swin_t'), seed=3)
    path = tmp_path / 'flatten_swin_t.pth'
    torch.save(wrap(sd, 'model'), path)
    model = timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=96).eval()
    got = model.state_dict()
    pe = 'layers.{}.blocks.1.attn.positional_encoding'
    torch.testing.assert_close(got['stages.0.blocks.1.attn.positional_encoding'],
                               resample_grid_tokens(sd[pe.format(0)], (56, 56), (24, 24)), rtol=0, atol=0)
    assert got['stages.1.blocks.1.attn.positional_encoding'].shape == (1, 144, 192)
    for s, window in ((2, 6), (3, 3)):
        key = f'layers.{s}.blocks.0.attn.relative_position_bias_table'
        want = resize_rel_pos_bias_table(sd[key], (window, window), ((2 * window - 1) ** 2, sd[key].shape[1]))
        torch.testing.assert_close(got[f'stages.{s}.blocks.0.attn.relative_position_bias_table'], want)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 1000)


def test_wrong_size_is_refused_unless_dynamic():
    model = timm.create_model(TINY, img_size=64).eval()
    msg = r'image of 96x80 does not match .* input size 64x64 .*img_size=\(96, 80\).*dynamic_img_size=True'
    with pytest.raises(ValueError, match=msg):
        model(torch.randn(1, 3, 96, 80))
    with pytest.raises(ValueError, match=msg):
        model.forward_intermediates(torch.randn(1, 3, 96, 80))


def test_dynamic_size_is_exact_at_the_training_size_and_runs_elsewhere():
    torch.manual_seed(0)
    fixed = _perturb_(timm.create_model(TINY, img_size=64), std=0.02).eval()
    dynamic = timm.create_model(TINY, img_size=64, dynamic_img_size=True).eval()
    dynamic.load_state_dict(fixed.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dynamic(x), fixed(x))
        for size in [(96, 128), (50, 70), (224, 96), (32, 32)]:
            out = dynamic.forward_features(torch.randn(1, 3, *size))
            assert out.shape == (1, 768, -(-size[0] // 32), -(-size[1] // 32)) and torch.isfinite(out).all()


def test_dynamic_size_equals_the_model_built_at_that_size():
    """Trained at 224, run at 448 with dynamic_img_size: the same as created with img_size=448 from the 224 weights
    (global 'L' encodings resampled bilinearly on the fly / on load; 'S' windows 7 in both, shifted at 28 and 14)."""
    torch.manual_seed(0)
    mixers = [[FocusedLinearAttention] * 2] * 2 + [[None] * 2] * 2
    kwargs = dict(embed_dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), mixers=mixers)
    dynamic = _perturb_(Swin(img_size=224, dynamic_img_size=True, **kwargs), std=0.05).eval()
    fixed = Swin(img_size=448, **kwargs).eval()
    fixed.load_state_dict(fixed.filter_checkpoint(dynamic.state_dict()))
    assert fixed.stages[3].blocks[1].window_and_shift(14, 14) == (7, 7, 3, 3)
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), fixed(x), rtol=0, atol=1e-6)


def test_bf16_autocast_stays_finite():
    torch.manual_seed(0)
    model = _perturb_(timm.create_model(TINY, img_size=64), std=0.02)
    x = torch.randn(2, 3, 64, 64) * 50
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
