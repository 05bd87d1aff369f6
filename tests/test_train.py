"""tools/train.py and tools/validate.py: resume after SIGKILL, corrupt checkpoints, determinism, bad input, DDP.

Runs the scripts as subprocesses on timm's 0.1M-parameter ``test_efficientnet`` at 16 px on the digits tree, one torch
thread per process, so the module takes a few minutes on 2 CPU cores.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from visionattn.train import trainer as train
from visionattn.train.data import ensure_digits_folder
from visionattn.train.errors import UserInputError
from visionattn.train.model import create_model

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / 'tools'

ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
MODEL = ['--model', 'test_efficientnet', '--img-size', '16', '--batch-size', '64', '--workers', '0', '--seed', '1']
RUN_TIMEOUT = 600


def run_tool(script, *args, expect_rc=0):
    """Run a tool as a subprocess; return its combined output, checking the exit code."""
    proc = subprocess.run([sys.executable, str(TOOLS / script), *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == expect_rc, output[-3000:]
    return output


def summary(run_dir):
    with open(Path(run_dir) / 'summary.csv') as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    return ensure_digits_folder(str(tmp_path_factory.mktemp('data') / 'digits'))


@pytest.fixture(scope='module')
def job(digits, tmp_path_factory):
    """Arguments of a 2-epoch job with EMA, mixup and recovery checkpoints every 4 batches."""
    out = tmp_path_factory.mktemp('runs')
    return out, ['--data-dir', digits, *MODEL, '--epochs', '2', '--model-ema', '--model-ema-decay', '0.9',
                 '--mixup', '0.2', '--recovery-interval', '4', '--checkpoint-hist', '2', '--output', out]


@pytest.fixture(scope='module')
def full_run(job):
    """The uninterrupted reference run."""
    out, args = job
    run_tool('train.py', *args, '--experiment', 'full')
    return out / 'full'


def test_default_job_config_file_matches_embedded_job():
    embedded, _, _ = train.parse_args([])
    from_file, _, _ = train.parse_args(['-c', str(ROOT / 'configs/cls/digits_default.yaml')])
    assert {k: v for k, v in vars(embedded).items() if k != 'config'} == \
        {k: v for k, v in vars(from_file).items() if k != 'config'}
    assert embedded.model.startswith('visionattn_')


def test_run_outputs_and_weights_only_checkpoints(full_run):
    for name in ('args.yaml', 'summary.csv', 'curves.png', 'log.txt', 'last.pth.tar', 'model_best.pth.tar',
                 'checkpoint-0.pth.tar', 'checkpoint-1.pth.tar'):
        assert (full_run / name).is_file(), name
    assert not list(full_run.glob('recovery-*')), 'recovery files are removed once their epoch is checkpointed'
    ckpt = torch.load(full_run / 'last.pth.tar', weights_only=True)
    assert ckpt['arch'] == 'test_efficientnet' and ckpt['epoch'] == 1 and ckpt['epoch_complete']
    assert isinstance(ckpt['args'], dict) and ckpt['class_names'] == [str(i) for i in range(10)]
    assert {'state_dict', 'state_dict_ema', 'optimizer', 'scheduler', 'rng'} <= set(ckpt)
    assert yaml.safe_load((full_run / 'args.yaml').read_text())['model'] == 'test_efficientnet'
    rows = summary(full_run)
    assert [r['epoch'] for r in rows] == [0, 1] and rows[-1]['eval_top1'] > 15  # above chance (10 %)


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_mid_epoch_then_resume_matches_uninterrupted(job, full_run, sig):
    """SIGKILL: resume from the last periodic recovery file. SIGINT / SIGTERM: a recovery checkpoint is written at
    the next batch, one line says how to resume, exit 130 / 143 without a traceback. Resuming gives the
    uninterrupted run's numbers."""
    out, args = job
    run_dir = out / f'stopped-{sig.name}'
    proc = subprocess.Popen([sys.executable, str(TOOLS / 'train.py'), *map(str, args), '--experiment', run_dir.name],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + RUN_TIMEOUT
    while not list(run_dir.glob('recovery-1-*.pth.tar')):  # a mid-epoch checkpoint of the second epoch
        assert proc.poll() is None and time.time() < deadline, 'run ended before reaching epoch 1'
        time.sleep(0.05)
    proc.send_signal(sig)
    output = proc.communicate(timeout=RUN_TIMEOUT)[0]
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + sig, output[-3000:]
        assert 'Traceback' not in output and f'continue with: python tools/train.py --resume {run_dir}' in output, \
            output[-3000:]

    output = run_tool('train.py', '--resume', run_dir)
    assert 'resumed from' in output and 'recovery-1-' in output, output[-2000:]
    expected, resumed = summary(full_run), summary(run_dir)
    assert len(resumed) == len(expected) == 2
    for key in ('train_loss', 'eval_loss', 'eval_top1', 'ema_eval_loss', 'ema_eval_top1'):
        assert resumed[-1][key] == pytest.approx(expected[-1][key], rel=1e-5, abs=1e-5), key


def test_corrupt_latest_checkpoint(full_run, tmp_path):
    run_dir = tmp_path / 'corrupt'
    run_dir.mkdir()
    for f in full_run.glob('*.pth.tar'):
        (run_dir / f.name).write_bytes(f.read_bytes())
    last = run_dir / 'last.pth.tar'
    last.write_bytes(last.read_bytes()[:len(last.read_bytes()) // 2])  # truncated, as by a dying disk

    output = run_tool('train.py', '--resume', last, '--epochs', '3', expect_rc=2)
    assert 'unreadable' in output and str(last) in output

    output = run_tool('train.py', '--resume', run_dir, '--epochs', '3')
    assert f'skipping checkpoint {last} is unreadable' in output
    assert f"falling back to {run_dir / 'checkpoint-1.pth.tar'}" in output
    assert [r['epoch'] for r in summary(run_dir)] == [0, 1, 2], 'continued, not restarted from scratch'

    for f in run_dir.glob('*.pth.tar'):
        f.write_bytes(b'not a checkpoint')
    output = run_tool('train.py', '--resume', run_dir, expect_rc=2)
    assert 'no readable checkpoint' in output


def test_same_seed_same_first_epoch_loss(digits, tmp_path):
    """Augmentation is seeded per sample, so even the worker count does not change the loss."""
    base = ['--data-dir', digits, *MODEL, '--epochs', '1', '--output', tmp_path]
    run_tool('train.py', *base, '--experiment', 'a')
    run_tool('train.py', *base, '--experiment', 'b', '--workers', '2')
    run_tool('train.py', *base, '--experiment', 'c', '--seed', '2')
    loss = {name: summary(tmp_path / name)[0]['train_loss'] for name in 'abc'}
    assert loss['a'] == loss['b']
    assert loss['a'] != loss['c']


@pytest.fixture
def bad_data(digits, tmp_path):
    """Copies of the digits tree broken in different ways."""
    import shutil
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    (tmp_path / 'empty' / 'val').mkdir()
    shutil.copytree(digits, tmp_path / 'mismatch')
    os.rename(tmp_path / 'mismatch' / 'val' / '9', tmp_path / 'mismatch' / 'val' / 'nine')
    shutil.copytree(digits, tmp_path / 'broken')
    (tmp_path / 'broken' / 'train' / '3' / 'not_an_image.png').write_bytes(b'garbage')
    good = next((tmp_path / 'broken' / 'train' / '4').iterdir())
    (tmp_path / 'broken' / 'train' / '4' / 'truncated.png').write_bytes(good.read_bytes()[:40])
    (tmp_path / 'cfg.yaml').write_text('model: test_efficientnet\nlearning_rate: 0.1\n')
    return tmp_path


def make_trainer(*argv):
    args, ckpt, resume_file = train.parse_args([str(a) for a in argv])
    return train.Trainer(args, ckpt, resume_file)


@pytest.mark.parametrize('argv, message', [
    (['--data-dir', '{bad}/nope'], r'data folder .*/nope does not exist'),
    (['--data-dir', '{bad}/empty'], r'data folder .*/empty/train contains no images'),
    (['--data-dir', '{bad}/mismatch'], r"class folders differ .*only in train \['9'\], only in val \['nine'\]"),
    (['--data-dir', '{digits}', '--model', 'visionattn_nosuchnet'], r"unknown model 'visionattn_nosuchnet'"),
    (['-c', '{bad}/cfg.yaml'], r"unknown key 'learning_rate' in config"),
], ids=['missing folder', 'empty folder', 'class mismatch', 'unknown model', 'unknown config key'])
def test_bad_input_errors(bad_data, digits, argv, message):
    argv = [a.format(bad=bad_data, digits=digits) for a in argv]
    with pytest.raises(UserInputError, match=message):
        make_trainer(*MODEL, '--output', bad_data / 'out', *argv)


def test_csv_datasets(digits, tmp_path):
    from visionattn.train.data import build_datasets
    for split in ('train', 'val'):
        rows = [f'{p.relative_to(digits)},digit{p.parent.name}\n' for p in sorted(Path(digits, split).glob('[0-4]/*'))]
        (Path(digits) / f'{split}.csv').write_text('path,label\n' + ''.join(rows))
    args, _, _ = train.parse_args(['--train-csv', f'{digits}/train.csv', '--val-csv', f'{digits}/val.csv'])
    train_ds, val_ds, classes = build_datasets(args)
    assert classes == [f'digit{i}' for i in range(5)] and len(val_ds) < len(train_ds)
    image, target = train_ds[0]
    assert image.mode == 'RGB' and 0 <= target < 5
    (tmp_path / 'val.csv').write_text(f'path,label\n{digits}/val/9/{os.listdir(f"{digits}/val/9")[0]},digit9\n')
    args.val_csv = str(tmp_path / 'val.csv')
    with pytest.raises(UserInputError, match=r"labels not present in .*train.csv: \['digit9'\]"):
        build_datasets(args)


def test_unreadable_image_is_named_or_skipped(bad_data):
    base = ['--data-dir', bad_data / 'broken', *MODEL, '--epochs', '1', '--output', bad_data / 'out']
    output = run_tool('train.py', *base, '--experiment', 'strict', '--workers', '1', expect_rc=2)
    errors = [line for line in output.splitlines() if 'ERROR' in line]
    assert len(errors) == 1 and '2 unreadable image(s)' in errors[0], output[-2000:]
    assert 'not_an_image.png' in errors[0] and 'truncated.png' in errors[0], errors[0]  # all named, up front
    assert not list((bad_data / 'out' / 'strict').glob('*.pth.tar')) and 'epoch 0' not in output, output[-2000:]
    output = run_tool('train.py', *base, '--experiment', 'skip', '--skip-bad-images')
    assert 'skipped 2 unreadable image(s)' in output


def test_checkpoint_of_another_architecture(full_run, digits, tmp_path):
    with pytest.raises(UserInputError, match=r'is for model test_efficientnet, not --model test_resnet'):
        make_trainer('--resume', full_run, '--model', 'test_resnet')
    with pytest.raises(UserInputError, match=r'do not fit model test_resnet'):
        create_model('test_resnet', 10, pretrained_path=str(full_run / 'last.pth.tar'))
    output = run_tool('validate.py', full_run / 'last.pth.tar', '--model', 'test_resnet', '--data-dir', digits,
                      expect_rc=2)
    assert 'is for model test_efficientnet, not --model test_resnet' in output


def test_pretrained_path_loads_body_and_replaces_classifier(full_run):
    ckpt = torch.load(full_run / 'last.pth.tar', weights_only=True)
    model = create_model('test_efficientnet', 4, pretrained_path=str(full_run / 'last.pth.tar'))
    state = model.state_dict()
    assert state['classifier.weight'].shape[0] == 4
    # timm's file loader prefers the EMA weights when a checkpoint has them
    assert all(torch.equal(v, ckpt['state_dict_ema'][k]) for k, v in state.items() if not k.startswith('classifier.'))


def test_validate_checkpoint(full_run, digits, tmp_path):
    rows = summary(full_run)
    for extra, key in (([], 'eval_top1'), (['--use-ema'], 'ema_eval_top1')):
        results = tmp_path / 'results.json'
        run_tool('validate.py', full_run / 'last.pth.tar', '--data-dir', digits, '--workers', '0', *extra,
                 '--confusion-matrix', tmp_path / 'cm.png', '--results-file', results)
        metrics = json.loads(results.read_text())
        assert metrics['count'] == 360 and metrics['img_per_sec'] > 0
        assert metrics['top1'] == pytest.approx(rows[-1][key], abs=1e-3)
        assert metrics['top5'] >= metrics['top1'] and metrics['loss'] > 0
    assert (tmp_path / 'cm.png').stat().st_size > 1000


def test_ddp_two_cpu_processes(digits, tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(TOOLS / 'train.py'), '--data-dir', digits, *MODEL, '--batch-size', '32', '--epochs', '1',
           '--recovery-interval', '5', '--output', tmp_path, '--experiment', 'ddp']
    proc = subprocess.run(list(map(str, cmd)), env=ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-12000:]
    assert '2 process(es)' in proc.stderr
    ckpt = torch.load(tmp_path / 'ddp' / 'last.pth.tar', weights_only=True)
    assert len(ckpt['rng']) == 2 and ckpt['num_updates'] == 1437 // 2 // 32
    model = create_model('test_efficientnet', 10)
    model.load_state_dict(ckpt['state_dict'])
    results = tmp_path / 'results.json'
    run_tool('validate.py', tmp_path / 'ddp' / 'last.pth.tar', '--data-dir', digits, '--workers', '0',
             '--results-file', results)
    assert json.loads(results.read_text())['top1'] == pytest.approx(summary(tmp_path / 'ddp')[0]['eval_top1'],
                                                                    abs=1e-3)


def test_progress_lines_off_terminal_topk_and_empty_class_folder(digits, tmp_path):
    """Output piped (not a terminal): a progress line per interval for training and evaluation; 3 classes report
    top-3, not top-5; an empty class folder is named in a warning."""
    import shutil
    data = tmp_path / 'three'
    for split in ('train', 'val'):
        for cls in ('0', '1', '2'):
            shutil.copytree(Path(digits, split, cls), data / split / cls)
        (data / split / 'unlabelled').mkdir()
    output = run_tool('train.py', '--data-dir', data, *MODEL, '--batch-size', '32', '--epochs', '1',
                      '--progress-interval', '0', '--output', tmp_path / 'out')
    train_lines = [line for line in output.splitlines() if 'epoch 0: ' in line and ' batches (' in line]
    eval_lines = [line for line in output.splitlines() if 'eval: ' in line and ' batches (' in line]
    assert len(train_lines) >= 3 and 'loss' in train_lines[0] and '100%' in train_lines[-1], output[-3000:]
    assert eval_lines and '100%' in eval_lines[-1], output[-3000:]
    assert 'top-3' in output and 'top-5' not in output, output[-3000:]
    assert 'class folder(s) without images' in output and 'unlabelled' in output, output[-3000:]
