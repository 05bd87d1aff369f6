"""Write ``model_cards/<family>.md`` for every visionattn family from the timm registry.

Each family module defines ``FAMILY_CARD`` (paper, repo, license, cited accuracy, how to load
official weights, known differences). Parameters and GMACs are measured here: parameters by
instantiating on the meta device, GMACs with ``torch.utils.flop_counter`` (FLOPs / 2, matmuls and
convolutions) on meta tensors at the model's default input size and at 224. Measured speed ratios
from ``tools/benchmark.py --save``, peak memory from ``tools/benchmark_memory.py --save``, input-size scaling
from ``tools/benchmark_scaling.py --save`` and onnxruntime
latency from ``tools/benchmark_onnx.py --save`` (``model_cards/measurements.json``) are added when present.

Usage: python tools/model_cards.py [--out model_cards] [--family davit]
"""
import argparse
import importlib
import json
import sys
import urllib.parse
from pathlib import Path

import timm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import visionattn  # noqa: E402
from benchmark import gmacs  # noqa: E402  (tools/ is this script's folder)


def family_models():
    """{family module name: [model names]} for every registered visionattn model."""
    families = {}
    for name in visionattn.list_models():
        module = timm.models._registry._model_to_module[name]
        families.setdefault(module, []).append(name)
    return families


def measure(name):
    """(params, GMACs at the default size, GMACs at 224, default input size) on the meta device."""
    cfg = timm.models.get_pretrained_cfg(name)
    model = timm.create_model(name, device='meta').eval()
    params = sum(p.numel() for p in model.parameters())

    default = tuple(cfg.input_size[1:])
    g_default = gmacs(model, default)
    g_224 = g_default if default == (224, 224) or cfg.fixed_input_size else gmacs(model, (224, 224))
    return params, g_default, g_224, default


def weight_tags(name):
    """'`tag` (where pretrained=True downloads it from)' for each tag of ``name`` with downloadable weights."""
    tags = []
    for full in timm.list_pretrained(f'{name}.*'):
        cfg = timm.models.get_pretrained_cfg(full)
        if cfg.hf_hub_id:
            source = "timm's HF hub copy" if cfg.hf_hub_id.startswith('timm/') else f'HF hub {cfg.hf_hub_id}'
        else:
            source = urllib.parse.urlsplit(cfg.url).netloc
        tags.append(f'`{cfg.tag}` ({source})')
    return ', '.join(tags) or '—'


def throughput(meas):
    """'1.22× (80 % of peak) / 1.01× train vs REF' from a model's saved benchmark figures ('—' when none)."""
    parts = []
    for prefix, label in (('', ''), ('train_', ' train')):
        if meas.get(prefix + 'ratio_vs_timm'):
            share = meas.get(prefix + 'share_of_matmul_peak')
            parts.append(f"{meas[prefix + 'ratio_vs_timm']:.2f}×{label}"
                         + (f' ({100 * share:.0f} % of peak)' if share else ''))
    if not parts:
        return '—'
    return ' / '.join(parts) + (f" vs {meas['reference']}" if meas.get('reference') else '')


def render(family, names, measurements):
    module = importlib.import_module(f'visionattn.models.{family}')
    card = module.FAMILY_CARD
    lines = [
        f"# {card['name']}", '',
        f"- Paper: {card['paper']}",
        f"- Official code: {card['repo']}",
        f"- License: {card['license']}",
        '', '## Variants', '',
        '| model | params | GMACs @ default size | GMACs @ 224 | input | top-1 (cited) | `pretrained=True` tags (source) | CPU throughput vs timm (inference / train step) |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for name in names:
        params, g_default, g_224, size = measure(name)
        acc = card.get('accuracy', {}).get(name, '—')
        meas = measurements.get(name, {})
        speed = throughput(meas)
        lines.append(
            f'| `{name}` | {params:,} | {g_default:.2f} | {g_224:.2f} | {size[0]}×{size[1]} | {acc} | {weight_tags(name)} | {speed} |')
    setups = sorted({measurements[n][k] for n in names for k in ('setup', 'train_setup') if k in measurements.get(n, {})})
    official = [f"`{n}` {measurements[n]['ratio_vs_official']:.2f}×"
                + (f" / {measurements[n]['train_ratio_vs_official']:.2f}× train" if 'train_ratio_vs_official' in measurements[n] else '')
                for n in names if 'ratio_vs_official' in measurements.get(n, {})]
    lines += [
        '', 'GMACs: `torch.utils.flop_counter` (matmul/conv FLOPs ÷ 2), batch 1. Accuracy figures are the '
        "authors' ImageNet-1k top-1 claims for the weights of the listed tag, cited, not reproduced here; "
        "`python tools/validate.py --model NAME --pretrained --data-dir IMAGENET --split val` checks one. "
        "Models without a tag: see \"Loading official weights\"."]
    if setups:
        lines += ['', f"Throughput: `python tools/benchmark.py [--train] [--official] --save`, same-run interleaved "
                  f"ratios ({'; '.join(setups)}); % of peak: 2 · GMACs · img/s (training: 3 passes) against a 2048² "
                  "fp32 matmul timed in the same run."]
    if official:
        lines += [f"Against the tests' transcription of the official network, same run: {', '.join(official)}."]
    memory = [f'`{n}` {text}' for n in names for text in measurements.get(n, {}).get('memory', {}).values()]
    if memory:
        lines += ['', 'Peak memory (`python tools/benchmark_memory.py [--train] --official --save`, fresh-process VmHWM, '
                  'which includes the ~0.75 GB of the imported torch + timm):', '']
        lines += [f'- {m}' for m in memory]
    scaling = [(n, measurements[n]['scaling']) for n in names if 'scaling' in measurements.get(n, {})]
    if scaling:
        lines += ['', 'Scaling with the input size (`python tools/benchmark_scaling.py --save`, '
                  f"{scaling[0][1]['setup']}; ×: ratio to the smallest size; a cost linear in the token count "
                  'grows like the token ratio):', '',
                  '| model | input | tokens × | forward ms | time × | MB above the model | memory × |',
                  '|---|---|---|---|---|---|---|']
        lines += [f"| `{n}` | {r['size']}² | {r['token_ratio']:g} | {r['ms']} | {r['time_ratio']} | "
                  f"{r['mb_above_model'] if r['mb_above_model'] is not None else '—'} | {r['memory_ratio'] or '—'} |"
                  for n, table in scaling for r in table['rows']]
    onnx = [(n, measurements[n]['onnx']) for n in names if 'onnx' in measurements.get(n, {})]
    if onnx:
        lines += ['', 'ONNX export (`python tools/export_onnx.py MODEL`; see the README\'s Deploy section). onnxruntime '
                  'CPU latency against eager PyTorch (`python tools/benchmark_onnx.py --save`, '
                  f"{onnx[0][1]['setup']}; ratio = PyTorch time / onnxruntime time):", '']
        lines += [f'- `{n}`: ' + ', '.join(
            f"batch {key[1:]} {fig['onnx_ms']:.1f} ms vs {fig['torch_ms']:.1f} ms ({fig['ratio']:.2f}×)"
            for key, fig in sorted(((k, f) for k, f in figures.items() if k != 'setup'), key=lambda kv: int(kv[0][1:])))
            for n, figures in onnx]
    lines += ['',
        '## Loading official weights', '', card['load_official'], '',
        '## Known differences', '',
    ]
    lines += [f'- {d}' for d in card.get('differences', [])] or ['- none known']
    return '\n'.join(lines) + '\n'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=str(ROOT / 'model_cards'))
    parser.add_argument('--family', action='append', help='only these families (default: all)')
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meas_path = ROOT / 'model_cards' / 'measurements.json'
    measurements = json.loads(meas_path.read_text()) if meas_path.exists() else {}
    for family, names in sorted(family_models().items()):
        if args.family and family not in args.family:
            continue
        path = out / f'{family}.md'
        path.write_text(render(family, names, measurements))
        print(f'wrote {path} ({len(names)} models)')


if __name__ == '__main__':
    main()
