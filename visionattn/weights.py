"""Reading a weights file a user gives, the one way every tool and code path does it.

``torch.load(..., weights_only=True)`` (memory-mapped when the file is a zip archive) or safetensors; a
pickle of Python objects other than tensors and plain containers is refused, never run. The one class
allowed besides them is ``argparse.Namespace``: the DeiT-style training scripts of several official repositories
pickle their command-line ``args`` beside the weights, and a Namespace is an attribute bag whose values the
weights-only unpickler still checks one by one.
"""
import argparse
import contextlib
import os
import pickle
import zipfile

import torch

__all__ = ['WeightsFileError', 'load_weights', 'checkpoint_globals']


@contextlib.contextmanager
def checkpoint_globals():
    """Within: ``torch.load(weights_only=True)`` also accepts ``argparse.Namespace`` (see the module docstring)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        yield


class WeightsFileError(ValueError):
    """A weights file that is missing, empty, unreadable or refused; the message names it."""


def load_weights(path, what: str = 'checkpoint', map_location='cpu'):
    """The object stored in ``path`` (``.safetensors`` or a torch file), read safely.

    Raises :class:`WeightsFileError` (a ``ValueError``) naming ``what`` and ``path`` for a missing, empty,
    unreadable or refused file.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f'{what}: expected a path, got {type(path).__name__}')
    path = str(path)
    if not os.path.isfile(path):
        raise WeightsFileError(f'{what} {path} does not exist')
    if os.path.getsize(path) == 0:
        raise WeightsFileError(f'{what} {path} is empty (0 bytes)')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path, device=str(map_location))
        with checkpoint_globals():
            return torch.load(path, map_location=map_location, weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if 'weights only' in str(e).lower():
            raise WeightsFileError(
                f'{what} {path} pickles Python objects other than tensors, which is refused '
                f'(torch.load(weights_only=True)); save its state_dict as a plain dict or as safetensors. '
                f'Refused: {str(e).strip().splitlines()[0]}') from None
        raise WeightsFileError(f'{what} {path} is unreadable (not a torch checkpoint?): '
                               f'{str(e).strip().splitlines()[0]}') from None
    except Exception as e:  # truncated zip, garbage bytes, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightsFileError(f'{what} {path} is unreadable (truncated or corrupt?): {reason}') from None
