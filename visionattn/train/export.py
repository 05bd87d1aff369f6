"""Export backbone weights for dense prediction.

    python tools/export.py CKPT [--model NAME] [--format safetensors|mmdet|both] [--ema] [-o OUT]

CKPT is a ``tools/train.py`` checkpoint (``{'arch', 'state_dict', 'state_dict_ema', ...}``), an
official or timm classification checkpoint (any container the family's ``checkpoint_filter_fn``
accepts), or a previous export. ``--model`` defaults to the train checkpoint's ``arch``.

The classifier is dropped; with ``--ema`` the EMA weights are exported. Outputs:

* ``safetensors``: ``OUT.safetensors``, the classification model without its classifier, in
  visionattn's layout (``stem.…``, ``stages.…``, final / head norm kept): loadable by
  ``visionattn.Backbone``'s ``init_cfg`` and by ``timm.create_model(NAME, num_classes=0,
  pretrained=True, pretrained_cfg_overlay=dict(file=...))``;
* ``mmdet``: ``OUT_mmdet.pth`` = ``{'state_dict': {'backbone.model.<key>': ...}, 'meta': ...}``
  with exactly the keys a ``visionattn.Backbone`` uses (no final / head norm), the layout of a
  detector with that backbone (use as ``load_from``, or as the backbone's ``init_cfg`` checkpoint).

Prints a coverage report (tensors / values per group); an unknown architecture, a checkpoint of
another architecture or a missing backbone key is an error (exit code 2).
"""
import argparse
import importlib
import os
import sys
import types
from pathlib import Path

import torch


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('checkpoint', help='train.py / official / timm checkpoint, or an export')
    ap.add_argument('--model', default=None, help="visionattn model name (default: the checkpoint's 'arch')")
    ap.add_argument('--format', choices=('safetensors', 'mmdet', 'both'), default='both')
    ap.add_argument('--ema', action='store_true', help="export 'state_dict_ema' instead of 'state_dict'")
    ap.add_argument('-o', '--output', default=None,
                    help='output path without extension (default: next to CKPT, <stem>_backbone)')
    ap.add_argument('--model-kwargs', default='{}',
                    help="architecture kwargs as a Python dict literal, e.g. \"{'depths': (1, 1, 2, 1)}\"")
    args = ap.parse_args(argv)

    import ast
    import visionattn
    convert = _convert_module()

    try:
        ckpt = convert.load_checkpoint_file(args.checkpoint)
        arch = ckpt.get('arch') if isinstance(ckpt, dict) and isinstance(ckpt.get('arch'), str) else None
        model_name = args.model or arch
        if model_name is None:
            raise ValueError(f'{args.checkpoint} records no architecture (no "arch" key): pass --model NAME')
        if not model_name.startswith('visionattn_'):
            model_name = 'visionattn_' + model_name
        model_name = model_name.split('.')[0]  # drop a pretrained tag (visionattn_davit_tiny.msft_in1k)
        if model_name not in visionattn.list_models():
            raise ValueError(f'unknown architecture {model_name!r}; registered: {visionattn.list_models()}')
        if arch and args.model and arch.split('.')[0].replace('visionattn_', '') != model_name.replace('visionattn_', ''):
            raise ValueError(f'{args.checkpoint} was trained as {arch!r}, not {model_name!r}')
        model_kwargs = ast.literal_eval(args.model_kwargs)
        full, sd, report, model = convert.export_state_dict(
            ckpt, model_name, ema=args.ema, model_kwargs=model_kwargs, source=args.checkpoint)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        print(f'export: error: {e}', file=sys.stderr)
        return 2

    print(report)
    print(convert.coverage_report(sd, model))
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                      Path(args.checkpoint).name.split('.')[0] + '_backbone')
    meta = dict(arch=model_name, ema=bool(args.ema), source=os.path.abspath(args.checkpoint),
                model_kwargs=repr(model_kwargs))
    written = []
    if args.format in ('safetensors', 'both'):
        from safetensors.torch import save_file
        path = out + '.safetensors'
        save_file(dict(full), path, metadata={k: str(v) for k, v in meta.items()})
        written.append(path)
    if args.format in ('mmdet', 'both'):
        path = out + '_mmdet.pth'
        torch.save({'state_dict': {convert.WRAPPED_PREFIX.join(('backbone.', k)): v for k, v in sd.items()},
                    'meta': meta}, path)
        written.append(path)
    for p in written:
        print(f'wrote {p}')
    return 0

