"""mmengine runner checkpoints that load with ``torch.load(weights_only=True)``.

mmengine 0.10.7 pickles its ``MessageHub`` log scalars as ``HistoryBuffer`` objects, whose pickle
calls ``getattr`` (bound statistics methods). torch >= 2.6 refuses them with ``weights_only=True``,
and allowing ``getattr`` would let a crafted file reach any callable. Instead, while saving, each
``HistoryBuffer`` is written as a plain dict of numpy arrays (:class:`WeightsOnlyCheckpointHook`)
and rebuilt after loading; :func:`numpy_safe_globals` allows the numpy array/scalar constructors
those dicts (and mmengine's metadata) need. Nothing is loaded with ``weights_only=False``.
"""
import contextlib

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.registry import HOOKS

_BUFFER_TAG = '__visionattn_history_buffer__'


def numpy_safe_globals():
    """The numpy globals a numpy array or scalar pickles (data constructors only, no ``getattr``)."""
    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith('DType')] if hasattr(np, 'dtypes') else []
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *dtypes]


@contextlib.contextmanager
def weights_only_runner_checkpoints():
    """Within: ``torch.load(weights_only=True)`` also accepts numpy arrays and scalars."""
    with torch.serialization.safe_globals(numpy_safe_globals()):
        yield


def _plain_buffer(buffer):
    return {_BUFFER_TAG: True, 'log_history': np.asarray(buffer._log_history),
            'count_history': np.asarray(buffer._count_history), 'max_length': int(buffer.max_length)}


@HOOKS.register_module(name='visionattn.WeightsOnlyCheckpoints')
class WeightsOnlyCheckpointHook(Hook):
    """Writes the runner's message hub without ``HistoryBuffer`` objects and rebuilds them on load,
    so mmengine resumes (and ``load_from``) read every checkpoint with ``weights_only=True``."""
    priority = 'VERY_LOW'  # after the hooks that add to the checkpoint

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        hub = checkpoint.get('message_hub')
        if isinstance(hub, dict) and isinstance(hub.get('log_scalars'), dict):
            scalars = {k: _plain_buffer(v) if isinstance(v, HistoryBuffer) else v
                       for k, v in hub['log_scalars'].items()}
            checkpoint['message_hub'] = {**hub, 'log_scalars': type(hub['log_scalars'])(scalars)}

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        hub = checkpoint.get('message_hub')
        if isinstance(hub, dict) and isinstance(hub.get('log_scalars'), dict):
            for key, value in hub['log_scalars'].items():
                if isinstance(value, dict) and value.get(_BUFFER_TAG):
                    hub['log_scalars'][key] = HistoryBuffer(list(value['log_history']),
                                                            list(value['count_history']), value['max_length'])
