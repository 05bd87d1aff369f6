"""Peak memory (fresh-process VmHWM) of a forward pass or a training step, ours against the official transcription.

Each measurement runs in its own child process (so the peak is that of one model and one step); the
parent watches the child's resident memory and stops it past ``--limit-gb``, reporting the peak as
"more than" the limit.

Usage:
  python tools/benchmark_memory.py --model visionattn_ppma_tiny --img 800 1216 [--batch 1] [--train]
                                   [--official] [--limit-gb 16] [--threads 2] [--model-kwargs n_win=16 ...]
                                   [--grad-checkpointing]
``--official`` also measures the transcription of the official code held by the tests
(``tools/benchmark.py``'s ``OFFICIAL``) and prints the ratio; ``--model-kwargs`` (``key=value``, Python
literals) go to both constructors (e.g. BiFormer's detection setting ``n_win=16 auto_pad=True``);
``--grad-checkpointing`` measures our model with ``set_grad_checkpointing()`` (blocks recomputed in backward); ``--save`` adds the line to
``model_cards/measurements.json`` (``memory``) for tools/model_cards.py.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kb(pid, field):
    try:
        for line in Path(f'/proc/{pid}/status').read_text().splitlines():
            if line.startswith(field + ':'):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def child(args):
    """Build, run one forward (no grad) or one training step, print the process's VmHWM in bytes."""
    import torch
    sys.path.insert(0, str(ROOT))
    import visionattn  # noqa: F401
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sys.path.insert(0, str(ROOT / 'tools'))
    from benchmark import create_at, official_model
    # built for the measured size where its input size is fixed at build time (FLatten's learned encodings)
    kwargs = json.loads(args.model_kwargs_json)
    model = official_model(args.model, **kwargs) if args.official else create_at(args.model, args.img, **kwargs)
    if args.grad_checkpointing and not args.official:
        model.set_grad_checkpointing(True)
    x = torch.randn(args.batch, 3, *args.img)
    base = _status_kb(os.getpid(), 'VmRSS')
    t0 = time.perf_counter()
    if args.train:
        model.train()
        model(x).logsumexp(-1).mean().backward()
    else:
        model.eval()
        with torch.no_grad():
            model(x)
    print(json.dumps({'peak': _status_kb(os.getpid(), 'VmHWM') * 1024, 'before': base * 1024,
                      'seconds': time.perf_counter() - t0}))


def measure(args, official):
    cmd = [sys.executable, __file__, '--child', '--model', args.model, '--img', *map(str, args.img),
           '--batch', str(args.batch), '--threads', str(args.threads), '--model-kwargs-json', args.model_kwargs_json]
    cmd += ['--train'] if args.train else []
    cmd += ['--official'] if official else []
    cmd += ['--grad-checkpointing'] if args.grad_checkpointing else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    limit = args.limit_gb * 2 ** 30
    seen = 0
    while proc.poll() is None:
        seen = max(seen, _status_kb(proc.pid, 'VmRSS') * 1024)
        if seen > limit:
            proc.kill()
            proc.wait()
            return {'peak': None, 'killed_at': seen}
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        tail = err.strip().splitlines()[-1] if err.strip() else f'exit code {proc.returncode}'
        return {'peak': None, 'error': tail}
    return json.loads(out.strip().splitlines()[-1])


def _parse_kwargs(parser, items):
    import ast
    kwargs = {}
    for item in items:
        key, sep, value = item.partition('=')
        try:
            if not sep or not key.isidentifier():
                raise ValueError
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parser.error(f'argument --model-kwargs: {item!r}: expected KEY=VALUE with a Python literal value')
    return kwargs


def main(argv=None):
    sys.path.insert(0, str(ROOT))
    from visionattn.train.errors import ArgumentParser
    parser = ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', required=True)
    parser.add_argument('--img', type=int, nargs='+', default=[224], help='H [W]')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--train', action='store_true', help='forward + backward instead of a no-grad forward')
    parser.add_argument('--official', action='store_true', help='also measure the official transcription')
    parser.add_argument('--limit-gb', type=float, default=16.)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--save', action='store_true', help='merge the result into model_cards/measurements.json')
    parser.add_argument('--model-kwargs', nargs='+', default=[], metavar='KEY=VALUE',
                        help='constructor arguments for ours and the official transcription (Python literals)')
    parser.add_argument('--grad-checkpointing', action='store_true',
                        help='our model with set_grad_checkpointing() (not the official transcription)')
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--model-kwargs-json', default='{}', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if len(args.img) not in (1, 2) or min(args.img) < 1:
        parser.error(f'argument --img: {" ".join(map(str, args.img))}: expected H or H W (positive integers)')
    if args.batch < 1 or args.threads < 1 or args.limit_gb <= 0:
        parser.error(f'--batch {args.batch}, --threads {args.threads}, --limit-gb {args.limit_gb:g}: '
                     'expected positive values')
    args.img = args.img * 2 if len(args.img) == 1 else args.img
    if args.model_kwargs:
        args.model_kwargs_json = json.dumps(_parse_kwargs(parser, args.model_kwargs))
    if args.child:
        return child(args)
    import timm
    import visionattn  # noqa: F401
    if not timm.is_model(args.model):
        parser.error(f'argument --model: {args.model!r} is not a registered model')
    if args.official:
        sys.path.insert(0, str(ROOT / 'tools'))
        from benchmark import OFFICIAL
        if args.model not in OFFICIAL:
            parser.error(f'--official: no official transcription for {args.model!r} (have: {sorted(OFFICIAL)})')
    what = 'training step (forward + backward)' if args.train else 'forward (no grad)'
    setup = f'{what}, batch {args.batch}, {args.img[0]}x{args.img[1]}, fp32, {args.threads} threads'
    if args.model_kwargs:
        setup += ', ' + ' '.join(args.model_kwargs)
    if args.grad_checkpointing:
        setup += ', ours with gradient checkpointing'
    print(f'{args.model}: {setup}, fresh process VmHWM')
    results = {'ours': measure(args, official=False)}
    if args.official:
        results['official'] = measure(args, official=True)

    def show(r):
        if r['peak'] is not None:
            return (f'{r["peak"] / 2 ** 30:.2f} GB, {(r["peak"] - r["before"]) / 2 ** 30:.2f} GB above the built model '
                    f'({r["seconds"]:.1f} s)')
        if 'killed_at' in r:
            return f'> {r["killed_at"] / 2 ** 30:.2f} GB (stopped at --limit-gb {args.limit_gb:g})'
        return f'failed: {r["error"]}'
    for label, r in results.items():
        print(f'  {label:9s} {show(r)}')
    summary = f'{setup}: {show(results["ours"])}'
    if args.official and results['ours']['peak']:
        off = results['official']
        if off['peak']:
            ratio = f'{results["ours"]["peak"] / off["peak"]:.3f}'
        elif 'killed_at' in off:
            ratio = f'< {results["ours"]["peak"] / off["killed_at"]:.3f}'
        else:
            ratio = None
        if ratio:
            print(f'  ratio ours / official: {ratio}')
            summary += f'; official transcription {show(off)}, ratio {ratio}'
    if args.save:
        path = ROOT / 'model_cards' / 'measurements.json'
        data = json.loads(path.read_text()) if path.exists() else {}
        data.setdefault(args.model, {}).setdefault('memory', {})[setup] = summary
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + '\n')
        print(f'saved {path}')


if __name__ == '__main__':
    main()
