"""Training checkpoints: atomic writes, ``torch.load(weights_only=True)``-safe contents, resume with fallback.

A checkpoint is a plain dict: model/EMA/optimizer/scheduler/scaler state, progress (``epoch``, ``batches_done``,
``epoch_complete``, ``num_updates``), RNG states of every rank, the resolved args as a plain dict, class names,
data config and the metric history.
"""
import glob
import logging
import os
import random
import re
import shutil

import numpy as np
import torch
from timm.utils import CheckpointSaver

from ..weights import WeightsFileError, load_weights
from .errors import UserInputError

_logger = logging.getLogger('train')

EXT = '.pth.tar'


def atomic_write(path, write):
    """``write(tmp)`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    tmp = f'{path}.tmp{os.getpid()}'
    write(tmp)
    with open(tmp, 'rb+') as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save(obj, path):
    """torch.save ``obj`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver (top-k ``checkpoint-<epoch>``, ``last``, ``model_best``, ``recovery-<epoch>-<batch>``)
    writing our own training state. Every file is an fsynced, renamed-into-place independent copy (no hardlinks),
    so damage to one file never spreads to the others."""

    def __init__(self, state_fn, checkpoint_dir, max_history, decreasing=False):
        super().__init__(model=None, optimizer=None, checkpoint_dir=checkpoint_dir, recovery_dir=checkpoint_dir,
                         decreasing=decreasing, max_history=max_history)
        self.state_fn = state_fn
        self.can_hardlink = False

    def _save(self, save_path, epoch, metric=None):
        state = self.state_fn()
        state['metric'] = metric
        state['saver'] = self.state_dict(epoch, metric)
        atomic_save(state, save_path)

    def _duplicate(self, src, dst):
        atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))

    def remove_recovery_files(self):
        """Drop mid-epoch recovery files once the epoch's own checkpoint is written."""
        for path in glob.glob(os.path.join(self.recovery_dir, f'{self.recovery_prefix}-*{EXT}')):
            os.remove(path)
        self.curr_recovery_file = self.prev_recovery_file = ''


def read_weights(path, what='checkpoint'):
    """:func:`visionattn.weights.load_weights` on the CPU, its errors as :class:`UserInputError` (one ERROR line)."""
    try:
        return load_weights(path, what)
    except WeightsFileError as e:
        raise UserInputError(str(e)) from None


def read_checkpoint(path):
    """Load a training checkpoint (tools/train.py) with :func:`read_weights`; clear error when it is another file."""
    ckpt = read_weights(path)
    if not isinstance(ckpt, dict) or 'epoch_complete' not in ckpt:
        raise UserInputError(f"{path} is not a training checkpoint written by tools/train.py (use --pretrained-path "
                             f"to start from plain weights)")
    return ckpt


def progress(ckpt):
    """(completed epochs, batches into the next epoch) of a checkpoint; larger is newer."""
    if ckpt['epoch_complete']:
        return ckpt['epoch'] + 1, 0
    return ckpt['epoch'], ckpt['batches_done']


def _resume_candidates(folder):
    names = [f'last{EXT}'] + sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, f'*{EXT}'))
                                    if re.fullmatch(rf'(checkpoint-\d+|recovery-\d+-\d+){re.escape(EXT)}',
                                                    os.path.basename(p)))
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def find_resume_checkpoint(path):
    """Return (checkpoint, file) for ``--resume PATH``.

    A file must be readable (else a clear error). A folder resumes from its most advanced readable checkpoint among
    ``last``, ``checkpoint-*`` and ``recovery-*``; each unreadable one is reported, with the file used instead.
    """
    if os.path.isfile(path):
        try:
            return read_checkpoint(path), path
        except UserInputError as e:
            raise UserInputError(f"{e}; pass its folder to --resume to fall back to the newest readable "
                                 f"checkpoint") from None
    if not os.path.isdir(path):
        raise UserInputError(f"--resume {path}: no such file or folder")
    candidates = _resume_candidates(path)
    if not candidates:
        raise UserInputError(f"--resume {path}: the folder holds no training checkpoints")
    best, bad = None, []
    for file in candidates:
        try:
            ckpt = read_checkpoint(file)
        except UserInputError as e:
            bad.append(str(e))
            continue
        if best is None or progress(ckpt) > progress(best[0]):
            best = (ckpt, file)
    if best is None:
        raise UserInputError(f"--resume {path}: no readable checkpoint:\n  " + '\n  '.join(bad))
    for message in bad:
        _logger.warning(f"skipping {message}")
    if bad:
        epochs, batches = progress(best[0])
        _logger.warning(f"falling back to {best[1]} ({epochs} epoch(s) + {batches} batch(es) done)")
    return best


def rng_state():
    """RNG states (torch, CUDA, numpy, python) as weights_only-loadable values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        'numpy': (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        'python': random.getstate(),
    }


def set_rng_state(state):
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))


def scheduler_state(scheduler):
    """timm scheduler state with nested torch schedulers (plateau) flattened to their own state dicts."""
    return {k: v.state_dict() if hasattr(v, 'state_dict') else v for k, v in scheduler.state_dict().items()}


def load_scheduler_state(scheduler, state):
    """Restore the nested torch scheduler of a plateau schedule; the other timm schedules are pure functions of
    their (re-created) settings and the epoch/update count."""
    for key, value in state.items():
        current = getattr(scheduler, key, None)
        if hasattr(current, 'load_state_dict'):
            current.load_state_dict(value)
