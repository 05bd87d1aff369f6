"""Checks shared by the per-family official-fidelity tests (parameter counts, layouts, timm parity)."""
import timm
import torch

import visionattn  # noqa: F401
from layouts import load_layout, num_params, random_state_dict, wrap


def family_filter(model):
    """The ``checkpoint_filter_fn`` of the family file that registers ``model`` (its class may live in a
    shared host module)."""
    import importlib
    module = timm.models.model_entrypoint(model.pretrained_cfg['architecture']).__module__
    return importlib.import_module(module).checkpoint_filter_fn


def meta_model(model_name: str, **kwargs):
    """Instantiate a model on the meta device (no memory, any size)."""
    return timm.create_model(model_name, device='meta', **kwargs)


def keep_block_kinds(model):
    """Cut every hierarchical ``Stage`` of ``model``, in place, to the first block of each distinct configuration
    (by ``repr``: Swin's plain / shifted windows, DiNAT's dilations, Twins' local / global attention), in order;
    models without such stages (CNNs, plain ViTs) stay whole. Returns ``model``.

    Tracing, exporting and compiling then see every code path of the stage at a fraction of the graph size.
    """
    from visionattn.models._builder import Stage
    for stage in [m for m in model.modules() if isinstance(m, Stage)]:
        kinds, kept = set(), []
        for block in stage.blocks:
            if repr(block) not in kinds:
                kinds.add(repr(block))
                kept.append(block)
        stage.blocks = type(stage.blocks)(kept)
    return model


def assert_param_count(model_name: str, family: str, variant: str, timm_layout: bool = False):
    expected = load_layout(family, variant, timm_layout)['params']
    got = num_params(meta_model(model_name))
    assert got == expected, f'{model_name}: {got:,} parameters, official {family}/{variant} has {expected:,}'


def assert_filter_maps_layout(model_name: str, family: str, variant: str, timm_layout: bool = False):
    """The family's checkpoint filter maps the layout's keys onto the model exactly (meta tensors)."""
    layout = load_layout(family, variant, timm_layout)
    model = meta_model(model_name)
    sd = {k: torch.empty(shape, dtype=getattr(torch, dt), device='meta') for k, shape, dt in layout['state_dict']}
    out = family_filter(model)(sd, model)
    result = model.load_state_dict(out, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def assert_loads_file(tmp_path, model_name: str, family: str, variant: str, container: str,
                      timm_layout: bool = False, input_size=(1, 3, 224, 224), **kwargs):
    """A file in the official layout and container loads through ``pretrained_cfg_overlay=dict(file=...)``.

    Every weight of the created model must equal the (remapped) tensor written to the file, so a
    silently skipped or mis-mapped key fails the test.
    """
    layout = load_layout(family, variant, timm_layout)
    sd = random_state_dict(layout, seed=1)
    path = tmp_path / f'{variant}_{container}.pth'
    torch.save(wrap(sd, container), path)
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    expected = family_filter(model)(dict(sd), model)
    got = model.state_dict()
    for k, v in got.items():
        assert k in expected, f'{k} not provided by the checkpoint'
        assert torch.equal(v, expected[k]), f'{k} differs from the file'
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(input_size))
    assert torch.isfinite(out).all()
    return model


def max_logit_diff_vs_timm(model_name: str, timm_name: str, sizes, batch: int = 1, **kwargs) -> dict:
    """Load timm's randomly initialised weights into ours; return max |delta logit| per input size."""
    torch.manual_seed(0)
    ref = timm.create_model(timm_name, **kwargs).eval()
    ours = timm.create_model(model_name, **kwargs).eval()
    ours.load_state_dict(family_filter(ours)(ref.state_dict(), ours), strict=True)
    diffs = {}
    with torch.no_grad():
        for size in sizes:
            x = torch.randn(batch, 3, *size)
            diffs[size] = (ours(x) - ref(x)).abs().max().item()
    return diffs
