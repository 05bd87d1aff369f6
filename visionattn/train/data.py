"""Datasets, albumentations transforms and resumable loaders for training and validation."""
import csv
import inspect
import logging
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from timm.data import ImageDataset, create_dataset
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader import Reader
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.utils.misc import natural_key

from .errors import UserInputError
from .progress import DEFAULT_INTERVAL, Progress

_logger = logging.getLogger('train')

TRAIN_SPLIT_NAMES = ('train', 'training')
EVAL_SPLIT_NAMES = ('validation', 'val', 'valid', 'eval', 'evaluation', 'test')
CV2_INTERPOLATION = {'nearest': cv2.INTER_NEAREST, 'bilinear': cv2.INTER_LINEAR, 'bicubic': cv2.INTER_CUBIC,
                     'area': cv2.INTER_AREA, 'lanczos': cv2.INTER_LANCZOS4}


class ImageLoadError(UserInputError):
    """An image file that cannot be decoded."""


# ---------------------------------------------------------------------------------------------------------------
# built-in dataset: scikit-learn digits written out as an ImageFolder tree

def ensure_digits_folder(root):
    """Write sklearn's 1797 8x8 digits once as ``root/{train,val}/<digit>/<index>.png`` (80/20 stratified split).

    Idempotent and safe when several processes race: the tree is built in a private folder and renamed into place,
    so an existing folder without the ``.complete`` marker is never a partial export: it is the user's own data,
    left untouched and used as an ImageFolder root.
    """
    marker = os.path.join(root, '.complete')
    if os.path.exists(marker):
        return root
    if os.path.exists(root):
        _logger.info(f"{root} is not the built-in digits export: using it as an ImageFolder root (train/, val/)")
        return root
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    indices = np.arange(len(pixels))
    train_idx, val_idx = train_test_split(indices, test_size=0.2, stratify=digits.target, random_state=0)
    tmp = f'{root}.tmp{os.getpid()}'
    for split, split_idx in (('train', train_idx), ('val', val_idx)):
        for i in split_idx:
            folder = os.path.join(tmp, split, str(digits.target[i]))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(pixels[i], mode='L').save(os.path.join(folder, f'{i:04d}.png'))
    open(os.path.join(tmp, '.complete'), 'w').close()
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    try:
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(marker):
            raise
    return root


# ---------------------------------------------------------------------------------------------------------------
# readers and datasets

class ReaderCsv(Reader):
    """timm reader over a CSV file with ``path,label`` columns; relative paths are resolved against the CSV's folder."""

    def __init__(self, csv_path, class_to_idx=None):
        super().__init__()
        if not os.path.isfile(csv_path):
            raise UserInputError(f"CSV file {csv_path} does not exist")
        base = os.path.dirname(os.path.abspath(csv_path))
        with open(csv_path, newline='', encoding='utf-8') as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {'path', 'label'} <= set(reader.fieldnames):
                raise UserInputError(f"CSV file {csv_path} needs a header with 'path' and 'label' columns, "
                                     f"found {reader.fieldnames}")
            rows = [(os.path.join(base, r['path']), r['label'].strip()) for r in reader]
        if not rows:
            raise UserInputError(f"CSV file {csv_path} lists no images")
        missing = [p for p, _ in rows if not os.path.isfile(p)]
        if missing:
            raise UserInputError(f"CSV file {csv_path} lists {len(missing)} missing image file(s), e.g. {missing[0]}")
        if class_to_idx is None:
            class_to_idx = {c: i for i, c in enumerate(sorted({label for _, label in rows}, key=natural_key))}
        self.class_to_idx = class_to_idx
        self.samples = [(p, class_to_idx.get(label)) for p, label in rows]
        self.labels = [label for _, label in rows]
        self.root = base

    def __len__(self):
        return len(self.samples)

    def _filename(self, index, basename=False, absolute=False):
        path = self.samples[index][0]
        return os.path.basename(path) if basename else path if absolute else os.path.relpath(path, self.root)


class StrictImageDataset(ImageDataset):
    """timm ImageDataset (folder or CSV reader) that names an unreadable file in its error instead of silently
    skipping it."""
    DECODE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)

    def _load(self, path):
        with Image.open(path) as img:
            return img.convert(self.input_img_mode)

    def __getitem__(self, index):
        path, target = self.reader.samples[index]
        try:
            return self._load(path), target
        except self.DECODE_ERRORS as e:
            raise ImageLoadError(f"unreadable image {path}: {e} (use --skip-bad-images to skip such files)") from None

    def unreadable(self, num_threads=1, interval=DEFAULT_INTERVAL):
        """Paths of the images whose header does not decode (``Image.open`` + ``verify``: no pixel decode, so a
        large set is checked quickly), with a progress bar (or lines, off a terminal)."""
        def bad(sample):
            try:
                with Image.open(sample[0]) as img:
                    img.verify()
                return None
            except (*self.DECODE_ERRORS, SyntaxError):
                return sample[0]
        with ThreadPoolExecutor(max(1, num_threads)) as pool, \
                Progress(len(self.reader.samples), 'checking images', interval=interval) as bar:
            found = []
            for path in pool.map(bad, self.reader.samples):
                bar.update()
                if path is not None:
                    found.append(path)
        return found

    def check_images(self, skip_bad=False, num_threads=1):
        """Check every image once before training: unreadable ones are an error naming them all, or, with
        ``skip_bad``, dropped (returns the dropped paths)."""
        bad = self.unreadable(num_threads)
        if bad and not skip_bad:
            shown = ', '.join(bad[:20]) + (f' and {len(bad) - 20} more' if len(bad) > 20 else '')
            raise ImageLoadError(f"{len(bad)} unreadable image(s): {shown} (use --skip-bad-images to skip them)")
        if bad:
            dropped = set(bad)
            self.reader.samples = [s for s in self.reader.samples if s[0] not in dropped]
            _logger.warning(f"skipped {len(bad)} unreadable image(s), e.g. {bad[:3]}")
        return bad


class AugmentedDataset(torch.utils.data.Dataset):
    """Applies an albumentations pipeline seeded by (seed, epoch, index), so augmentation does not depend on the
    worker count or on where a run was resumed."""

    def __init__(self, base, transform, seed=0):
        self.base = base
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        img, target = self.base[index]
        self.transform.set_random_seed((self.seed * 1_000_003 + self.epoch * 100_003 + index) % 2 ** 32)
        return self.transform(image=np.asarray(img.convert('RGB')))['image'], target


def _find_split(root, split, synonyms):
    for name in (split, *synonyms):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    looked_for = ', '.join(dict.fromkeys((split, *synonyms)))
    raise UserInputError(f"no '{split}' split folder under {root} (looked for {looked_for})")


def empty_class_folders(folder):
    """Sub-folders of ``folder`` with no image anywhere below them (classes an ImageFolder reader drops)."""
    def has_image(path):
        return any(os.path.splitext(f)[1].lower() in get_img_extensions(as_set=True) for _, _, files in os.walk(path) for f in files)
    names = sorted((e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith('.')), key=natural_key)
    return [n for n in names if not has_image(os.path.join(folder, n))]


def _folder_reader(folder, class_to_idx=None):
    try:
        reader = ReaderImageFolder(folder, class_map=class_to_idx or '')
    except RuntimeError:  # timm's "Found 0 images in subfolders of ..."
        raise UserInputError(f"data folder {folder} contains no images "
                             f"(expected <class>/<image> sub-folders)") from None
    empty = empty_class_folders(folder)
    if empty:
        _logger.warning(f"{folder}: class folder(s) without images, not used as classes: {', '.join(empty)}")
    return reader


def build_datasets(args):
    """Return (train_base, val_base, class_names) as un-transformed datasets yielding (PIL image, target)."""
    if args.train_csv or args.val_csv:
        if not (args.train_csv and args.val_csv):
            raise UserInputError("give both --train-csv and --val-csv")
        train = StrictImageDataset(None, reader=ReaderCsv(args.train_csv))
        class_to_idx = train.reader.class_to_idx
        val_reader = ReaderCsv(args.val_csv, class_to_idx)
        unknown = sorted(set(val_reader.labels) - set(class_to_idx), key=natural_key)
        if unknown:
            raise UserInputError(f"{args.val_csv} has labels not present in {args.train_csv}: {unknown[:10]}")
        return train, StrictImageDataset(None, reader=val_reader), list(class_to_idx)
    if args.dataset and args.dataset != 'digits':
        train = create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                               download=args.dataset_download)
        val = create_dataset(args.dataset, root=args.data_dir, split=args.val_split, download=args.dataset_download)
        return train, val, dataset_class_names(train)
    if not args.data_dir:
        raise UserInputError("no data given: use --data-dir (ImageFolder with train/ and val/), "
                             "--train-csv/--val-csv, or --dataset")
    if args.dataset == 'digits':
        ensure_digits_folder(args.data_dir)
    if not os.path.isdir(args.data_dir):
        raise UserInputError(f"data folder {args.data_dir} does not exist")
    train_dir = _find_split(args.data_dir, args.train_split, TRAIN_SPLIT_NAMES)
    val_dir = _find_split(args.data_dir, args.val_split, EVAL_SPLIT_NAMES)
    train_reader, val_reader = _folder_reader(train_dir), _folder_reader(val_dir)
    train_classes, val_classes = set(train_reader.class_to_idx), set(val_reader.class_to_idx)
    if train_classes != val_classes:
        raise UserInputError(f"class folders differ between {train_dir} and {val_dir}: "
                             f"only in train {sorted(train_classes - val_classes, key=natural_key)[:10]}, "
                             f"only in val {sorted(val_classes - train_classes, key=natural_key)[:10]}")
    # equal class sets give equal (natural-sorted) class indices
    return (StrictImageDataset(train_dir, reader=train_reader), StrictImageDataset(val_dir, reader=val_reader),
            list(train_reader.class_to_idx))


def build_eval_dataset(args, class_names=None):
    """One evaluation split (ImageFolder split, CSV or named dataset) for validate.py, in ``class_names`` order."""
    class_to_idx = {c: i for i, c in enumerate(class_names)} if class_names else None
    if args.val_csv:
        reader = ReaderCsv(args.val_csv, class_to_idx)
        if class_to_idx is not None:
            unknown = sorted(set(reader.labels) - set(class_to_idx), key=natural_key)
            if unknown:
                raise UserInputError(f"{args.val_csv} has labels the checkpoint does not know: {unknown[:10]}")
        return StrictImageDataset(None, reader=reader), list(reader.class_to_idx)
    if args.dataset:
        ds = create_dataset(args.dataset, root=args.data_dir, split=args.split)
        return ds, dataset_class_names(ds)
    if not args.data_dir or not os.path.isdir(args.data_dir):
        raise UserInputError(f"data folder {args.data_dir} does not exist")
    split_dir = args.data_dir
    if args.split:
        synonyms = TRAIN_SPLIT_NAMES if args.split in TRAIN_SPLIT_NAMES else EVAL_SPLIT_NAMES
        split_dir = _find_split(args.data_dir, args.split, synonyms)
    else:
        splits = [n for n in (*TRAIN_SPLIT_NAMES, *EVAL_SPLIT_NAMES) if os.path.isdir(os.path.join(split_dir, n))]
        if splits:  # scoring a dataset root would mix its splits (and count split names as classes)
            raise UserInputError(f"--split '' but {split_dir} holds the split folders {splits}: name the split to "
                                 f"evaluate, e.g. --split {splits[-1]}")
    reader = _folder_reader(split_dir)
    if class_to_idx is not None:
        unknown = sorted(set(reader.class_to_idx) - set(class_to_idx), key=natural_key)
        if unknown:
            raise UserInputError(f"class folders in {split_dir} unknown to the checkpoint: {unknown[:10]}")
        reader = _folder_reader(split_dir, class_to_idx)
    return StrictImageDataset(split_dir, reader=reader), list(reader.class_to_idx)


def dataset_class_names(ds):
    """Class names of a timm/torchvision dataset, or None when it does not expose them."""
    class_to_idx = getattr(getattr(ds, 'reader', None), 'class_to_idx', None)
    if class_to_idx:
        return list(class_to_idx)
    classes = getattr(ds, 'classes', None)
    return [str(c) for c in classes] if classes is not None else None


# ---------------------------------------------------------------------------------------------------------------
# transforms

def _make_transform(spec, size, interpolation):
    """Build one albumentations transform from ``'Name'`` or ``{'Name': {kwargs}}``, filling in size/interpolation."""
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, dict) and len(spec) == 1:
        (name, kwargs), = spec.items()
        kwargs = dict(kwargs or {})
    else:
        raise UserInputError(f"augmentation entries must be 'Name' or {{Name: {{kwargs}}}}, got {spec!r}")
    cls = getattr(A, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, A.BasicTransform)):
        raise UserInputError(f"unknown albumentations transform '{name}'")
    params = inspect.signature(cls).parameters
    if 'size' in params and 'size' not in kwargs:
        kwargs['size'] = tuple(size)
    if 'height' in params and 'width' in params and 'height' not in kwargs:
        kwargs.update(height=size[0], width=size[1])
    if 'interpolation' in params and 'interpolation' not in kwargs:
        kwargs['interpolation'] = interpolation
    for key, value in kwargs.items():
        if isinstance(value, list):
            kwargs[key] = tuple(value)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserInputError(f"bad arguments for albumentations {name}{kwargs}: {e}") from None


def build_transform(data_config, train_aug=None):
    """Albumentations pipeline: ``train_aug`` (training) or resize + center crop (eval), then normalisation."""
    size = data_config['input_size'][1:]
    interpolation = CV2_INTERPOLATION.get(data_config.get('interpolation'), cv2.INTER_LINEAR)
    if train_aug is not None:
        ops = [_make_transform(spec, size, interpolation) for spec in train_aug]
    else:
        scale = math.floor(size[0] / data_config.get('crop_pct', 1.0))
        ops = [A.SmallestMaxSize(max_size=scale, interpolation=interpolation),
               A.CenterCrop(height=size[0], width=size[1])]
    ops += [A.Normalize(mean=data_config['mean'], std=data_config['std'], max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(ops, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# loaders

class ResumableSampler(torch.utils.data.Sampler):
    """Seeded per-epoch order, sharded across ranks, that can start part-way into an epoch.

    Training shards are padded (by repeating the start of the permutation) so every rank gets the same count;
    evaluation shards are not padded so every sample is counted exactly once.
    """

    def __init__(self, size, shuffle, seed=0, rank=0, world_size=1, pad=True):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch, start=0):
        """Select the epoch's order and skip its first ``start`` samples of this rank's shard."""
        self.epoch, self.start = epoch, start

    def shard(self):
        """This rank's indices for the current epoch."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.pad:
            total = math.ceil(self.size / self.world_size) * self.world_size
            order += order[:total - self.size]
        return order[self.rank::self.world_size]

    def __iter__(self):
        return iter(self.shard()[self.start:])

    def __len__(self):
        per_rank = math.ceil(self.size / self.world_size) if self.pad else len(range(self.rank, self.size,
                                                                                     self.world_size))
        return max(per_rank - self.start, 0)


def create_loader(dataset, batch_size, is_training, args, seed=0, rank=0, world_size=1):
    """DataLoader over a ResumableSampler; its own generator keeps the global RNG untouched."""
    sampler = ResumableSampler(len(dataset), shuffle=is_training, seed=seed, rank=rank, world_size=world_size,
                               pad=is_training)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=args.workers, drop_last=is_training,
        pin_memory=args.pin_mem, generator=generator)
