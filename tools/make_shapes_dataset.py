#!/usr/bin/env python
"""Generate a small COCO-format detection / instance-segmentation dataset, no download.

    python tools/make_shapes_dataset.py [--out output/shapes] [--train 1500] [--val 200] [--size 160] [--seed 0]

Images are coloured shapes (circle, square, triangle) on textured backgrounds (smooth colour
gradients, blurred noise, stripes or checkers); each shape has a polygon mask, its box and its
area. Layout::

    OUT/train/000000.png ...   OUT/annotations/train.json
    OUT/val/000000.png ...     OUT/annotations/val.json

Deterministic for a given seed; boxes overlap little (intersection <= 10% of the smaller box) so every
object stays visible. ``ensure_dataset(...)`` (used by ``tools/det_train.py``) writes the dataset
only when it is missing or was made with other settings.
"""
import argparse
import json
import math
import os
import sys
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ('circle', 'square', 'triangle')
PALETTE = [(220, 20, 60), (0, 128, 255), (255, 180, 0)]


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / size
    base = rng.uniform(60, 200, 3)
    grad = rng.uniform(-60, 60, (2, 3))
    img = base + xx[..., None] * grad[0] + yy[..., None] * grad[1]
    kind = rng.integers(0, 3)
    if kind == 0:  # blurred noise
        noise = rng.normal(0, 1, (h // 8 + 1, w // 8 + 1, 3)).astype(np.float32)
        noise = np.asarray(Image.fromarray(((noise * 30) + 128).clip(0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC),
                           dtype=np.float32) - 128
        img = img + noise
    elif kind == 1:  # stripes
        period = rng.uniform(6, 20)
        angle = rng.uniform(0, math.pi)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) * size / period
        img = img + (np.sin(2 * math.pi * phase)[..., None] * rng.uniform(10, 35, 3))
    else:  # checkers
        cell = int(rng.integers(6, 20))
        check = ((np.arange(h)[:, None] // cell + np.arange(w)[None, :] // cell) % 2).astype(np.float32)
        img = img + (check[..., None] - 0.5) * rng.uniform(15, 45, 3)
    img = img + rng.normal(0, 6, img.shape)  # fine grain
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def _polygon(rng: np.random.Generator, cls: int, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    if cls == 0:  # circle
        n = 32
        return [(cx + r * math.cos(2 * math.pi * i / n), cy + r * math.sin(2 * math.pi * i / n)) for i in range(n)]
    rot = rng.uniform(0, 2 * math.pi)
    if cls == 1:  # square (any rotation)
        return [(cx + r * math.cos(rot + math.pi / 2 * i), cy + r * math.sin(rot + math.pi / 2 * i)) for i in range(4)]
    return [(cx + r * math.cos(rot + 2 * math.pi / 3 * i), cy + r * math.sin(rot + 2 * math.pi / 3 * i)) for i in range(3)]


def _overlap(a, b) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0., x2 - x1) * max(0., y2 - y1)
    # intersection over the smaller box: also rejects a small shape drawn inside a big one
    return inter / (min(a[2] * a[3], b[2] * b[3]) + 1e-9)


def _colour(rng: np.random.Generator) -> Tuple[int, int, int]:
    h = rng.uniform(0, 1)
    s, v = rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return tuple(int(255 * c) for c in rgb)


def make_image(rng: np.random.Generator, size: int, min_r: float, max_r: float, max_objects: int):
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    anns = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            cls = int(rng.integers(0, len(CLASSES)))
            r = rng.uniform(min_r, max_r)
            cx, cy = rng.uniform(r * 0.6, size - r * 0.6, 2)
            poly = [(min(max(x, 0.), size - 1.), min(max(y, 0.), size - 1.)) for x, y in _polygon(rng, cls, cx, cy, r)]
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
            box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            if box[2] < 6 or box[3] < 6 or any(_overlap(box, a['bbox']) > 0.1 for a in anns):
                continue
            draw.polygon(poly, fill=_colour(rng))
            area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))
            anns.append(dict(category_id=cls + 1, bbox=[round(v, 2) for v in box], area=round(area, 2), iscrowd=0,
                             segmentation=[[round(v, 2) for p in poly for v in p]]))
            break
    img = img.filter(ImageFilter.GaussianBlur(radius=0.6))
    return img, anns


def write_split(root: str, split: str, num: int, size: int, seed: int, min_r: float, max_r: float,
                max_objects: int) -> Dict:
    rng = np.random.default_rng([seed, 0 if split == 'train' else 1])
    os.makedirs(os.path.join(root, split), exist_ok=True)
    images, annotations = [], []
    for i in range(num):
        img, anns = make_image(rng, size, min_r, max_r, max_objects)
        name = f'{i:06d}.png'
        img.save(os.path.join(root, split, name))
        images.append(dict(id=i + 1, file_name=name, width=size, height=size))
        for a in anns:
            annotations.append(dict(a, id=len(annotations) + 1, image_id=i + 1))
    coco = dict(images=images, annotations=annotations,
                categories=[dict(id=i + 1, name=n, supercategory='shape') for i, n in enumerate(CLASSES)])
    os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
    with open(os.path.join(root, 'annotations', f'{split}.json'), 'w') as f:
        json.dump(coco, f)
    return coco


def ensure_dataset(root: str = 'output/shapes', num_train: int = 1500, num_val: int = 200, size: int = 160,
                   seed: int = 0, min_r: float = 10., max_r: float = 36., max_objects: int = 4) -> str:
    """Write the dataset under ``root`` unless it already exists with these settings."""
    settings = dict(num_train=num_train, num_val=num_val, size=size, seed=seed, min_r=min_r, max_r=max_r,
                    max_objects=max_objects, version=1)
    stamp = os.path.join(root, 'settings.json')
    if os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == settings:
                return root
    for split, num in (('train', num_train), ('val', num_val)):
        write_split(root, split, num, size, seed, min_r, max_r, max_objects)
    with open(stamp, 'w') as f:
        json.dump(settings, f)
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--out', default='output/shapes')
    ap.add_argument('--train', type=int, default=1500)
    ap.add_argument('--val', type=int, default=200)
    ap.add_argument('--size', type=int, default=160)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--min-r', type=float, default=10.)
    ap.add_argument('--max-r', type=float, default=36.)
    ap.add_argument('--max-objects', type=int, default=4)
    a = ap.parse_args(argv)
    root = ensure_dataset(a.out, a.train, a.val, a.size, a.seed, a.min_r, a.max_r, a.max_objects)
    for split in ('train', 'val'):
        with open(os.path.join(root, 'annotations', f'{split}.json')) as f:
            d = json.load(f)
        print(f'{split}: {len(d["images"])} images, {len(d["annotations"])} objects -> {root}/{split}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
