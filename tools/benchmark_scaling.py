"""How forward time and peak memory grow with the input size (batch 1, fp32, no grad).

For each model and each ``--sizes`` S, the model is built for S x S inputs (``img_size=S`` where the input
size is fixed at build time, as in tools/benchmark.py); the forward time is the median of ``--rounds`` runs
after two warm-ups, and the peak memory is the fresh-process VmHWM above the built model
(tools/benchmark_memory.py). Each line also gives the ratios to the first size and the token-count ratio:
a model whose cost is linear in the number of tokens has time and memory ratios near the token ratio
(16 for 896² against 224²), a quadratic one near its square.

Usage:
  python tools/benchmark_scaling.py --models visionattn_flatten_swin_tiny visionattn_flatten_pvt_tiny \\
                                    [--sizes 224 448 896] [--rounds 5] [--threads 2] [--save]
``--save`` adds the table to model_cards/measurements.json (``scaling``) for tools/model_cards.py.
"""
import json
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'tools'))


def forward_seconds(name: str, size: int, rounds: int) -> float:
    """Median seconds of a batch-1 no-grad forward of ``name`` built for ``size`` x ``size``."""
    import torch
    from benchmark import create_at
    model = create_at(name, size).eval()
    x = torch.randn(1, 3, size, size)
    times = []
    with torch.inference_mode():
        for i in range(rounds + 2):
            t0 = time.perf_counter()
            model(x)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    from visionattn.train.errors import ArgumentParser
    parser = ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', required=True)
    parser.add_argument('--sizes', type=int, nargs='+', default=[224, 448, 896])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--limit-gb', type=float, default=16.)
    parser.add_argument('--save', action='store_true', help='merge the table into model_cards/measurements.json')
    args = parser.parse_args(argv)
    if min(args.sizes) < 32 or args.rounds < 1 or args.threads < 1 or args.limit_gb <= 0:
        parser.error(f'--sizes {" ".join(map(str, args.sizes))}, --rounds {args.rounds}, --threads {args.threads}, '
                     f'--limit-gb {args.limit_gb:g}: expected sizes >= 32 and positive values')
    import timm
    import torch
    import visionattn  # noqa: F401
    from benchmark_memory import measure
    for name in args.models:
        if not timm.is_model(name):
            parser.error(f'argument --models: {name!r} is not a registered model')
    torch.set_num_threads(args.threads)
    print(f'forward, batch 1, fp32, no grad, {args.threads} threads; memory = fresh-process VmHWM above the built model')
    print(f'{"model":32s} {"size":>5s} {"tokens x":>8s} {"ms":>9s} {"time x":>7s} {"MB":>8s} {"memory x":>8s}')
    saved = {}
    for name in args.models:
        rows, first = [], None
        for size in args.sizes:
            ms = 1e3 * forward_seconds(name, size, args.rounds)
            mem = measure(Namespace(model=name, img=[size, size], batch=1, threads=args.threads, train=False,
                                    limit_gb=args.limit_gb), official=False)
            mb = (mem['peak'] - mem['before']) / 2 ** 20 if mem['peak'] is not None else None
            first = first or (size, ms, mb)
            tokens_x = (size / first[0]) ** 2
            time_x = ms / first[1]
            mem_x = mb / first[2] if mb is not None and first[2] else None
            print(f'{name:32s} {size:5d} {tokens_x:8.1f} {ms:9.1f} {time_x:7.2f} '
                  f'{f"{mb:.0f}" if mb is not None else "failed":>8s} {f"{mem_x:.2f}" if mem_x else "—":>8s}',
                  flush=True)
            rows.append(dict(size=size, ms=round(ms, 1), time_ratio=round(time_x, 2),
                             mb_above_model=round(mb) if mb is not None else None,
                             memory_ratio=round(mem_x, 2) if mem_x else None, token_ratio=tokens_x))
        saved[name] = rows
    if args.save:
        path = ROOT / 'model_cards' / 'measurements.json'
        data = json.loads(path.read_text()) if path.exists() else {}
        for name, rows in saved.items():
            data.setdefault(name, {})['scaling'] = dict(
                setup=f'forward, batch 1, fp32, no grad, {args.threads} threads', rows=rows)
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + '\n')
        print(f'saved {path}')


if __name__ == '__main__':
    main()
