"""The model API matrix, parametrised over every registered ``visionattn_*`` model.

Models above ``FULL_TEST_MAX_PARAMS`` parameters (and the larger variants of ``DEPTH_WIDTH_ONLY`` families)
are checked on the meta device (creation, cfg, feature info, output shapes) so the suite stays within
minutes on two CPU cores; the smaller variants of the same family exercise the identical code with real
numbers.
"""
import io

import pytest
import timm
import torch
from timm.layers import trunc_normal_
from timm.models._manipulate import reinit_non_persistent_buffers

import visionattn
from visionattn.deploy import smallest_per_architecture
from visionattn.layers.weight_init import init_trunc_normal_
from official_checks import family_filter, keep_block_kinds, meta_model
from layouts import num_params

MODELS = visionattn.list_models()
FULL_TEST_MAX_PARAMS = 60_000_000
HIER_INPUT = 64  # small square input for hierarchical models (stride 32 -> 2x2 last map)

# Models that torch.fx cannot trace, and why.
FX_EXCLUDE = {}


def _fixed_size(name):
    return timm.get_pretrained_cfg_value(name, 'fixed_input_size') or False


SIZES, HIER_FIXED, MIN_INPUT = {}, set(), {}  # parameters as the tests build the model; least input side
for _name in MODELS:
    _meta = meta_model(_name)
    MIN_INPUT[_name] = getattr(_meta, 'min_input_size', 0)
    if _fixed_size(_name) and hasattr(_meta, 'stages'):
        # hierarchical models with learned encodings sized to the input (FLatten, Agent): built at the
        # small test size with img_size=, which is the same code at fewer tokens
        HIER_FIXED.add(_name)
        _meta = meta_model(_name, img_size=HIER_INPUT)
    SIZES[_name] = num_params(_meta)
del _meta
FAMILIES = {}
for _name in MODELS:
    FAMILIES.setdefault(timm.models._registry._model_to_module[_name], []).append(_name)
# The smallest model of each family for the torch.compile smoke test.
COMPILE_MODELS = sorted(min(names, key=SIZES.get) for names in FAMILIES.values())
# Families whose variants of one architecture differ only in depth and width (the same blocks, stems and
# mixers): the smallest variant of each architecture runs the real-number matrix, the others the meta-device
# checks; their own fidelity tests build every variant.
DEPTH_WIDTH_ONLY = ('visionattn_flatten_', 'visionattn_agent_', 'visionattn_biformer_')
_SMALLEST = set(smallest_per_architecture())
SMALL = [m for m in MODELS
         if SIZES[m] <= FULL_TEST_MAX_PARAMS and (not m.startswith(DEPTH_WIDTH_ONLY) or m in _SMALLEST)]
BIG = [m for m in MODELS if m not in SMALL]


def _build_kwargs(name):
    return {'img_size': HIER_INPUT} if name in HIER_FIXED else {}


def _input_size(name, non_square=False):
    cfg = timm.models.get_pretrained_cfg(name)
    if name in HIER_FIXED:
        return (HIER_INPUT, HIER_INPUT)
    if _fixed_size(name):
        return tuple(cfg.input_size[1:])
    side = max(HIER_INPUT, MIN_INPUT[name])  # BiFormer-STL-NCHW routes regions of at least one token: 112
    return (side, side + 32) if non_square else (side, side)


def _create(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **{**_build_kwargs(name), **kwargs})


def test_registry():
    assert MODELS, 'no visionattn model is registered'
    assert all(m.startswith('visionattn_') for m in MODELS)
    assert set(MODELS) <= set(timm.list_models('visionattn_*'))
    with pytest.raises(ValueError, match='not_a_model'):
        visionattn.create_model('visionattn_not_a_model')
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('visionattn_not_a_model')


def test_init_trunc_normal_draws_timms_values_and_skips_meta():
    """Real tensors get timm's truncated-normal draw (same generator state, same values, within the bounds);
    a meta tensor is returned as it is, without a draw."""
    torch.manual_seed(0)
    ours = init_trunc_normal_(torch.empty(256, 64), std=.5, a=-.4, b=.4)
    torch.manual_seed(0)
    assert torch.equal(ours, trunc_normal_(torch.empty(256, 64), std=.5, a=-.4, b=.4))
    assert ours.abs().max() <= .4 and ours.std() > .1
    meta = torch.empty(256, 64, device='meta')
    assert init_trunc_normal_(meta, std=.02) is meta


def test_create_model_accepts_only_visionattn_names():
    """visionattn.create_model refuses timm's own models (which timm.create_model would build) and unknown
    names, naming the argument and value and suggesting the close visionattn names."""
    assert timm.is_model('davit_tiny')  # a timm model: it must not be returned silently
    with pytest.raises(ValueError, match=r"model_name='davit_tiny' is not a visionattn model; "
                                         r"did you mean 'visionattn_davit_tiny'\?"):
        visionattn.create_model('davit_tiny')
    with pytest.raises(ValueError, match=r"model_name='visionattn_davit_tinny'.*did you mean .*'visionattn_davit_tiny'"):
        visionattn.create_model('visionattn_davit_tinny')
    with pytest.raises(ValueError, match=r"model_name='efficientnet_b0'.*expected a name from visionattn\.list_models\(\)"):
        visionattn.create_model('efficientnet_b0')
    with pytest.raises(ValueError, match=r"model_name='resnet50' is not a visionattn model; did you mean one of .*"
                                         r"'visionattn_resnet50_cbam'"):
        visionattn.create_model('resnet50')  # timm's resnet50: the visionattn ResNet-50s are suggested
    with pytest.raises(ValueError, match=r'model_name=None'):
        visionattn.create_model(None)
    with pytest.raises(ValueError, match=r"did you mean 'visionattn_convit_tiny\.fb_in1k'\?"):
        visionattn.create_model('convit_tiny.fb_in1k')
    model = visionattn.create_model('visionattn_davit_tiny.msft_in1k', device='meta')  # a pretrained tag is fine
    assert model.pretrained_cfg['architecture'] == 'visionattn_davit_tiny'


@pytest.mark.parametrize('name', SMALL)
def test_forward_and_grad_checkpointing(name):
    model = _create(name).eval()
    x = torch.randn(2, 3, *_input_size(name))
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, model.num_classes)
        assert torch.isfinite(out).all()
        model.set_grad_checkpointing()
        out_ckpt = model(x)
    torch.testing.assert_close(out_ckpt, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', SMALL)
def test_backward(name, fresh_caches):
    """Training after an inference-mode forward at the same size (tables cached then must serve autograd)."""
    model = _create(name, num_classes=42).eval()
    x = torch.randn(2, 3, *_input_size(name))
    with torch.inference_mode():
        model(x)
    model.train()
    out = model(x)
    assert out.shape == (2, 42)
    out.mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f'parameters without gradient: {no_grad[:10]}'


@pytest.mark.parametrize('name', MODELS)
def test_default_cfg(name):
    """timm's cfg contract, on the meta device at the default input size."""
    model = meta_model(name).eval()
    cfg = model.pretrained_cfg
    for key in ('input_size', 'pool_size', 'first_conv', 'classifier', 'mean', 'std', 'license'):
        assert key in cfg, f'pretrained_cfg lacks {key!r}'
    assert model.num_features > 0 and model.head_hidden_size > 0
    sd = model.state_dict()
    assert cfg['first_conv'] + '.weight' in sd
    assert cfg['classifier'] + '.weight' in sd
    x = torch.empty(1, *cfg['input_size'], device='meta')
    feat = model.forward_features(x)
    if feat.ndim == 4:
        assert feat.shape[1] == model.num_features
        assert tuple(feat.shape[2:]) == tuple(cfg['pool_size'])
    pre = model.forward_head(feat, pre_logits=True)
    assert pre.shape == (1, model.head_hidden_size)
    model.reset_classifier(0)
    assert model(x).shape == (1, model.head_hidden_size)
    model.reset_classifier(0, '')
    out = model(x)
    assert out.ndim in (3, 4)  # unpooled map (hierarchical) or tokens (plain)
    if out.ndim == 4:
        assert tuple(out.shape[2:]) == tuple(cfg['pool_size'])


def _other_pool(model):
    """A global_pool the model supports other than its current one."""
    if hasattr(model, 'cls_token'):  # plain backbone: 'token' needs the class token
        if model.global_pool == 'token':
            return 'avg'
        return 'token' if model.cls_token is not None else ''
    return 'max'


@pytest.mark.parametrize('name', MODELS)
def test_reset_classifier(name):
    """reset_classifier(n > 0), (0) and with another global_pool, each followed by a forward.

    Small models run real numbers at a small input; big ones run on the meta device. The new heads are
    created on the model's device and in its dtype (checked on meta in bfloat16 for every model)."""
    if name in SMALL:
        model = _create(name).eval()
        x = torch.randn(2, 3, *_input_size(name))
    else:
        model = meta_model(name).eval()
        x = torch.empty(2, *timm.models.get_pretrained_cfg(name).input_size, device='meta')
    with torch.no_grad():
        feat = model.forward_features(x)
        pre = model.forward_head(feat, pre_logits=True)
        model.reset_classifier(7)
        assert model.num_classes == 7 and model.get_classifier().out_features == 7
        out = model(x)
        assert out.shape == (2, 7)
        model.reset_classifier(0)
        assert model.num_classes == 0
        out = model(x)
        assert out.shape == (2, model.head_hidden_size)
        pool = _other_pool(model)
        model.reset_classifier(5, pool)
        # timm's CNNs keep the pool as a SelectAdaptivePool2d module, the transformers as a string
        assert getattr(model.global_pool, 'pool_type', model.global_pool) == pool and model.num_classes == 5
        out = model(x)
        # without pooling a plain model classifies every token
        assert out.shape == ((2, feat.shape[1], 5) if pool == '' else (2, 5))
        if name in SMALL:
            assert torch.isfinite(out).all()
            new_pre = model.forward_head(feat, pre_logits=True)
            assert new_pre.shape != pre.shape or not torch.allclose(new_pre, pre), 'global_pool had no effect'
            assert torch.isfinite(new_pre).all()

    model = meta_model(name, dtype=torch.bfloat16)
    for n, pool in ((7, None), (0, None), (5, _other_pool(model))):
        model.reset_classifier(n, pool)
        head = list(model.get_classifier().parameters())
        assert len(head) == (2 if n else 0)
        assert all(p.is_meta and p.dtype == torch.bfloat16 for p in head), (n, pool)


@pytest.mark.parametrize('name', MODELS)
def test_build_under_meta_device_context(name):
    """``with torch.device('meta')`` builds every model (and its features_only form), as timm's do.

    All tensors are on meta; cfg, feature info and output shapes are there. Small models also match a
    normal build key for key and, materialised (``to_empty`` + the normal build's weights + timm's
    ``reinit_non_persistent_buffers``), compute the normal build's outputs."""
    with torch.device('meta'):
        model = timm.create_model(name, **_build_kwargs(name))
        features = timm.create_model(name, features_only=True, **_build_kwargs(name))
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.is_meta for t in tensors + list(features.parameters()) + list(features.buffers()))
    assert num_params(model) == SIZES[name]
    cfg = model.pretrained_cfg
    assert cfg['architecture'] == name and 'input_size' in cfg
    assert len(model.feature_info) > 0 and features.feature_info.channels()
    assert features.feature_info.channels() == [model.feature_info[i]['num_chs'] for i in features.feature_info.out_indices]
    x = torch.empty(1, 3, *_input_size(name), device='meta') if name in HIER_FIXED else torch.empty(
        1, *cfg['input_size'], device='meta')
    model.eval()
    assert model(x).shape == (1, model.num_classes)
    assert [o.shape[1] for o in features(x)] == features.feature_info.channels()
    if name not in SMALL:
        return
    real = _create(name).eval()
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in real.state_dict().items()}
    model.to_empty(device='cpu')
    model.load_state_dict(real.state_dict())
    reinit_non_persistent_buffers(model)
    x = torch.randn(1, 3, *_input_size(name))
    with torch.no_grad():
        torch.testing.assert_close(model(x), real(x))


@pytest.mark.parametrize('name', SMALL)
def test_empty_batch(name):
    """A batch of 0 images gives empty outputs of the batch-1 shapes (logits, features, intermediates)."""
    model = _create(name).eval()
    size = _input_size(name)
    with torch.no_grad():
        final, inter = model.forward_intermediates(torch.randn(1, 3, *size))
    empty = torch.randn(0, 3, *size)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out = model(empty)
            assert out.shape == (0, model.num_classes)
            assert model.forward_features(empty).shape == (0,) + final.shape[1:]
            got = model.forward_intermediates(empty, intermediates_only=True)
            assert [t.shape for t in got] == [(0,) + t.shape[1:] for t in inter]
    out.sum().backward()  # the empty batch also trains (zero gradients)


@pytest.mark.parametrize('name', SMALL)
def test_features_only(name):
    model = _create(name, features_only=True, out_indices=(5, 11) if _fixed_size(name) and name not in HIER_FIXED else (1, 3)).eval()
    size = _input_size(name)
    outs = model(torch.randn(1, 3, *size))
    info = model.feature_info
    assert len(outs) == 2
    for o, chs, red in zip(outs, info.channels(), info.reduction()):
        assert o.shape[1] == chs
        assert o.shape[2] <= -(-size[0] // red) + 1 and o.shape[3] <= -(-size[1] // red) + 1


@pytest.mark.parametrize('name', SMALL)
def test_forward_intermediates(name):
    model = _create(name).eval()
    x = torch.randn(1, 3, *_input_size(name))
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(inter) == len(model.feature_info)
        for t, info in zip(inter, model.feature_info):
            assert t.ndim == 4 and t.shape[1] == info['num_chs']
        only = model.forward_intermediates(x, indices=[0], intermediates_only=True)
        torch.testing.assert_close(only[0], inter[0])
        model.set_grad_checkpointing()
        final_ckpt, _ = model.forward_intermediates(x)
    torch.testing.assert_close(final_ckpt, final, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', SMALL)
def test_non_square_input(name):
    kwargs = {'dynamic_img_size': True} if _fixed_size(name) else {}
    model = _create(name, **kwargs).eval()
    size = (HIER_INPUT, HIER_INPUT + 32) if _fixed_size(name) else _input_size(name, non_square=True)
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, model.num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize('name', SMALL)
def test_torchscript(name):
    with timm.layers.set_layer_config(scriptable=True):
        model = _create(name).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, *_input_size(name))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', SMALL)
def test_fx_trace(name):
    if name in FX_EXCLUDE:
        pytest.skip(f'cannot be traced by torch.fx: {FX_EXCLUDE[name]}')
    from timm.models._features_fx import create_feature_extractor
    model = _create(name).eval()
    # the logits: the transformers' 'head' module, the CNNs' classifier ('fc' / 'classifier')
    node = 'head' if 'head' in dict(model.named_modules()) else model.pretrained_cfg['classifier']
    fx_model = create_feature_extractor(model, return_nodes=[node])
    x = torch.randn(1, 3, *_input_size(name))
    with torch.no_grad():
        torch.testing.assert_close(fx_model(x)[node], model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', COMPILE_MODELS)
def test_torch_compile_smoke(name):
    """torch.compile (inductor) equals eager; transformer stages cut to one block of each kind (a fraction of the
    compile time)."""
    model = _create(name).eval()
    keep_block_kinds(model)
    compiled = torch.compile(model)
    x = torch.randn(1, 3, *_input_size(name))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('name', SMALL)
def test_state_dict_round_trip(name):
    model = _create(name).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = _create(name).eval()
    other.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    x = torch.randn(1, 3, *_input_size(name))
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x))


@pytest.mark.parametrize('name', BIG)
def test_big_model_on_meta(name):
    """Large variants: creation, features_only plumbing and output shapes, without memory."""
    model = meta_model(name, features_only=True)
    cfg = timm.models.get_pretrained_cfg(name)
    outs = model(torch.empty(1, *cfg.input_size, device='meta'))
    assert [o.shape[1] for o in outs] == model.feature_info.channels()


@pytest.mark.parametrize('name', SMALL)
def test_bad_inputs(name, tmp_path):
    model = _create(name).eval()
    size = _input_size(name)
    with pytest.raises(ValueError, match='in_chans'):
        model(torch.randn(1, 1, *size))
    with pytest.raises(ValueError, match='smaller than|expected'):
        model(torch.randn(1, 3, 8, 8))
    sd = model.state_dict()
    filter_fn = family_filter(model)
    missing = dict(sd)
    dropped = next(k for k in missing if not k.startswith('head'))
    del missing[dropped]
    with pytest.raises(ValueError, match='missing'):
        filter_fn(missing, model)
    unexpected = dict(sd, **{'blocks_extra.weight': torch.zeros(3)})
    with pytest.raises(ValueError, match='unexpected'):
        filter_fn(unexpected, model)
    path = tmp_path / 'bad.pth'
    torch.save({'state_dict': missing}, path)
    with pytest.raises(ValueError, match='missing'):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_parse_attn_types_follows_the_official_grammar():
    """FLatten / Agent ATTN_TYPE: one letter per stage, k after the letters for the one 'M' stage."""
    from visionattn.models._builder import parse_attn_types
    assert parse_attn_types('LLSS', (2, 2, 6, 2)) == [[True] * 2, [True] * 2, [False] * 6, [False] * 2]
    assert parse_attn_types('AAMB2', (2, 2, 18, 2))[2] == [True, True] + [False] * 16  # Agent-Swin-B
    assert parse_attn_types('BBBB', (1, 1, 1, 1)) == [[False]] * 4
    for bad in ('LLS', 'LLSS2', 'AAMB', 'LLXS'):
        with pytest.raises(ValueError, match=f"attn_types='{bad}'"):
            parse_attn_types(bad, (2, 2, 6, 2))
    with pytest.raises(ValueError, match='M9 asks for 9 mixer blocks in a stage of 6'):
        parse_attn_types('LLMS9', (2, 2, 6, 2))
