"""Throughput of visionattn models against timm's implementation of the same model (same run).

For each model, ours and the reference are timed in interleaved rounds (so both see the same
machine load); the median time per batch gives images/s and the ratio ours / reference.
Reference: timm's model of the same name without the ``visionattn_`` prefix, or the entry in
``REFERENCES`` (e.g. NAT / DiNAT are compared with Swin of similar FLOPs, as their papers do; the CNN attention
models with timm's plain ResNet-50 / MobileNetV2, FLatten and Agent attention with timm's Swin / PVTv2 / DeiT host,
BiFormer with Swin of similar FLOPs). ``--official``
adds a third contender where the tests hold a transcription of the official network (``OFFICIAL``: the
CBAM / Triplet / ELA CNNs, PPMA, FLatten, Agent attention, BiFormer), timed in the same interleaved rounds.

Usage:
  python tools/benchmark.py --models 'visionattn_davit_tiny' 'visionattn_twins_*' [--batch 8]
                            [--img 224] [--rounds 5] [--train] [--official] [--save]
``--save`` merges the ratios into model_cards/measurements.json for tools/model_cards.py.

"peak %": the share of the machine's fp32 matmul peak our model reaches, 2 · GMACs · img/s (a training step
counted as 3 forward passes) against a 2048² fp32 matmul timed in the same run on the same threads; GMACs by
``torch.utils.flop_counter`` on the meta device (matmuls and convolutions).
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import visionattn  # noqa: E402

REFERENCES = {
    'visionattn_nat_mini': 'swin_tiny_patch4_window7_224',
    'visionattn_nat_tiny': 'swin_tiny_patch4_window7_224',
    'visionattn_nat_small': 'swin_small_patch4_window7_224',
    'visionattn_nat_base': 'swin_base_patch4_window7_224',
    'visionattn_dinat_mini': 'swin_tiny_patch4_window7_224',
    'visionattn_dinat_tiny': 'swin_tiny_patch4_window7_224',
    'visionattn_dinat_small': 'swin_small_patch4_window7_224',
    'visionattn_dinat_base': 'swin_base_patch4_window7_224',
    'visionattn_dinat_s_tiny': 'swin_tiny_patch4_window7_224',
    'visionattn_dinat_s_small': 'swin_small_patch4_window7_224',
    'visionattn_dinat_s_base': 'swin_base_patch4_window7_224',
    'visionattn_ppma_tiny': 'swin_tiny_patch4_window7_224',
    'visionattn_ppma_small': 'swin_small_patch4_window7_224',
    'visionattn_ppma_base': 'swin_base_patch4_window7_224',
    'visionattn_resnet50_cbam': 'resnet50',
    'visionattn_resnet50_triplet': 'resnet50',
    'visionattn_resnet50_ela_b': 'resnet50',
    'visionattn_mobilenetv2_triplet': 'mobilenetv2_100',
    'visionattn_mobilenetv2_ela_l': 'mobilenetv2_100',
    # FLatten replaces the attention of its host: compared with timm's host of the same size
    'visionattn_flatten_swin_tiny': 'swin_tiny_patch4_window7_224',
    'visionattn_flatten_swin_small': 'swin_small_patch4_window7_224',
    'visionattn_flatten_swin_base': 'swin_base_patch4_window7_224',
    'visionattn_flatten_swin_base_384': 'swin_base_patch4_window12_384',
    **{f'visionattn_flatten_pvt_v2_b{i}': f'pvt_v2_b{i}' for i in range(6)},
    # Agent attention likewise (timm has no PVT v1 or CSwin: those compare with the official transcription)
    'visionattn_agent_swin_tiny': 'swin_tiny_patch4_window7_224',
    'visionattn_agent_swin_small': 'swin_small_patch4_window7_224',
    'visionattn_agent_swin_base': 'swin_base_patch4_window7_224',
    'visionattn_agent_swin_base_384': 'swin_base_patch4_window12_384',
    'visionattn_agent_deit_tiny': 'deit_tiny_patch16_224',
    'visionattn_agent_deit_small': 'deit_small_patch16_224',
    'visionattn_agent_deit_base': 'deit_base_patch16_224',
    # BiFormer against Swin of similar FLOPs (S 4.5 GMACs = Swin-T), as its paper does
    'visionattn_biformer_tiny': 'swin_tiny_patch4_window7_224',
    'visionattn_biformer_small': 'swin_tiny_patch4_window7_224',
    'visionattn_biformer_base': 'swin_small_patch4_window7_224',
    'visionattn_biformer_stl': 'swin_tiny_patch4_window7_224',
    'visionattn_biformer_stl_nchw': 'swin_tiny_patch4_window7_224',
}

# transcriptions of the official networks in the tests: name -> (module in tests/, factory(module) -> model)
OFFICIAL = {
    'visionattn_resnet50_cbam': ('test_cnn_attention', lambda ref: ref.RefResidualNet(50, ref.RefCBAM, 'cbam')),
    'visionattn_resnet50_triplet': (
        'test_cnn_attention', lambda ref: ref.RefResidualNet(50, ref.RefTriplet, 'triplet_attention')),
    'visionattn_mobilenetv2_triplet': ('test_cnn_attention', lambda ref: ref.RefTripletMobileNetV2()),
    'visionattn_mobilenetv2_ela_l': ('test_cnn_attention', lambda ref: ref.RefELAMobileNetV2()),
    'visionattn_ppma_tiny': ('ppma_reference', lambda ref: ref.PPMARef(**ref.VARIANTS['PPMAViT_T'])),
    'visionattn_ppma_small': ('ppma_reference', lambda ref: ref.PPMARef(**ref.VARIANTS['PPMAViT_S'])),
    'visionattn_ppma_base': ('ppma_reference', lambda ref: ref.PPMARef(**ref.VARIANTS['PPMAViT_B'])),
    'visionattn_flatten_pvt_tiny': (
        'pvt_reference', lambda ref: ref.PyramidVisionTransformer(**ref.VARIANTS['flatten_pvt_tiny'])),
    'visionattn_flatten_pvt_v2_b1': (
        'pvt_reference', lambda ref: ref.PyramidVisionTransformerV2(**ref.VARIANTS['flatten_pvt_v2_b1'])),
    'visionattn_flatten_swin_tiny': ('swin_reference', lambda ref: ref.FLattenSwinTransformer()),
    'visionattn_flatten_cswin_tiny': ('cswin_reference', lambda ref: ref.CSWinTransformer()),
    **{f'visionattn_agent_{name}': ('agent_reference', lambda ref, v=variant: ref.build_reference(v)) for name, variant in (
        ('pvt_tiny', 'agent_pvt_t'), ('swin_tiny', 'agent_swin_t'), ('deit_small', 'agent_deit_s'),
        ('cswin_tiny', 'agent_cswin_t'))},
    **{f'visionattn_{variant}': ('biformer_reference', lambda ref, v=variant, **kw: ref.build_reference(v, **kw))
       for variant in (
        'biformer_tiny', 'biformer_small', 'biformer_base', 'biformer_stl', 'biformer_stl_nchw')},
}


def official_model(name, **kwargs):
    """The official-code transcription of ``name`` from the tests (``kwargs`` to its constructor), or None."""
    if name not in OFFICIAL:
        return None
    import importlib
    sys.path.insert(0, str(ROOT / 'tests'))
    module, factory = OFFICIAL[name]
    return factory(importlib.import_module(module), **kwargs)


def reference_for(name):
    ref = REFERENCES.get(name, name.replace('visionattn_', '', 1))
    return ref if timm.is_model(ref) else None


def matmul_peak_gflops(n: int = 2048, repeats: int = 7) -> float:
    """GFLOP/s of an n x n fp32 matmul on the current threads (median of ``repeats`` after a warm-up)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def gmacs(model: torch.nn.Module, size) -> float:
    """Multiply-accumulates (G) of one forward pass of a meta-device ``model`` at ``size`` (H, W): matmul and
    convolution FLOPs / 2 from ``torch.utils.flop_counter``."""
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, *size, device='meta'))
    return counter.get_total_flops() / 2e9


def create_at(name: str, img, **kwargs):
    """``name`` built for inputs of ``img`` (S or (H, W)): ``img_size=img`` for models whose input size is fixed
    at build time (timm's Swin, ConViT, FLatten), none for the others; ``kwargs`` go to the constructor."""
    size = (img, img) if isinstance(img, int) else tuple(img)
    if size != tuple(timm.get_pretrained_cfg_value(name, 'input_size')[1:]):
        try:
            return timm.create_model(name, img_size=size, **kwargs)
        except TypeError:  # the model takes any input size and has no img_size argument
            pass
    return timm.create_model(name, **kwargs)


def make_step(model, x, train):
    if not train:
        def step():
            with torch.inference_mode():
                model(x)
        return step
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    target = torch.randint(0, getattr(model, 'num_classes', 1000), (x.shape[0],))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
    return step


def bench(contenders, batch, img, rounds, train):
    """images/s of each ``{label: model factory}``, timed in interleaved rounds (median per batch)."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, img, img)
    steps = {}
    for label, factory in contenders.items():
        model = factory().train(train)
        steps[label] = make_step(model, x, train)
        steps[label]()  # warm-up (twice: allocator and oneDNN primitive caches)
        steps[label]()
    times = {label: [] for label in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - t0)
    return {label: batch / statistics.median(t) for label, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=['visionattn_*'], help='names or patterns')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--img', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--train', action='store_true', help='time a training step instead of inference')
    parser.add_argument('--official', action='store_true',
                        help='also time the official-code transcription where the tests have one')
    parser.add_argument('--save', action='store_true', help='merge results into model_cards/measurements.json')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = []
    for pattern in args.models:
        matched = timm.list_models(pattern) if '*' in pattern else [pattern]
        if not matched or not all(timm.is_model(m) for m in matched):
            parser.error(f'--models {pattern!r}: no registered model matches')
        names += [m for m in matched if m not in names]
    mode = 'train step' if args.train else 'inference'
    # with OMP_WAIT_POLICY=PASSIVE every parallel op pays a thread wake-up: models of many small ops slow down
    print(f'{mode}, batch {args.batch}, {args.img}x{args.img}, fp32, {torch.get_num_threads()} threads '
          f'(OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY", "unset")}), median of {args.rounds} interleaved rounds')
    print(f'{"model":36s} {"ours img/s":>11s} {"peak %":>7s} {"reference":>32s} {"ref img/s":>10s} {"ratio":>6s}'
          + (f' {"official img/s":>15s} {"vs official":>11s}' if args.official else ''))
    peak = matmul_peak_gflops()
    passes = 3 if args.train else 1  # forward + backward ~ 3 forward passes
    results = {}
    for name in names:
        ref = reference_for(name)
        contenders = {'ours': lambda: create_at(name, args.img)}
        if ref:
            contenders['timm'] = lambda: create_at(ref, args.img)
        if args.official and name in OFFICIAL:
            contenders['official'] = lambda: official_model(name)
        ips = bench(contenders, args.batch, args.img, args.rounds, args.train)
        ratio = ips['ours'] / ips['timm'] if 'timm' in ips else None
        vs_official = ips['ours'] / ips['official'] if 'official' in ips else None
        macs = gmacs(timm.create_model(name, device='meta').eval(), (args.img, args.img))
        share = 100 * passes * 2 * macs * ips['ours'] / peak
        line = (f'{name:36s} {ips["ours"]:11.1f} {share:7.1f} {ref or "—":>32s} {ips.get("timm", float("nan")):10.1f} '
                f'{f"{ratio:.2f}" if ratio else "—":>6s}')
        if args.official:
            line += f' {ips.get("official", float("nan")):15.1f} {f"{vs_official:.2f}" if vs_official else "—":>11s}'
        print(line, flush=True)
        key = 'train_' if args.train else ''
        results[name] = {f'{key}img_per_s': round(ips['ours'], 2), f'{key}reference': ref,
                         f'{key}ratio_vs_timm': round(ratio, 3) if ratio else None,
                         f'{key}share_of_matmul_peak': round(share / 100, 3),
                         f'{key}setup': f'batch {args.batch}, {args.img}px, fp32, {torch.get_num_threads()} threads'}
        if vs_official:
            results[name][f'{key}ratio_vs_official'] = round(vs_official, 3)
    print(f'fp32 matmul peak (2048², {torch.get_num_threads()} threads): {peak:.1f} GFLOP/s')
    if args.save:
        path = ROOT / 'model_cards' / 'measurements.json'
        data = json.loads(path.read_text()) if path.exists() else {}
        for name, values in results.items():
            data.setdefault(name, {}).update(values)
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + '\n')
        print(f'saved {path}')


if __name__ == '__main__':
    main()
