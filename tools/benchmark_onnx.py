"""onnxruntime (CPU) latency of exported visionattn models against eager PyTorch (same run, interleaved).

Each model (default: the smallest of every architecture, as tests/test_export.py exports) is exported
with a dynamic batch (``visionattn.deploy.export_onnx``), checked against PyTorch, and both runtimes are
timed at every ``--batch`` in interleaved rounds; the ratio is PyTorch time / onnxruntime time (> 1:
onnxruntime is faster).

Usage:
  python tools/benchmark_onnx.py [--models visionattn_nat_mini ...] [--batch 1 8] [--img 224]
                                 [--repeats 10] [--threads 2] [--save]
``--save`` merges the figures into model_cards/measurements.json (``onnx``) for tools/model_cards.py.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import visionattn  # noqa: E402
from visionattn.deploy import check_onnx, export_onnx, smallest_per_architecture  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', help='registered visionattn models (default: smallest per architecture)')
    parser.add_argument('--batch', type=int, nargs='+', default=[1, 8])
    parser.add_argument('--img', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--save', action='store_true', help='merge results into model_cards/measurements.json')
    args = parser.parse_args(argv)
    for flag, values in (('--batch', args.batch), ('--img', [args.img]), ('--repeats', [args.repeats]),
                         ('--threads', [args.threads])):
        if min(values) < 1:
            parser.error(f'argument {flag}: {" ".join(map(str, values))}: expected positive integers')
    names = args.models or smallest_per_architecture()
    unknown = [n for n in names if n not in visionattn.list_models()]
    if unknown:
        parser.error(f'argument --models: {" ".join(unknown)}: not registered visionattn models')
    torch.set_num_threads(args.threads)
    size = (args.img, args.img)
    setup = f'{args.img}px, fp32, {args.threads} threads, median of {args.repeats} interleaved rounds'
    print(f'onnxruntime {__import__("onnxruntime").__version__} vs PyTorch {torch.__version__} eager: {setup}')
    print(f'{"model":36s} {"batch":>5s} {"torch ms":>9s} {"onnx ms":>9s} {"ratio":>6s} {"max|diff|":>9s}')
    results = {}
    for name in names:
        model = timm.create_model(name, num_classes=1000).eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model, str(Path(tmp) / 'model.onnx'), size, dynamic='batch')
            rows = check_onnx(model, path, size, dynamic='batch', batch_sizes=args.batch, repeats=args.repeats,
                              threads=args.threads)
        results[name] = {}
        for row in rows:
            ratio = row['torch_ms'] / row['onnx_ms']
            print(f'{name:36s} {row["batch"]:5d} {row["torch_ms"]:9.1f} {row["onnx_ms"]:9.1f} {ratio:6.2f} '
                  f'{max(row["max_abs_diff"]):9.2e}', flush=True)
            results[name][f'b{row["batch"]}'] = {'torch_ms': round(row['torch_ms'], 1),
                                                 'onnx_ms': round(row['onnx_ms'], 1), 'ratio': round(ratio, 3)}
    if args.save:
        path = ROOT / 'model_cards' / 'measurements.json'
        data = json.loads(path.read_text()) if path.exists() else {}
        for name, figures in results.items():
            data.setdefault(name, {})['onnx'] = dict(figures, setup=setup)
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + '\n')
        print(f'saved {path}')


if __name__ == '__main__':
    main()
