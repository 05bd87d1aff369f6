import os
import sys

import pytest
import torch

torch.manual_seed(0)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def clear_visionattn_caches():
    """Empty every ``functools`` cache defined in a loaded ``visionattn`` module (index tables, plans).

    Caches are process-wide, so a test that checks how a table is built in one grad mode clears
    them first instead of depending on which earlier test filled them.
    """
    for name, module in list(sys.modules.items()):
        if not name.startswith('visionattn.') or module is None:
            continue
        for obj in vars(module).values():
            if getattr(obj, '__module__', None) == name and callable(getattr(obj, 'cache_clear', None)):
                obj.cache_clear()


@pytest.fixture
def fresh_caches():
    """Run the test with empty visionattn caches (see :func:`clear_visionattn_caches`)."""
    clear_visionattn_caches()
    yield
    clear_visionattn_caches()
