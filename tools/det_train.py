#!/usr/bin/env python
"""Train (and evaluate) an mmdet detector with a visionattn backbone: a thin wrapper over mmengine's Runner.

    python tools/det_train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--pretrained CKPT]
                              [--max-minutes M] [--cfg-options key=value ...]

* Every ``torch.load`` in the process reads with ``weights_only=True`` (``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``):
  ``--pretrained``, ``init_cfg``, ``load_from`` and ``--resume`` are files a user gives. The runner's
  own checkpoints are written without pickled Python objects
  (``visionattn.det.checkpoint.WeightsOnlyCheckpointHook``) so that resuming them needs nothing more.
* A config with a ``shapes_dataset = dict(root=..., ...)`` entry gets its synthetic dataset
  generated first (``tools/make_shapes_dataset.py``), so the embedded job needs no download.
* ``--pretrained`` sets ``model.backbone.init_cfg`` to that checkpoint (classification checkpoint,
  official checkpoint or ``tools/export.py`` output).
* ``OMP_WAIT_POLICY=PASSIVE`` is set (unless already set): idle OpenMP threads sleep instead of
  spinning, which matters on a shared CPU.
* ``--max-minutes`` (or ``time_budget_minutes`` in the config) stops training when the budget is
  spent and still evaluates. With ``time_schedule = dict(warmup_iters=..., min_lr_ratio=...)`` in
  the config (and ``param_scheduler = None``) the learning rate follows a linear warm-up and then
  a cosine over the *time* budget instead of over iterations, so a slower or busier machine still
  ends its run annealed (the job is "train for N minutes", whatever the speed).
Prints the final COCO metrics and the wall time, and writes them to ``WORK_DIR/summary.json``.
"""
import json
import math
import os
import sys
import time
from pathlib import Path

if os.environ.pop('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', None):
    print('det_train: ignoring TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: checkpoints are read with weights_only=True',
          file=sys.stderr)
os.environ['TORCH_FORCE_WEIGHTS_ONLY_LOAD'] = '1'
# idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads made a
# training step ~10x slower in CPU time (measured: 2.9 s vs 0.2 s for the shapes backbone step)
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / 'tools')):
    if p not in sys.path:
        sys.path.insert(0, p)


def parse_args(argv=None):
    from mmengine.config import DictAction
    from visionattn.train.errors import ArgumentParser
    ap = ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('config')
    ap.add_argument('--work-dir', default=None, help='default: output/det/<config name>')
    ap.add_argument('--resume', nargs='?', const='auto', default=None,
                    help='resume from CKPT, or from the latest checkpoint in the work dir')
    ap.add_argument('--pretrained', default=None, help='backbone checkpoint for init_cfg')
    ap.add_argument('--max-minutes', type=float, default=None, help='training time budget')
    ap.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: all cores)')
    ap.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    return ap.parse_args(argv)


def load_error(error, cfg):
    """One line for a checkpoint that torch.load(weights_only=True) refused."""
    refused = ' '.join(str(error).split('WeightsUnpickler error:')[-1].split())[:300]
    init = cfg.model.get('backbone', {}).get('init_cfg')
    files = [f for f in (cfg.get('load_from'), init.get('checkpoint') if isinstance(init, dict) else None) if f]
    hint = (' (a checkpoint written by mmengine without visionattn.det.checkpoint.WeightsOnlyCheckpointHook '
            'holds HistoryBuffer objects)' if 'HistoryBuffer' in refused else '')
    return (f"a checkpoint ({'; '.join(files) or 'see the config'}) pickles Python objects other than tensors "
            f"and is refused, as every checkpoint is read with torch.load(weights_only=True){hint}: {refused}")


def main(argv=None) -> int:
    import pickle
    args = parse_args(argv)
    if not os.path.isfile(args.config):
        print(f'ERROR: config {args.config} does not exist', file=sys.stderr)
        return 2
    if args.pretrained and not os.path.isfile(args.pretrained):
        print(f'ERROR: --pretrained {args.pretrained} does not exist', file=sys.stderr)
        return 2
    from mmengine.config import Config
    cfg = Config.fromfile(args.config)
    try:
        return run(args, cfg)
    except pickle.UnpicklingError as e:
        print(f'ERROR: {load_error(e, cfg)}', file=sys.stderr)
    except (ValueError, FileNotFoundError) as e:  # checkpoint / config problems (visionattn.det.convert, mmengine)
        print(f"ERROR: {' '.join(str(e).split())[:600]}", file=sys.stderr)
    return 2


def run(args, cfg) -> int:
    """Train and evaluate ``cfg`` (already read from ``args.config``); returns the exit code."""
    import torch
    from mmengine.hooks import Hook
    from mmengine.runner import Runner
    from visionattn.det.checkpoint import WeightsOnlyCheckpointHook, weights_only_runner_checkpoints

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or os.path.join('output', 'det', Path(args.config).stem)
    if args.pretrained:
        cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=args.pretrained)
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume:
        cfg.resume, cfg.load_from = True, args.resume
    if cfg.get('shapes_dataset'):
        from make_shapes_dataset import ensure_dataset
        t0 = time.time()
        ensure_dataset(**cfg.shapes_dataset)
        print(f'shapes dataset ready under {cfg.shapes_dataset["root"]} ({time.time() - t0:.1f} s)', flush=True)

    budget = args.max_minutes if args.max_minutes is not None else cfg.get('time_budget_minutes')
    state = {}

    class _Record(Hook):
        priority = 'VERY_LOW'

        def before_train(self, runner):
            state['t_train'] = time.time()

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if budget and time.time() - state['t_train'] > budget * 60 and not runner.train_loop.stop_training:
                runner.logger.info(f'time budget of {budget} min spent at iteration {runner.iter + 1}: stopping')
                runner.train_loop.stop_training = True

        def after_val_epoch(self, runner, metrics=None):
            state['metrics'] = dict(metrics or {})
            state['val_iter'] = runner.iter

    schedule = cfg.get('time_schedule')
    if schedule and not budget:
        raise ValueError('time_schedule needs a time budget (time_budget_minutes or --max-minutes)')

    class _TimeSchedule(Hook):
        priority = 'HIGH'

        def before_train(self, runner):
            self.base = [g.setdefault('initial_lr', g['lr']) for g in runner.optim_wrapper.param_groups]

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            frac = min(1.0, max((time.time() - state['t_train']) / (budget * 60),
                                runner.iter / runner.train_loop.max_iters))
            warm = min(1.0, (runner.iter + 1) / max(1, schedule.get('warmup_iters', 0)))
            low = schedule.get('min_lr_ratio', 0.01)
            factor = warm * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * frac)))
            for g, base in zip(runner.optim_wrapper.param_groups, self.base):
                g['lr'] = base * factor

    start = time.time()
    runner = Runner.from_cfg(cfg)
    runner.register_hook(_Record())
    runner.register_hook(WeightsOnlyCheckpointHook())
    if schedule:
        runner.register_hook(_TimeSchedule())
    with weights_only_runner_checkpoints():
        runner.train()
        train_s = time.time() - state.get('t_train', start)
        if runner.iter < runner.train_loop.max_iters:  # stopped by the time budget: keep a resumable checkpoint
            runner.save_checkpoint(cfg.work_dir, f'iter_{runner.iter}.pth')
            with open(os.path.join(cfg.work_dir, 'last_checkpoint'), 'w') as f:  # what --resume picks up
                f.write(os.path.join(cfg.work_dir, f'iter_{runner.iter}.pth'))
        if state.get('val_iter') != runner.iter and runner.val_loop is not None:
            runner.val_loop.run()
    wall = time.time() - start
    metrics = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in state.get('metrics', {}).items()}
    summary = dict(config=args.config, iterations=runner.iter, train_seconds=round(train_s, 1),
                   wall_seconds=round(wall, 1), metrics=metrics)
    with open(os.path.join(cfg.work_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    box = metrics.get('coco/bbox_mAP')
    print(f'det_train: {runner.iter} iterations, train {train_s / 60:.1f} min, wall {wall / 60:.1f} min; '
          + (f'bbox mAP {box:.3f} (mAP50 {metrics.get("coco/bbox_mAP_50", float("nan")):.3f})' if box is not None
             else f'metrics {metrics}'), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
