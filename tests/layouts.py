"""Helpers that turn the official layout files in ``tests/fixtures/official_layouts`` into checkpoints.

A layout file lists every ``[key, shape, dtype]`` of an official state dict; these helpers write
files of random tensors with exactly those keys and shapes, in the official containers.
"""
import json
import os
from pathlib import Path

import torch

# The layouts ship with the tests (see fixtures/official_layouts/README.md); VISIONATTN_SPECS=DIR (a specs folder
# holding layouts/) is an optional override.
LAYOUTS = (Path(os.environ['VISIONATTN_SPECS']) / 'layouts' if os.environ.get('VISIONATTN_SPECS')
           else Path(__file__).resolve().parent / 'fixtures' / 'official_layouts')
NAME_MAP = json.loads((LAYOUTS / 'name_map.json').read_text())


def load_layout(family: str, variant: str, timm_layout: bool = False) -> dict:
    path = LAYOUTS / family / f'{variant}{".timm" if timm_layout else ""}.json'
    if not path.exists():
        raise FileNotFoundError(f'layout file {path} not found')
    return json.loads(path.read_text())


def variants(family: str):
    """(official variant, visionattn model name) pairs of a family, from name_map.json."""
    return [(k.split('/', 1)[1], v) for k, v in sorted(NAME_MAP.items()) if k.split('/', 1)[0] == family]


def random_state_dict(layout: dict, seed: int = 0) -> dict:
    """Random tensors with exactly the layout's keys, shapes and dtypes, in its order."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape, dtype in layout['state_dict']:
        dt = getattr(torch, dtype)
        if dt.is_floating_point:
            sd[key] = torch.randn(shape, generator=g, dtype=torch.float32).mul_(0.02).to(dt)
        else:
            sd[key] = torch.randint(0, 2, shape, generator=g).to(dt)
    return sd


def wrap(state_dict: dict, container: str) -> dict:
    """Wrap a state dict the way released checkpoints do: raw, 'model', 'state_dict' or DDP 'module.'."""
    if container == 'raw':
        return state_dict
    if container == 'model':
        return {'model': state_dict, 'epoch': 300}
    if container == 'state_dict':
        return {'state_dict': state_dict, 'epoch': 300, 'arch': 'x'}
    if container == 'module':
        return {'state_dict': {f'module.{k}': v for k, v in state_dict.items()}}
    raise ValueError(container)


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
