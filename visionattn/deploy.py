"""Deployment: ONNX export of a classifier or ``features_only`` backbone, checked in onnxruntime.

``export_onnx(model, path, ...)`` writes an ONNX file through PyTorch's ``torch.export``-based exporter
(opset 18 by default) and ``check_onnx(model, path, ...)`` runs it in onnxruntime (CPU) on fresh random
inputs of another batch (and, for a dynamic export, another non-square size), returning the max |Δ| per
output against eager PyTorch and the latency of both. Every visionattn model exports with its pure-PyTorch
paths (neighbourhood attention on the ``torch`` backend, whose index tables become graph constants).

Dynamic axes: ``dynamic='batch'`` makes the batch symbolic; ``dynamic='all'`` also height and width.
A model whose graph fixes the spatial size (its Python code specialises on it) cannot give a
dynamic-size graph: ``export_onnx`` then raises ``ValueError`` naming the model and the option, instead of
writing a file that would silently reject or mis-handle other sizes.
"""
import re
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ['export_program', 'export_onnx', 'check_onnx', 'architecture', 'smallest_per_architecture', 'DYNAMIC_CHOICES']

DYNAMIC_CHOICES = (None, 'batch', 'all')
DEFAULT_OPSET = 18
DYNAMIC_TOLERANCE = 1e-3  # max |diff| at the probe input beyond which a dynamic graph is rejected


_SIZE_TOKEN = re.compile(r'_(tiny|mini|small|medium|base|large|huge|giant|\d+x\d+|\d+)(?=_|$)')


def architecture(name: str) -> str:
    """A model name without its size / resolution tokens and digits: ``visionattn_dinat_s_tiny`` -> ``dinat_s``,
    ``visionattn_resnet18_cbam`` -> ``resnet_cbam``, ``visionattn_twins_svt_small`` -> ``twins_svt``."""
    return re.sub(r'\d+', '', _SIZE_TOKEN.sub('', name.removeprefix('visionattn_')))


def smallest_per_architecture() -> List[str]:
    """The registered visionattn model with the fewest parameters of every :func:`architecture`, sorted."""
    import timm
    import visionattn

    def params(name):
        return sum(p.numel() for p in timm.create_model(name, device='meta').parameters())
    groups = {}
    for name in visionattn.list_models():
        groups.setdefault(architecture(name), []).append(name)
    return sorted(min(names, key=params) for names in groups.values())


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or getattr(getattr(model, 'model', None), 'pretrained_cfg', None)
    return (cfg or {}).get('architecture') or type(model).__name__


def _outputs(out) -> List[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _example(batch: int, img_size: Tuple[int, int], in_chans: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, in_chans, *img_size, generator=torch.Generator().manual_seed(seed))


def _dynamic_shapes(dynamic: Optional[str]):
    if not dynamic:
        return None
    dims = {0: torch.export.Dim.AUTO}
    if dynamic == 'all':
        dims.update({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO})
    return {'x': dims}


def _validate(dynamic, opset=DEFAULT_OPSET):
    if dynamic not in DYNAMIC_CHOICES:
        raise ValueError(f"dynamic={dynamic!r}: expected one of {DYNAMIC_CHOICES}")
    if not (isinstance(opset, int) and opset >= DEFAULT_OPSET):
        raise ValueError(f"opset={opset!r}: the torch.export-based ONNX exporter needs opset >= {DEFAULT_OPSET}")


def export_program(model: nn.Module, img_size: Tuple[int, int] = (224, 224), dynamic: Optional[str] = None,
                   in_chans: int = 3) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` (put in eval mode) on an input ``x`` [B, in_chans, H, W].

    ``img_size`` (H, W) is the traced size; ``dynamic`` as for :func:`export_onnx` (batch 1 when fixed).
    The program's ``module()`` computes what eager ``model`` does (for AOTInductor / ExecuTorch).
    """
    _validate(dynamic)
    model = model.eval()
    # batch 2 for a dynamic batch: torch.export specialises sizes 0 and 1
    x = _example(2 if dynamic else 1, img_size, in_chans, seed=0)
    with torch.no_grad():
        return torch.export.export(model, (x,), dynamic_shapes=_dynamic_shapes(dynamic))


def export_onnx(model: nn.Module, path: str, img_size: Tuple[int, int] = (224, 224), dynamic: Optional[str] = None,
                opset: int = DEFAULT_OPSET, in_chans: int = 3,
                program: Optional[torch.export.ExportedProgram] = None, optimize: bool = True) -> str:
    """Export ``model`` (eval mode, on CPU) to ONNX at ``path``; input ``x`` [B, in_chans, H, W].

    ``img_size`` (H, W) is the traced size. ``dynamic``: None (fixed batch 1 and size), ``'batch'`` or
    ``'all'`` (batch, height and width). Outputs are named ``logits`` for a classifier and ``stage{i}``
    for a ``features_only`` model. ``program``: the :func:`export_program` of ``model`` with the same
    arguments, when the caller has it already (else it is traced here). ``optimize``: run the exporter's
    graph optimiser (constant folding, redundant-op removal; onnxruntime optimises again when it loads
    the file). Returns ``path``.
    """
    _validate(dynamic, opset)
    if program is None:
        program = export_program(model, img_size, dynamic, in_chans)
    n_out = len(program.graph_signature.user_outputs)
    names = ['logits'] if n_out == 1 and not hasattr(model, 'feature_info') else [f'stage{i}' for i in range(n_out)]
    torch.onnx.export(program, input_names=['x'], output_names=names, opset_version=opset, dynamo=True,
                      external_data=False, verbose=False, optimize=optimize, f=path)
    if dynamic:
        _check_dynamic(model, path, img_size, dynamic, in_chans, list(_dynamic_shapes(dynamic)['x']))
    return path


def _check_dynamic(model, path, img_size, dynamic, in_chans, axes):
    """Raise ValueError unless the graph has symbolic ``axes`` and reproduces eager PyTorch at a probe
    batch (3) and, for ``'all'``, a probe size: a forward that specialises on the traced size (Python
    arithmetic on it kept as constants) gives a graph that fails or is wrong there."""
    import onnx
    graph_dims = onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    names = {0: 'batch', 2: 'height', 3: 'width'}
    fixed = [names[a] for a in axes if graph_dims[a].HasField('dim_value')]
    problem = f"its graph fixes the input {', '.join(fixed)}" if fixed else None
    if problem is None:
        try:
            rows = check_onnx(model, path, img_size, dynamic=dynamic, batch_sizes=(3,), in_chans=in_chans)
        except Exception as err:  # onnxruntime rejects the probe shape (a reshape to traced sizes)
            problem = f"the graph fails at another {'batch' if dynamic == 'batch' else 'size'} " \
                      f"({type(err).__name__}: {' '.join(str(err).split())[:200]})"
        else:
            worst = max(d for row in rows for d in row['max_abs_diff'])
            if not worst <= DYNAMIC_TOLERANCE:
                problem = f"the graph differs from PyTorch by {worst:.2e} at another size"
    if problem:
        raise ValueError(f"{_model_name(model)}: dynamic={dynamic!r} is not supported: {problem}, because the "
                         f"forward specialises on the traced input {img_size}; export with a fixed size"
                         + (" or dynamic='batch'" if dynamic == 'all' else ''))


def _interleaved_median_ms(fns, repeats: int) -> List[float]:
    """Median wall time (ms) of each callable, one warm-up call each, then ``repeats`` interleaved rounds."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            fn()
            record.append(time.perf_counter() - start)
    return [1e3 * sorted(t)[len(t) // 2] for t in times]


def check_onnx(model: nn.Module, path: str, img_size: Tuple[int, int] = (224, 224), dynamic: Optional[str] = None,
               batch_sizes: Sequence[int] = (1,), check_size: Optional[Tuple[int, int]] = None, in_chans: int = 3,
               repeats: int = 0, threads: Optional[int] = None) -> List[Dict]:
    """Run the ONNX file in onnxruntime (CPU) against eager ``model`` on fresh random inputs.

    Checks every batch size in ``batch_sizes`` (a fixed export only accepts its traced batch 1) at
    ``img_size``, and for ``dynamic='all'`` also at ``check_size`` (default: a non-square size 32 px
    larger in height and 64 px in width). Returns one dict per input: ``batch``, ``size``,
    ``max_abs_diff`` (list, per output) and, when ``repeats`` > 0, ``onnx_ms`` / ``torch_ms`` (median
    latency over ``repeats`` interleaved rounds; ``threads`` sets both runtimes' intra-op threads).
    """
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    sizes = [tuple(img_size)]
    if dynamic == 'all':
        sizes.append(tuple(check_size) if check_size else (img_size[0] + 32, img_size[1] + 64))
    model = model.eval()
    results = []
    for seed, (batch, size) in enumerate((b, s) for s in sizes for b in batch_sizes):
        x = _example(batch, size, in_chans, seed=seed + 1)
        feed = {'x': x.numpy()}
        with torch.no_grad():
            expected = _outputs(model(x))
        got = session.run(None, feed)
        if len(got) != len(expected):
            raise RuntimeError(f"{path}: onnxruntime returned {len(got)} outputs, PyTorch {len(expected)}")
        row = dict(batch=batch, size=size, max_abs_diff=[
            float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected)])
        if repeats:
            previous = torch.get_num_threads()
            if threads:
                torch.set_num_threads(threads)
            try:
                with torch.no_grad():
                    row['torch_ms'], row['onnx_ms'] = _interleaved_median_ms(
                        [lambda: model(x), lambda: session.run(None, feed)], repeats)
            finally:
                torch.set_num_threads(previous)
        results.append(row)
    return results
