"""Export backbone weights for dense prediction.

    python tools/export.py CKPT [--model NAME] [--format safetensors|mmdet|mmdet-resnet|both] [--ema] [-o OUT]

CKPT is a ``tools/train.py`` checkpoint (``{'arch', 'state_dict', 'state_dict_ema', ...}``), an
official or timm classification checkpoint (any container the family's ``checkpoint_filter_fn``
accepts), or a previous export. ``--model`` defaults to the checkpoint's ``arch`` when that names a
visionattn model (a train checkpoint's, or an official one such as DaViT's ``'DaViT_tiny'``);
a train checkpoint's recorded ``model_kwargs`` (a narrowed model) are used, ``--model-kwargs k=v``
overrides them.

The classifier is dropped; with ``--ema`` the EMA weights are exported. Outputs:

* ``safetensors``: ``OUT.safetensors``, the classification model without its classifier, in
  visionattn's layout (``stem.…``, ``stages.…``, final / head norm kept): loadable by
  ``visionattn.Backbone``'s ``init_cfg`` and by ``timm.create_model(NAME, num_classes=0,
  pretrained=True, pretrained_cfg_overlay=dict(file=...))``;
* ``mmdet``: ``OUT_mmdet.pth`` = ``{'state_dict': {'backbone.model.<key>': ...}, 'meta': ...}``
  with exactly the keys a ``visionattn.Backbone`` uses (no final / head norm), the layout of a
  detector with that backbone (use as ``load_from``, or as the backbone's ``init_cfg`` checkpoint);
* ``mmdet-resnet`` (CBAM / Triplet / ELA bottleneck ResNets only): ``OUT_mmdet_resnet.pth`` =
  ``{'state_dict': {<key>: ...}, 'meta': ...}`` in mmdet's own ``ResNet`` layout with the
  ``visionattn.CBAM`` / ``TripletAttention`` / ``ELA`` plugins (``conv1.weight``, ``layerN.M.cbam.…``, as a
  torchvision backbone checkpoint): the backbone's ``init_cfg=dict(type='Pretrained', checkpoint=...)``
  (``tools/det_train.py --pretrained``).

Prints a coverage report (tensors / values per group). An unreadable file, an unknown
architecture, a checkpoint of another architecture or a missing backbone key is one ``ERROR:``
line and exit code 2. Files are read with ``torch.load(weights_only=True)`` or safetensors.
"""
import argparse
import difflib
import importlib
import os
import sys
import types
from pathlib import Path

import torch

from .checkpoint import atomic_save, atomic_write, read_weights
from .errors import ArgumentParser, ParseKwargs, UserInputError, run_command


def _convert_module():
    """``visionattn.det.convert``; without mmdet installed (``visionattn.det`` needs it) the same
    files are loaded as a private package, so exporting needs no detection stack."""
    try:
        from ..det import convert
        return convert
    except ImportError:
        pkg = types.ModuleType('_visionattn_det_export')
        pkg.__path__ = [str(Path(__file__).resolve().parents[1] / 'det')]
        sys.modules[pkg.__name__] = pkg
        return importlib.import_module(pkg.__name__ + '.convert')


def registered_name(name):
    """The visionattn model a name refers to, or None: the ``visionattn_`` prefix is optional, a pretrained tag
    (``.msft_in1k``) is dropped and case is ignored (official checkpoints record e.g. ``arch='DaViT_tiny'``)."""
    import visionattn
    base = name.split('.')[0]
    base = base if base.lower().startswith('visionattn_') else f'visionattn_{base}'
    return {n.lower(): n for n in visionattn.list_models()}.get(base.lower())


def resolve_model(ckpt, requested, source):
    """(model name, recorded model kwargs) of an export from ``--model`` and what the checkpoint records."""
    import visionattn
    recorded = ckpt.get('arch') if isinstance(ckpt, dict) and isinstance(ckpt.get('arch'), str) else None
    recorded_name = registered_name(recorded) if recorded else None
    if requested:
        model_name = registered_name(requested)
        if model_name is None:
            close = difflib.get_close_matches(f'visionattn_{requested.removeprefix("visionattn_")}',
                                              visionattn.list_models(), n=3)
            raise UserInputError(f"--model {requested!r}: unknown architecture (not a visionattn model)"
                                 + (f"; did you mean {', '.join(close)}?" if close else ''))
        if recorded_name and recorded_name != model_name:
            raise UserInputError(f"{source} was trained as {recorded!r}, not {model_name!r}")
    elif recorded_name:
        model_name = recorded_name
    else:
        what = f"architecture {recorded!r}, which is not a visionattn model" if recorded else 'no architecture'
        raise UserInputError(f"{source} records {what}: pass --model NAME")
    train_args = ckpt.get('args') if isinstance(ckpt, dict) else None
    kwargs = train_args.get('model_kwargs') if isinstance(train_args, dict) else None
    return model_name, dict(kwargs) if isinstance(kwargs, dict) else {}


def build_parser():
    ap = ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('checkpoint', help='train.py / official / timm checkpoint, or an export')
    ap.add_argument('--model', default=None, help="visionattn model name (default: the checkpoint's 'arch')")
    ap.add_argument('--format', choices=('safetensors', 'mmdet', 'mmdet-resnet', 'both'), default='both')
    ap.add_argument('--ema', action='store_true', help="export 'state_dict_ema' instead of 'state_dict'")
    ap.add_argument('-o', '--output', default=None,
                    help='output path without extension (default: next to CKPT, <stem>_backbone)')
    ap.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                    help="architecture kwargs k=v (as tools/train.py), e.g. depths='(1, 1, 2, 1)'; default: what "
                         "a train checkpoint records")
    return ap


def export(args):
    """Read, map and write; returns the written paths. Raises UserInputError for any problem with the input."""
    convert = _convert_module()
    ckpt = read_weights(args.checkpoint)
    model_name, model_kwargs = resolve_model(ckpt, args.model, args.checkpoint)
    model_kwargs.update(args.model_kwargs)
    try:
        full, sd, report, model = convert.export_state_dict(
            ckpt, model_name, ema=args.ema, model_kwargs=model_kwargs, source=args.checkpoint)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise UserInputError(' '.join(str(e).split())[:600]) from None
    print(report)
    if model_kwargs:
        print(f'model kwargs: {model_kwargs}')
    print(convert.coverage_report(sd, model))
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                      Path(args.checkpoint).name.split('.')[0] + '_backbone')
    paths = {'safetensors': [out + '.safetensors'], 'mmdet': [out + '_mmdet.pth'],
             'mmdet-resnet': [out + '_mmdet_resnet.pth']}
    paths['both'] = paths['safetensors'] + paths['mmdet']
    targets = paths[args.format]
    if any(os.path.abspath(p) == os.path.abspath(args.checkpoint) for p in targets):
        raise UserInputError(f"--output {out} would overwrite the input checkpoint {args.checkpoint}")
    meta = dict(arch=model_name, ema=bool(args.ema), source=os.path.abspath(args.checkpoint),
                model_kwargs=repr(model_kwargs))
    if args.format == 'mmdet-resnet':
        import timm
        from visionattn.models.cnn_attention import mmdet_resnet_state_dict
        try:
            resnet_sd = mmdet_resnet_state_dict(full, timm.create_model(model_name, device='meta', **model_kwargs))
        except ValueError as e:
            raise UserInputError(f'--format mmdet-resnet: {e}') from None
    for path in targets:
        if path.endswith('_mmdet_resnet.pth'):
            atomic_save({'state_dict': resnet_sd, 'meta': meta}, path)
        elif path.endswith('.safetensors'):
            from safetensors.torch import save_file
            atomic_write(path, lambda tmp: save_file(dict(full), tmp, metadata={k: str(v) for k, v in meta.items()}))
        else:
            atomic_save({'state_dict': {convert.WRAPPED_PREFIX.join(('backbone.', k)): v for k, v in sd.items()},
                         'meta': meta}, path)
        print(f'wrote {path}')
    return targets


def main(argv=None) -> int:
    return run_command(build_parser(), export, argv)
