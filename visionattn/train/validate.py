"""Evaluate a checkpoint on an ImageFolder split, a ``path,label`` CSV or a timm dataset.

The checkpoint is either a tools/train.py checkpoint (model, classes and data config are read from it) or a plain
weights file, official or ours, given with ``--model`` (loaded through the model's checkpoint filter). Reports
top-1, top-5, loss and throughput; ``--confusion-matrix FILE.png`` and ``--results-file FILE.json`` save more.

    python tools/validate.py output/train/<run>/model_best.pth.tar --data-dir output/data/digits
    python tools/validate.py weights.pth --model visionattn_davit_tiny --data-dir /data/imagenet --split val
    python tools/validate.py --model visionattn_nat_tiny --pretrained --data-dir /data/imagenet --split val

``--pretrained`` evaluates the released weights that ``timm.create_model(MODEL, pretrained=True)`` downloads (the
official files, at the tag's official eval settings), so anyone with the data can check the cited accuracy.
"""
import argparse
import contextlib
import functools
import json
import logging
import sys
import time

import torch
import timm
from timm.data import resolve_data_config
from timm.utils import setup_default_logging

from .checkpoint import read_weights
from .data import AugmentedDataset, StrictImageDataset, build_eval_dataset, build_transform, create_loader
from .errors import ArgumentParser, ParseKwargs, UserInputError, error_message
from .model import (
    build_model, check_model_name, create_pretrained, evaluate, load_model_state, load_weights_file, weights_source)

_logger = logging.getLogger('validate')


def build_parser():
    p = ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flag = argparse.BooleanOptionalAction
    p.add_argument('checkpoint', nargs='?', default=None,
                   help='tools/train.py checkpoint, or a weights file together with --model')
    p.add_argument('--model', default=None, help='model name, or name.tag (required for plain weights files)')
    p.add_argument('--pretrained', action=flag, default=False,
                   help="evaluate --model's released weights (timm pretrained=True download) instead of a file")
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='create_model kwargs k=v for plain weights')
    p.add_argument('--num-classes', type=int, default=None, help="plain weights: classifier size (default: model's)")
    p.add_argument('--use-ema', action=flag, default=False, help='evaluate the EMA weights of a train.py checkpoint')
    p.add_argument('--data-dir', default=None, help='ImageFolder root (or split folder)')
    p.add_argument('--split', default='validation', help="split folder under --data-dir ('' = --data-dir itself)")
    p.add_argument('--val-csv', default=None, help='CSV with path,label columns')
    p.add_argument('--dataset', default=None, help='timm create_dataset name')
    p.add_argument('--skip-bad-images', action=flag, default=False)
    p.add_argument('--img-size', type=int, default=None)
    p.add_argument('--crop-pct', type=float, default=None)
    p.add_argument('--mean', type=float, nargs=3, default=None)
    p.add_argument('--std', type=float, nargs=3, default=None)
    p.add_argument('--interpolation', default=None)
    p.add_argument('-b', '--batch-size', type=int, default=128)
    p.add_argument('-j', '--workers', type=int, default=2)
    p.add_argument('--pin-mem', action=flag, default=False)
    p.add_argument('--amp', action=flag, default=False, help='bfloat16 on CPU, float16 on GPU')
    p.add_argument('--channels-last', action=flag, default=False)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--confusion-matrix', default=None, help='write a confusion-matrix PNG here')
    p.add_argument('--results-file', default=None, help='write the metrics as JSON here')
    return p


def load_model(args):
    """Return (model, data config, class names or None, architecture name)."""
    overrides = dict(img_size=args.img_size or args.model_kwargs.get('img_size'), crop_pct=args.crop_pct,
                     mean=args.mean, std=args.std, interpolation=args.interpolation)
    if args.pretrained:
        if args.checkpoint:
            raise UserInputError(f"give a checkpoint ({args.checkpoint}) or --pretrained, not both")
        if not args.model:
            raise UserInputError("--pretrained needs --model NAME (the weights of NAME's default or given tag)")
        model = create_pretrained(args.model, **args.model_kwargs)
        return model, resolve_data_config(overrides, model=model), None, args.model
    if not args.checkpoint:
        raise UserInputError("give a checkpoint file, or --model NAME --pretrained")
    ckpt = read_weights(args.checkpoint)
    if isinstance(ckpt, dict) and 'epoch_complete' in ckpt:  # a tools/train.py checkpoint
        arch = ckpt['arch']
        if args.model and args.model != arch:
            raise UserInputError(f"checkpoint {args.checkpoint} is for model {arch}, not --model {args.model}")
        check_model_name(arch)
        model = build_model(arch, num_classes=ckpt['num_classes'], **ckpt['args'].get('model_kwargs', {}))
        key = 'state_dict_ema' if args.use_ema else 'state_dict'
        if key not in ckpt:
            raise UserInputError(f"checkpoint {args.checkpoint} has no EMA weights (trained without --model-ema)")
        load_model_state(model, ckpt[key], args.checkpoint, arch)
        return model, resolve_data_config(overrides, pretrained_cfg=ckpt['data_config']), ckpt['class_names'], arch
    if not args.model:
        raise UserInputError(f"{args.checkpoint} is not a tools/train.py checkpoint; give --model for plain weights")
    check_model_name(args.model)
    num_classes = args.num_classes or timm.models.get_pretrained_cfg_value(args.model, 'num_classes') or 1000
    model = load_weights_file(args.model, args.checkpoint, num_classes, **args.model_kwargs)
    return model, resolve_data_config(overrides, model=model), None, args.model


def plot_confusion(targets, predictions, class_names, path):
    """Confusion matrix (rows: true class, columns: prediction) as a PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix
    labels = list(range(len(class_names)))
    matrix = confusion_matrix(targets, predictions, labels=labels)
    size = min(4 + 0.4 * len(labels), 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap='Blues')
    if len(labels) <= 30:
        ax.set_xticks(labels, class_names, rotation=90)
        ax.set_yticks(labels, class_names)
        for i in labels:
            for j in labels:
                if matrix[i, j]:
                    ax.text(j, i, matrix[i, j], ha='center', va='center',
                            color='white' if matrix[i, j] > matrix.max() / 2 else 'black', fontsize=8)
    ax.set(xlabel='predicted', ylabel='true', title='confusion matrix')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def validate(args):
    """Evaluate and report; returns the metrics dict."""
    device = torch.device(args.device)
    model, data_config, class_names, arch = load_model(args)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    dataset, class_names = build_eval_dataset(args, class_names)
    if isinstance(dataset, StrictImageDataset):
        dataset.check_images(args.skip_bad_images, max(1, args.workers))
    if class_names and len(class_names) > model.num_classes:
        raise UserInputError(f"the data has {len(class_names)} classes but the model predicts {model.num_classes}")
    loader = create_loader(AugmentedDataset(dataset, build_transform(data_config)), args.batch_size, False, args)
    autocast = contextlib.nullcontext
    if args.amp:
        autocast = functools.partial(torch.autocast, device_type=device.type,
                                     dtype=torch.bfloat16 if device.type == 'cpu' else torch.float16)
    start = time.time()
    metrics, predictions, targets = evaluate(model, loader, device, autocast, args.channels_last, collect=True)
    elapsed = time.time() - start
    metrics.update(model=arch, checkpoint=args.checkpoint or weights_source(model.pretrained_cfg),
                   img_size=data_config['input_size'][-1], img_per_sec=metrics['count'] / elapsed)
    _logger.info(f"{arch} on {metrics['count']} images: top-1 {metrics['top1']:.2f}%  "
                 f"top-{metrics['k']} {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  {metrics['img_per_sec']:.1f} img/s")
    if args.confusion_matrix:
        names = class_names or [str(i) for i in range(model.num_classes)]
        plot_confusion(targets.numpy(), predictions.numpy(), names, args.confusion_matrix)
    if args.results_file:
        with open(args.results_file, 'w') as f:
            json.dump(metrics, f, indent=2)
    return metrics


def main(argv=None):
    setup_default_logging()
    try:
        validate(build_parser().parse_args(argv))
    except UserInputError as e:
        _logger.error(error_message(e))
        sys.exit(2)

