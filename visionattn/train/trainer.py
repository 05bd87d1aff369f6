"""Fine-tune a visionattn_* (or any timm) image classifier.

``python tools/train.py`` with no data arguments runs the embedded default job (``DEFAULT_JOB`` below, identical to
``configs/cls/digits_default.yaml``): scikit-learn's digits written once as an ImageFolder tree under
``output/data/digits``; a reduced ``visionattn_davit_tiny`` (6.0M params) at 32 px reaches ~98 % top-1 in 8 epochs,
about 1.5-2.5 minutes on 2 CPU cores.

Other data: ``--data-dir ROOT`` (ImageFolder with ``train/`` and ``val/``), ``--train-csv/--val-csv`` (``path,label``
columns, paths relative to the CSV), or ``--dataset NAME`` (timm ``create_dataset`` names such as ``torch/cifar10``).
Settings come from, lowest to highest priority: argparse defaults, ``-c config.yaml`` (keys are the argument names
with underscores), the resumed checkpoint's args, the command line. Multi-process/multi-node training:
``torchrun --nproc_per_node=N tools/train.py ...`` (NCCL on GPUs, gloo on CPU).

Outputs in ``<output>/<experiment>/``: ``args.yaml``, ``summary.csv``, ``curves.png``, ``log.txt``,
``last.pth.tar``, ``model_best.pth.tar``, ``checkpoint-<epoch>.pth.tar`` (best ``--checkpoint-hist``) and, with
``--recovery-interval N``, mid-epoch ``recovery-<epoch>-<batch>.pth.tar``. All are written atomically and load with
``torch.load(weights_only=True)``. ``--resume FILE`` continues exactly from that file (an unreadable file is an error);
``--resume FOLDER`` continues from the folder's most advanced readable checkpoint, reporting any it had to skip.

Determinism: augmentation is seeded per sample from (seed, epoch, index) and the batch order from (seed, epoch), so
the same seed and data give the same first-epoch loss regardless of ``--workers``, and a resumed run continues the
uninterrupted one, on the same device type, process count and torch thread count. On GPUs add ``--deterministic``.
"""
import argparse
import contextlib
import csv
import difflib
import functools
import gc
import logging
import math
import os
import signal
import sys
import threading
import time
from datetime import datetime

import torch
import torch.distributed as dist
import yaml
from timm.data import Mixup, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import get_pretrained_cfg_value, safe_model_name
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import (AverageMeter, ModelEmaV3, NativeScaler, dispatch_clip_grad, distribute_bn,
                        get_state_dict, init_distributed_device, random_seed, reduce_tensor, setup_default_logging,
                        unwrap_model)

from .checkpoint import (AtomicCheckpointSaver, find_resume_checkpoint, load_scheduler_state, progress, rng_state,
                         scheduler_state, set_rng_state)
from .data import AugmentedDataset, StrictImageDataset, build_datasets, build_transform, create_loader
from .errors import ArgumentParser, ParseKwargs, UserInputError, error_message
from .model import check_model_name, create_model, evaluate, load_model_state
from .progress import DEFAULT_INTERVAL, Progress

_logger = logging.getLogger('train')

DEFAULT_JOB = {
    'dataset': 'digits',
    'data_dir': 'output/data/digits',
    'model': 'visionattn_davit_tiny',
    'model_kwargs': {'embed_dims': [48, 96, 192, 384], 'num_heads': [2, 4, 8, 16], 'depths': [1, 1, 2, 1]},
    'img_size': 32,
    'crop_pct': 1.0,
    'train_aug': [
        {'RandomResizedCrop': {'scale': [0.7, 1.0], 'ratio': [0.8, 1.25]}},
        {'Affine': {'rotate': [-12, 12], 'shear': [-8, 8], 'p': 0.7}},
        {'ColorJitter': {'brightness': 0.3, 'contrast': 0.3, 'saturation': 0.0, 'hue': 0.0, 'p': 0.5}},
        {'CoarseDropout': {'num_holes_range': [1, 2], 'hole_height_range': [0.1, 0.25],
                           'hole_width_range': [0.1, 0.25], 'p': 0.3}},
    ],
    'epochs': 8,
    'batch_size': 64,
    'opt': 'adamw',
    'lr': 0.002,
    'weight_decay': 0.05,
    'sched': 'cosine',
    'sched_on_updates': True,
    'warmup_epochs': 1,
    'smoothing': 0.1,
    'workers': 1,
    'threads': 1,
    'checkpoint_hist': 2,
}
DATA_SOURCE_KEYS = ('data_dir', 'dataset', 'train_csv', 'val_csv')


def yaml_value(text):
    """A command-line value given as YAML; malformed YAML is an argument error."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not valid YAML: {' '.join(str(e).split())}") from None


def build_parser():
    """The argument parser; names follow timm's train.py where the meaning is the same."""
    p = ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flag = argparse.BooleanOptionalAction
    p.add_argument('-c', '--config', default='', help='YAML config file (keys = argument names with underscores)')
    g = p.add_argument_group('data')
    g.add_argument('--data-dir', default=None, help='ImageFolder root holding train/ and val/ class folders')
    g.add_argument('--dataset', default=None, help="timm create_dataset name (e.g. torch/cifar10), or 'digits'")
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='validation')
    g.add_argument('--train-csv', default=None, help='CSV with path,label columns for training')
    g.add_argument('--val-csv', default=None, help='CSV with path,label columns for evaluation')
    g.add_argument('--dataset-download', action=flag, default=False, help='let torch/ datasets download')
    g.add_argument('--skip-bad-images', action=flag, default=False,
                   help='skip (and count) the images that the up-front check finds unreadable instead of failing on them')
    g.add_argument('-j', '--workers', type=int, default=4, help='data loading worker processes')
    g.add_argument('--pin-mem', action=flag, default=False)
    g = p.add_argument_group('model')
    g.add_argument('--model', default=DEFAULT_JOB['model'], help='visionattn_* or timm model name')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra create_model kwargs k=v')
    g.add_argument('--pretrained-path', default=None,
                   help="weights file (its EMA weights if it has them) loaded through the model's checkpoint "
                        "filter; the classifier is re-initialised")
    g.add_argument('--num-classes', type=int, default=None, help='default: number of classes in the data')
    g.add_argument('--img-size', type=int, default=None, help="default: the model's pretrained_cfg input size")
    g.add_argument('--crop-pct', type=float, default=None, help='eval resize = img_size / crop_pct, then center crop')
    g.add_argument('--mean', type=float, nargs=3, default=None)
    g.add_argument('--std', type=float, nargs=3, default=None)
    g.add_argument('--interpolation', default=None, choices=['nearest', 'bilinear', 'bicubic', 'area', 'lanczos'])
    g.add_argument('--drop', type=float, default=0.0, help='dropout rate')
    g.add_argument('--drop-path', type=float, default=None, help='stochastic depth rate')
    g.add_argument('--grad-checkpointing', action=flag, default=False)
    g.add_argument('--channels-last', action=flag, default=False)
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None, help='torch.compile backend')
    g = p.add_argument_group('augmentation and regularisation')
    g.add_argument('--train-aug', type=yaml_value, default=[
        {'RandomResizedCrop': {'scale': [0.08, 1.0]}}, {'HorizontalFlip': {'p': 0.5}},
        {'ColorJitter': {'brightness': 0.4, 'contrast': 0.4, 'saturation': 0.4, 'hue': 0.0}}],
        help="albumentations pipeline as YAML, e.g. \"[{HorizontalFlip: {p: 0.5}}, CoarseDropout]\"; size and "
             "interpolation are filled in from the data config")
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (0 = off)')
    g.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (0 = off)')
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', default='batch', choices=['batch', 'pair', 'elem'])
    g.add_argument('--mixup-off-epoch', type=int, default=0, help='turn mixup/cutmix off from this epoch (0 = never)')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--model-ema', action=flag, default=False, help='keep and evaluate an EMA of the weights')
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g.add_argument('--model-ema-warmup', action=flag, default=True)
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, default=30)
    g.add_argument('-b', '--batch-size', type=int, default=64, help='per-process batch size')
    g.add_argument('--validation-batch-size', type=int, default=None)
    g.add_argument('--opt', default='adamw', help='timm optimizer name')
    g.add_argument('--lr', type=float, default=1e-3)
    g.add_argument('--weight-decay', type=float, default=0.05)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--layer-decay', type=float, default=None,
                   help="layer-wise lr decay (through the model's group_matcher)")
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--clip-mode', default='norm', choices=['norm', 'value', 'agc'])
    g.add_argument('--grad-accum-steps', type=int, default=1)
    g.add_argument('--sched', default='cosine', help='timm scheduler name')
    g.add_argument('--sched-on-updates', action=flag, default=False, help='step the schedule per update, not per epoch')
    g.add_argument('--warmup-epochs', type=int, default=1)
    g.add_argument('--warmup-lr', type=float, default=1e-5)
    g.add_argument('--min-lr', type=float, default=1e-6)
    g.add_argument('--amp', action=flag, default=False, help='mixed precision (see --amp-dtype)')
    g.add_argument('--amp-dtype', default='auto', choices=['auto', 'float16', 'bfloat16'],
                   help='auto = bfloat16 on CPU, float16 (with loss scaling) on GPU')
    g = p.add_argument_group('run')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--deterministic', action=flag, default=False, help='deterministic kernels (GPU)')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g.add_argument('--threads', type=int, default=None, help='torch CPU threads per process (default: torch\'s)')
    g.add_argument('--dist-bn', default='reduce', choices=['reduce', 'broadcast', ''],
                   help='sync BatchNorm statistics across processes after each epoch')
    g.add_argument('--output', default=None, help='parent folder of experiment folders (default output/train)')
    g.add_argument('--experiment', default=None, help='experiment folder name (default <time>-<model>-<size>)')
    g.add_argument('--checkpoint-hist', type=int, default=3, help='number of best epoch checkpoints kept')
    g.add_argument('--recovery-interval', type=int, default=0, help='write a recovery checkpoint every N batches')
    g.add_argument('--eval-metric', default='top1', choices=['top1', 'top5', 'loss'],
                   help='top5 is top-k with k = min(5, classes)')
    g.add_argument('--progress-interval', type=float, default=DEFAULT_INTERVAL,
                   help='seconds between progress lines when the output is not a terminal (a bar on a terminal)')
    g.add_argument('--resume', default='', help='checkpoint file, or run folder (newest readable checkpoint)')
    return p


def setting_names(parser):
    """Argument names that make up a run's settings (what config files, args.yaml and checkpoints hold)."""
    return {a.dest for a in parser._actions} - {'help', 'config', 'resume'}


def config_value(action, value):
    """A config file's value for one argument, checked (and converted) as argparse would check it on the command
    line; raises ValueError saying what was expected."""
    def one(v):
        if action.type in (int, float):
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise ValueError(f"expected {'an integer' if action.type is int else 'a number'}")
            try:
                v = action.type(v)  # YAML reads 1e-3 (no dot) as a string
            except ValueError:
                raise ValueError(f"expected {'an integer' if action.type is int else 'a number'}") from None
        elif action.type is None and v is not None and not isinstance(v, str):
            raise ValueError('expected a string')
        if action.choices is not None and v not in action.choices:
            raise ValueError(f"expected one of {list(action.choices)}")
        return v
    if value is None:
        return value
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ValueError('expected true or false')
        return value
    if isinstance(action, ParseKwargs):
        if not isinstance(value, dict):
            raise ValueError('expected a mapping of keyword arguments')
        return value
    if action.type is yaml_value:  # structured value (e.g. train_aug), checked where it is used
        return value
    if isinstance(action.nargs, int) or action.nargs in ('*', '+'):
        if not isinstance(value, list) or (isinstance(action.nargs, int) and len(value) != action.nargs):
            raise ValueError(f"expected a list of {action.nargs if isinstance(action.nargs, int) else ''} values")
        return [one(v) for v in value]
    return one(value)


def load_config(path, parser):
    """Read a YAML config; an unreadable file, an unknown key or a value of the wrong type is an error naming it."""
    if not os.path.isfile(path):
        raise UserInputError(f"config file {path} does not exist")
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserInputError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict):
        raise UserInputError(f"config file {path} must hold a mapping of argument names to values")
    known = setting_names(parser)
    actions = {a.dest: a for a in parser._actions}
    checked = {}
    for key, value in config.items():
        key = str(key).replace('-', '_')
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {close}?" if close else ''
            raise UserInputError(f"unknown key '{key}' in config {path}{hint}")
        try:
            checked[key] = config_value(actions[key], value)
        except ValueError as e:
            raise UserInputError(f"config {path}: {key}: {value!r}: {e}") from None
    return checked


def parse_args(argv=None):
    """Resolve the settings; returns (args, resume checkpoint or None, its file or None)."""
    parser = build_parser()
    cli = parser.parse_args(argv)
    known = setting_names(parser)
    defaults = {}
    if cli.config:
        defaults.update(load_config(cli.config, parser))
    elif not cli.resume and all(getattr(cli, k) is None for k in DATA_SOURCE_KEYS):
        defaults.update(DEFAULT_JOB)
    ckpt = resume_file = None
    if cli.resume:
        ckpt, resume_file = find_resume_checkpoint(cli.resume)
        defaults.update({k: v for k, v in ckpt['args'].items() if k in known})
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if ckpt is not None and cli.output is None and cli.experiment is None:
        out_dir = os.path.dirname(os.path.abspath(resume_file))
        args.output, args.experiment = os.path.dirname(out_dir), os.path.basename(out_dir)
    args.output = args.output or 'output/train'
    return args, ckpt, resume_file


def plain(value):
    """Args/config values as YAML- and weights_only-friendly builtins."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM during training, after the recovery (or epoch) checkpoint to resume from was written."""

    def __init__(self, signum, out_dir):
        self.signum, self.out_dir = signum, out_dir
        super().__init__(f"{signal.Signals(signum).name}: stopped after writing a checkpoint in {out_dir}; "
                         f"continue with: python tools/train.py --resume {out_dir}")


class Trainer:
    """Holds one run's model, optimisation state and progress; the loops are ours, the pieces are timm's."""
    stop_signal = 0  # the signal that asked training to stop (see signals_checkpoint)

    def __init__(self, args, ckpt=None, resume_file=None):
        self.args = args
        self.device = init_distributed_device(args)
        self.distributed, self.rank, self.world_size = args.distributed, args.rank, args.world_size
        self.primary = self.rank == 0
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.deterministic:
            os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        random_seed(args.seed)  # identical model init on every rank (DDP also broadcasts it, the EMA copy does not)
        train_base, val_base = self._setup_data()
        model = self._setup_model(pretrained_path=None if ckpt else args.pretrained_path)
        random_seed(args.seed, self.rank)
        self._setup_loaders(train_base, val_base)
        self._setup_optimisation(model)

        self.epoch, self.batches_done, self.num_updates, self.epoch_complete = 0, 0, 0, False
        self.history, self.train_loss = [], AverageMeter()
        self._rng, self._loss_partial = [], (0.0, 0.0)  # filled by checkpoint() just before each save
        self.out_dir = self._output_dir(resuming=ckpt is not None)
        self.saver = AtomicCheckpointSaver(self.training_state, self.out_dir, args.checkpoint_hist,
                                           decreasing=args.eval_metric == 'loss')
        if ckpt is not None:
            self.restore(model, ckpt, resume_file)

        # evaluation bypasses DDP: ranks hold unequal eval shards, so DDP's per-forward buffer broadcast would hang
        self.eval_model = torch.compile(model, backend=args.torchcompile) if args.torchcompile else model
        if self.distributed:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device] if self.device.type == 'cuda' else None)
        if args.torchcompile:
            model = torch.compile(model, backend=args.torchcompile)
        self.model = model
        if self.primary:
            with open(os.path.join(self.out_dir, 'args.yaml'), 'w') as f:
                yaml.safe_dump(self.args_dict(), f, sort_keys=False)
            _logger.info(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
                         f"{args.num_classes} classes, input {self.data_config['input_size']}, "
                         f"{len(train_base)} train / {len(val_base)} val images, {self.world_size} process(es), "
                         f"output {self.out_dir}")

    def _setup_data(self):
        """Datasets (optionally without unreadable images) and the class count."""
        args = self.args
        train_base, val_base, self.class_names = build_datasets(args)
        for ds in (train_base, val_base):
            if isinstance(ds, StrictImageDataset):
                ds.check_images(args.skip_bad_images, max(1, args.workers))
            elif args.skip_bad_images:
                raise UserInputError("--skip-bad-images works with --data-dir and CSV data only")
        found = len(self.class_names) if self.class_names else None
        if args.num_classes is None and found is None:
            raise UserInputError("the dataset does not expose its classes; give --num-classes")
        if args.num_classes is not None and found is not None and args.num_classes != found:
            raise UserInputError(f"--num-classes {args.num_classes} but the data has {found} classes")
        args.num_classes = self.num_classes = args.num_classes or found
        return train_base, val_base

    def _setup_model(self, pretrained_path):
        """The model on its device, and the data config resolved from its pretrained_cfg."""
        args = self.args
        kwargs = {'drop_rate': args.drop, **({'drop_path_rate': args.drop_path} if args.drop_path else {})}
        check_model_name(args.model)
        if args.img_size and get_pretrained_cfg_value(args.model, 'fixed_input_size'):
            kwargs['img_size'] = args.img_size  # e.g. ViT-style position embeddings (resampled from pretrained)
        model = create_model(args.model, args.num_classes, pretrained_path, **{**kwargs, **args.model_kwargs})
        self.data_config = resolve_data_config(
            dict(img_size=args.img_size or args.model_kwargs.get('img_size'), crop_pct=args.crop_pct,
                 mean=args.mean, std=args.std, interpolation=args.interpolation), model=model)
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model.to(self.device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def _setup_loaders(self, train_base, val_base):
        args = self.args
        self.train_ds = AugmentedDataset(train_base, build_transform(self.data_config, args.train_aug), args.seed)
        val_ds = AugmentedDataset(val_base, build_transform(self.data_config), args.seed)
        self.train_loader = create_loader(self.train_ds, args.batch_size, True, args, args.seed, self.rank,
                                          self.world_size)
        self.val_loader = create_loader(val_ds, args.validation_batch_size or args.batch_size, False, args,
                                        args.seed, self.rank, self.world_size)
        self.batches_per_epoch = len(self.train_loader.sampler) // args.batch_size
        if self.batches_per_epoch == 0:
            raise UserInputError(f"--batch-size {args.batch_size} exceeds the {len(self.train_loader.sampler)} "
                                 f"training images per process")

    def _setup_optimisation(self, model):
        """Optimizer, schedule, AMP, EMA, mixup and loss."""
        args = self.args
        self.optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                             momentum=args.momentum, layer_decay=args.layer_decay)
        self.scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
            warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=not args.sched_on_updates,
            updates_per_epoch=math.ceil(self.batches_per_epoch / args.grad_accum_steps))
        self.autocast, self.scaler = contextlib.nullcontext, None
        if args.amp:
            amp_dtype = {'float16': torch.float16, 'bfloat16': torch.bfloat16}.get(
                args.amp_dtype, torch.bfloat16 if self.device.type == 'cpu' else torch.float16)
            self.autocast = functools.partial(torch.autocast, device_type=self.device.type, dtype=amp_dtype)
            if amp_dtype == torch.float16:
                self.scaler = NativeScaler(device=self.device.type)
        self.ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) \
            if args.model_ema else None
        self.mixup = None
        if args.mixup > 0 or args.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                               switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                               label_smoothing=args.smoothing, num_classes=args.num_classes)
            self.loss_fn = SoftTargetCrossEntropy()
        elif args.smoothing:
            self.loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
        else:
            self.loss_fn = torch.nn.CrossEntropyLoss()

    def args_dict(self):
        """The resolved settings as plain values (args.yaml, checkpoints)."""
        return {k: plain(v) for k, v in vars(self.args).items() if k in setting_names(build_parser())}

    def _output_dir(self, resuming):
        args = self.args
        if not args.experiment:
            stamp = datetime.now().strftime('%Y%m%d-%H%M%S')
            args.experiment = f"{stamp}-{safe_model_name(args.model)}-{self.data_config['input_size'][-1]}"
            if self.distributed:  # every rank must agree on the timestamped name
                names = [None] * self.world_size
                dist.all_gather_object(names, args.experiment)
                args.experiment = names[0]
        out_dir = os.path.join(args.output, args.experiment)
        if not resuming and os.path.isdir(out_dir) and any(n.endswith('.pth.tar') for n in os.listdir(out_dir)):
            raise UserInputError(f"{out_dir} already holds checkpoints; continue it with --resume {out_dir} "
                                 f"or choose another --experiment")
        if self.primary:
            os.makedirs(out_dir, exist_ok=True)
            handler = logging.FileHandler(os.path.join(out_dir, 'log.txt'))
            handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
            logging.getLogger().addHandler(handler)
        return out_dir

    def training_state(self):
        """Everything a resume needs, as weights_only-loadable values (called by the saver on rank 0)."""
        state = {
            'version': 1, 'arch': self.args.model, 'args': self.args_dict(), 'num_classes': self.num_classes,
            'class_names': self.class_names, 'data_config': plain(self.data_config),
            'epoch': self.epoch, 'batches_done': self.batches_done, 'epoch_complete': self.epoch_complete,
            'num_updates': self.num_updates, 'history': self.history, 'train_loss_partial': self._loss_partial,
            'rng': self._rng, 'state_dict': get_state_dict(self.model, unwrap_model),
            'optimizer': self.optimizer.state_dict(), 'scheduler': scheduler_state(self.scheduler),
        }
        if self.ema is not None:
            state['state_dict_ema'] = get_state_dict(self.ema, unwrap_model)
        if self.scaler is not None:
            state[self.scaler.state_dict_key] = self.scaler.state_dict()
        return state

    def restore(self, model, ckpt, file):
        """Load model, EMA, optimizer, scheduler, scaler, RNG, progress and history from a checkpoint."""
        if ckpt['arch'] != self.args.model:
            raise UserInputError(f"checkpoint {file} is for model {ckpt['arch']}, not --model {self.args.model}")
        load_model_state(model, ckpt['state_dict'], file, ckpt['arch'])
        if self.ema is not None:
            if 'state_dict_ema' in ckpt:
                load_model_state(self.ema.module, ckpt['state_dict_ema'], file, ckpt['arch'])
            else:
                _logger.warning(f"{file} has no EMA weights; the EMA restarts from the model weights")
                self.ema.set(model)
        self.optimizer.load_state_dict(ckpt['optimizer'])
        if self.scaler is not None and self.scaler.state_dict_key in ckpt:
            self.scaler.load_state_dict(ckpt[self.scaler.state_dict_key])
        self.epoch, self.batches_done = progress(ckpt)
        self.num_updates, self.history = ckpt['num_updates'], list(ckpt['history'])
        load_scheduler_state(self.scheduler, ckpt['scheduler'])
        if self.args.sched != 'plateau':  # re-derive the lr from the (possibly changed, e.g. --epochs) schedule
            self.scheduler.step(self.epoch)
            self.scheduler.step_update(self.num_updates)
        if len(ckpt['rng']) == self.world_size:
            set_rng_state(ckpt['rng'][self.rank])
        else:
            _logger.warning(f"{file} was written by {len(ckpt['rng'])} process(es), this run has {self.world_size}: "
                            f"random streams are re-seeded, results will differ from an uninterrupted run")
        if self.batches_done and self.primary:
            loss_sum, count = ckpt['train_loss_partial']
            self.train_loss.sum, self.train_loss.count = loss_sum, count
        if os.path.abspath(os.path.dirname(file)) == os.path.abspath(self.out_dir):
            self.saver.load_state_dict(ckpt['saver'])
        _logger.info(f"resumed from {file}: {self.epoch} epoch(s) + {self.batches_done} batch(es) done, "
                     f"{self.num_updates} update(s)")

    def checkpoint(self, metric=None):
        """Collect every rank's RNG state and the partial loss, then write (rank 0): recovery mid-epoch, else epoch."""
        self._rng = [rng_state()]
        sums = torch.tensor([self.train_loss.sum, self.train_loss.count], dtype=torch.float64)
        if self.distributed:
            self._rng = [None] * self.world_size
            dist.all_gather_object(self._rng, rng_state())
            sums = reduce_tensor(sums, 1)
        self._loss_partial = (sums[0].item(), sums[1].item())
        if not self.primary:
            return
        if self.epoch_complete:
            self.saver.save_checkpoint(self.epoch, metric)
            self.saver.remove_recovery_files()
        else:
            self.saver.save_recovery(self.epoch, self.batches_done)

    def lr(self):
        """Mean learning rate over the parameter groups (they differ under --layer-decay), as timm reports it."""
        return sum(g['lr'] for g in self.optimizer.param_groups) / len(self.optimizer.param_groups)

    def train_step(self, images, target, update):
        """Forward and backward of one batch; when ``update``, step the optimizer, EMA and schedule."""
        args, model, optimizer = self.args, self.model, self.optimizer
        accum = args.grad_accum_steps
        no_sync = model.no_sync if self.distributed and not update else contextlib.nullcontext
        with no_sync():
            with self.autocast():
                loss = self.loss_fn(model(images), target)
            if self.scaler is not None:
                self.scaler(loss / accum, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=model.parameters(), need_update=update)
            else:
                (loss / accum).backward()
                if update:
                    if args.clip_grad:
                        dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        if update:
            optimizer.zero_grad(set_to_none=True)
            self.num_updates += 1
            if self.ema is not None:
                self.ema.update(model, step=self.num_updates)
            self.scheduler.step_update(num_updates=self.num_updates)
        return loss.item()

    def train_epoch(self):
        """One epoch from ``self.batches_done``; recovery checkpoints every ``--recovery-interval`` batches."""
        args = self.args
        self.train_ds.epoch = self.epoch
        self.train_loader.sampler.set_epoch(self.epoch, self.batches_done * args.batch_size)
        if self.mixup is not None and args.mixup_off_epoch and self.epoch >= args.mixup_off_epoch:
            self.mixup.mixup_enabled = False
        self.model.train()
        with Progress(self.batches_per_epoch, f'epoch {self.epoch}', initial=self.batches_done,
                      enabled=self.primary, interval=args.progress_interval) as bar:
            for batch_idx, (images, target) in enumerate(self.train_loader, start=self.batches_done):
                images, target = images.to(self.device), target.to(self.device)
                if self.mixup is not None:
                    images, target = self.mixup(images, target)
                if args.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                update = (batch_idx + 1) % args.grad_accum_steps == 0 or batch_idx + 1 == self.batches_per_epoch
                self.train_loss.update(self.train_step(images, target, update), images.shape[0])
                self.batches_done = batch_idx + 1
                bar.update(loss=f'{self.train_loss.avg:.4f}', lr=f'{self.lr():.2e}')
                if update and self.batches_done < self.batches_per_epoch and self.stop_requested():
                    self.checkpoint()
                    raise TrainingInterrupted(self.stop_signal, self.out_dir)
                if (args.recovery_interval and update and self.batches_done % args.recovery_interval == 0
                        and self.batches_done < self.batches_per_epoch):
                    self.checkpoint()
        sums = torch.tensor([self.train_loss.sum, self.train_loss.count], dtype=torch.float64)
        if self.distributed:
            sums = reduce_tensor(sums, 1)
        return sums[0].item() / max(sums[1].item(), 1)

    def _on_signal(self, signum, frame):
        if self.stop_signal:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.stop_signal = signum
        if self.primary:
            _logger.warning(f"{signal.Signals(signum).name}: writing a checkpoint after this batch, then stopping "
                            f"(send it again to stop at once)")

    def stop_requested(self):
        """Whether a signal asked to stop (on any rank: the ranks agree, so they checkpoint at the same batch)."""
        if self.distributed:
            flag = torch.tensor([self.stop_signal], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.stop_signal = int(flag.item())
        return bool(self.stop_signal)

    @contextlib.contextmanager
    def signals_checkpoint(self):
        """Within: SIGINT and SIGTERM end training cleanly at the next batch, after a recovery checkpoint."""
        self.stop_signal = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def run(self):
        """Train the remaining epochs, evaluating, checkpointing and reporting after each; returns the last row.
        SIGINT / SIGTERM: a recovery checkpoint, then :class:`TrainingInterrupted`."""
        with self.signals_checkpoint():
            return self._run()

    def _run(self):
        args = self.args
        start = time.time()
        if self.epoch >= self.num_epochs:
            _logger.info(f"nothing to do: {self.epoch} of {self.num_epochs} epochs already trained")
        while self.epoch < self.num_epochs:
            epoch_start = time.time()
            train_loss = self.train_epoch()
            if self.distributed and args.dist_bn and any(
                    'running_mean' in name for name, _ in unwrap_model(self.model).named_buffers()):
                distribute_bn(self.model, self.world_size, args.dist_bn == 'reduce')
            row = {'epoch': self.epoch, 'train_loss': train_loss}
            eval_args = (self.val_loader, self.device, self.autocast, args.channels_last, self.distributed)
            eval_kw = dict(progress=self.primary, interval=args.progress_interval)
            row.update({f'eval_{k}': v for k, v in evaluate(self.eval_model, *eval_args, **eval_kw).items()
                        if k not in ('count', 'k')})
            metric = row[f'eval_{args.eval_metric}']
            if self.ema is not None:
                row.update({f'ema_eval_{k}': v for k, v in evaluate(self.ema.module, *eval_args, **eval_kw).items()
                            if k not in ('count', 'k')})
                metric = row[f'ema_eval_{args.eval_metric}']
            row['lr'] = self.lr()
            row['epoch_time'] = time.time() - epoch_start
            self.history.append(row)
            self.scheduler.step(self.epoch + 1, metric)
            self.epoch_complete = True
            self.checkpoint(metric)
            if self.primary:
                write_summary(self.history, os.path.join(self.out_dir, 'summary.csv'))
                plot_history(self.history, os.path.join(self.out_dir, 'curves.png'))
                _logger.info(' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in row.items()))
            self.epoch, self.batches_done, self.epoch_complete = self.epoch + 1, 0, False
            self.train_loss.reset()
            if self.epoch < self.num_epochs and self.stop_requested():  # the epoch checkpoint is the resume point
                raise TrainingInterrupted(self.stop_signal, self.out_dir)
        if self.primary and self.history:
            last = self.history[-1]
            _logger.info(f"done in {time.time() - start:.1f}s: val top-1 {last['eval_top1']:.2f}%, "
                         f"top-{min(5, self.num_classes)} {last['eval_top5']:.2f}%, loss {last['eval_loss']:.4f}; "
                         f"output in {self.out_dir}")
        return self.history[-1] if self.history else None


def write_summary(history, path):
    """Rewrite summary.csv from the full history (atomically), so it always matches the checkpoints."""
    fields = list(dict.fromkeys(k for row in history for k in row))
    tmp = f'{path}.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def plot_history(history, path):
    """Loss and accuracy curves per epoch as a PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    epochs = [row['epoch'] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (('train_loss', 'train'), ('eval_loss', 'val'), ('ema_eval_loss', 'val (EMA)')):
        if key in history[0]:
            ax_loss.plot(epochs, [row[key] for row in history], marker='o', label=label)
    for key, label in (('eval_top1', 'val top-1'), ('eval_top5', 'val top-5'), ('ema_eval_top1', 'val top-1 (EMA)')):
        if key in history[0]:
            ax_acc.plot(epochs, [row[key] for row in history], marker='o', label=label)
    ax_loss.set(xlabel='epoch', ylabel='loss', title='loss')
    ax_acc.set(xlabel='epoch', ylabel='accuracy (%)', title='accuracy')
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = f'{path}.tmp.png'
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None):
    setup_default_logging()
    try:
        args, ckpt, resume_file = parse_args(argv)
        trainer = Trainer(args, ckpt, resume_file)
        trainer.run()
        if dist.is_initialized():
            # DDP's reducer (kept by reference cycles of the model's hooks) and its pending gloo work go while the
            # group and the interpreter are alive, not in the interpreter's finalisation after the group is gone
            del trainer
            gc.collect()
            dist.barrier()  # rank 0 may still be writing files; tear the gloo/NCCL group down together
    except UserInputError as e:
        _logger.error(error_message(e))
        sys.exit(2)
    except TrainingInterrupted as e:
        _logger.warning(str(e))
        sys.exit(128 + e.signum)  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

