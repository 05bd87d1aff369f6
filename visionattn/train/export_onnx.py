"""Export a visionattn model to ONNX and check it in onnxruntime.

    python tools/export_onnx.py MODEL [--checkpoint FILE] [--img 224 | --img H W] [--dynamic [batch|all]]
                                [--features] [--opset N] [--output model.onnx]

Exports the classifier, or with ``--features`` the ``features_only`` backbone (one output per stage,
as ``visionattn.Backbone`` returns them), traced at ``--img``. ``--dynamic`` (= ``all``) makes the
batch, height and width symbolic, ``--dynamic batch`` only the batch. ``--checkpoint`` is a
``tools/train.py`` checkpoint (its architecture, class count and model kwargs are used) or official /
timm weights for MODEL, read with ``weights_only=True``. The export is then run in onnxruntime (CPU) on
fresh random inputs (batches 1 and 3 and a second, non-square size for a dynamic export) and the max
|Δ| against PyTorch and both latencies are printed. Bad input is one ``ERROR:`` line and exit code 2.
"""
import argparse
import os

from .errors import ArgumentParser, UserInputError, run_command
from .checkpoint import read_weights
from .model import build_model, load_model_state, load_weights_file


def build_parser():
    ap = ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('model', help='visionattn model name, e.g. visionattn_nat_mini')
    ap.add_argument('--checkpoint', default=None, help='train.py, official or timm weights for MODEL')
    ap.add_argument('--img', type=int, nargs='+', default=[224], metavar='N',
                    help='traced input size: one side (square) or H W (default 224)')
    ap.add_argument('--dynamic', nargs='?', const='all', default=None, choices=('batch', 'all'),
                    help='symbolic axes: all (batch, height, width; the default of a bare --dynamic) or batch')
    ap.add_argument('--features', action='store_true', help='export the features_only backbone (one output per stage)')
    ap.add_argument('--opset', type=int, default=None, help='ONNX opset (default 18, the lowest the exporter supports)')
    ap.add_argument('--output', default=None, help='output file (default: MODEL.onnx, MODEL_features.onnx)')
    ap.add_argument('--threads', type=int, default=2, help='intra-op threads for the latency comparison')
    ap.add_argument('--repeats', type=int, default=10, help='timed runs per runtime (0: no timing)')
    return ap


def _image_size(values):
    if len(values) not in (1, 2) or min(values) < 1:
        raise UserInputError(f"--img {' '.join(map(str, values))}: expected one positive side or H W")
    return (values[0], values[0]) if len(values) == 1 else tuple(values)


def _size_kwargs(name, img_size, dynamic):
    """``img_size`` / ``dynamic_img_size`` for a hierarchical model whose learned encodings fix its input size
    (FLatten): built for the traced size, and resampling its encodings per input for a dynamic-size export."""
    import timm
    if not timm.models.get_pretrained_cfg_value(name, 'fixed_input_size'):
        return {}
    meta = timm.create_model(name, device='meta')
    if not hasattr(meta, 'stages') or not hasattr(meta, 'dynamic_img_size'):
        return {}
    return dict(img_size=img_size, dynamic_img_size=dynamic == 'all')


def _load_model(args, img_size):
    """The model to export (eval, CPU), with the checkpoint's weights when one is given."""
    import timm
    import visionattn
    if args.model not in visionattn.list_models():
        try:
            visionattn.create_model(args.model)  # raises the clear error (with close names) for a foreign name
        except ValueError as e:
            raise UserInputError(str(e)) from None
    kwargs = _size_kwargs(args.model, img_size, args.dynamic)
    if args.checkpoint is None:
        model = build_model(args.model, **kwargs)
    else:
        ckpt = read_weights(args.checkpoint, '--checkpoint')
        if isinstance(ckpt, dict) and 'epoch_complete' in ckpt:  # a tools/train.py checkpoint
            if ckpt['arch'] != args.model:
                raise UserInputError(f"--checkpoint {args.checkpoint} is for model {ckpt['arch']}, not {args.model}")
            # the trained model's own settings (its img_size among them) win over the export size
            kwargs = {**kwargs, **ckpt['args'].get('model_kwargs', {})}
            model = build_model(args.model, num_classes=ckpt['num_classes'], **kwargs)
            load_model_state(model, ckpt['state_dict'], args.checkpoint, args.model)
        else:
            num_classes = timm.models.get_pretrained_cfg_value(args.model, 'num_classes') or 1000
            model = load_weights_file(args.model, args.checkpoint, num_classes, **kwargs)
    if not args.features:
        return model
    features = build_model(args.model, features_only=True, **kwargs)
    # timm's feature wrappers rename flattened modules ('stages.0' -> 'stages_0') or nest the model ('model.')
    weights = {key.replace('_', '.'): value for key, value in model.state_dict().items()}
    state = {}
    for key in features.state_dict():
        source = key.removeprefix('model.').replace('_', '.')
        if source not in weights:
            raise UserInputError(f"{args.model}: the features_only model has {key!r}, which the classifier lacks")
        state[key] = weights[source]
    features.load_state_dict(state)
    return features


def export(args):
    """Export and check; returns (output path, check results). Raises UserInputError for bad input."""
    from ..deploy import DEFAULT_OPSET, check_onnx, export_onnx
    img_size = _image_size(args.img)
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    if opset < DEFAULT_OPSET:
        raise UserInputError(f"--opset {opset}: the torch.export-based ONNX exporter needs opset >= {DEFAULT_OPSET}")
    if args.threads < 1 or args.repeats < 0:
        raise UserInputError(f"--threads {args.threads} / --repeats {args.repeats}: expected >= 1 / >= 0")
    model = _load_model(args, img_size)
    output = args.output or f"{args.model}{'_features' if args.features else ''}.onnx"
    if args.checkpoint and os.path.abspath(output) == os.path.abspath(args.checkpoint):
        raise UserInputError(f"--output {output} would overwrite the checkpoint")
    try:
        export_onnx(model, output, img_size, dynamic=args.dynamic, opset=opset)
    except ValueError as e:
        raise UserInputError(str(e)) from None
    results = check_onnx(model, output, img_size, dynamic=args.dynamic, batch_sizes=(1, 3) if args.dynamic else (1,),
                         repeats=args.repeats, threads=args.threads)
    print(f'wrote {output} ({os.path.getsize(output) / 2**20:.1f} MiB, opset {opset}, dynamic={args.dynamic})')
    for row in results:
        line = f"onnxruntime batch {row['batch']} {row['size'][0]}x{row['size'][1]}: max |diff| " + \
               ' '.join(f'{d:.2e}' for d in row['max_abs_diff'])
        if 'onnx_ms' in row:
            line += (f"; latency onnxruntime {row['onnx_ms']:.1f} ms, PyTorch {row['torch_ms']:.1f} ms "
                     f"({row['torch_ms'] / row['onnx_ms']:.2f}x, {args.threads} threads)")
        print(line)
    return output, results


def main(argv=None) -> int:
    return run_command(build_parser(), export, argv)
