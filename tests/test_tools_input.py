"""Files and arguments a user gives to train / validate / export: no pickle runs code, every bad file or value is
one clear error (``ERROR:`` line, exit 2), export takes official and narrowed train checkpoints.

The checks run in-process on the library functions the tools call, plus one subprocess per tool for the exact
command-line contract (one ``ERROR:`` line, exit 2, no traceback).
"""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from layouts import load_layout, random_state_dict
from visionattn.train import export, trainer, validate
from visionattn.train.checkpoint import read_weights
from visionattn.train.data import build_datasets, build_eval_dataset, ensure_digits_folder
from visionattn.train.errors import UserInputError
from visionattn.train.model import create_model

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
NARROW = trainer.DEFAULT_JOB['model_kwargs']  # the README main job's narrowed DaViT


class WritesMarker:
    """Unpickling this runs ``Path(marker).touch()``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


@pytest.fixture
def evil(tmp_path):
    """A checkpoint whose pickle writes a marker file, and that marker's path."""
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'x': torch.zeros(1)}, 'arch': 'visionattn_davit_tiny',
                'payload': WritesMarker(str(marker))}, path)
    return path, marker


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    return ensure_digits_folder(str(tmp_path_factory.mktemp('data') / 'digits'))


def run_tool(script, *args):
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / script), *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr


def assert_one_error_line(rc, output, *needles):
    errors = [line for line in output.splitlines() if line.startswith('ERROR:')]
    assert rc == 2 and len(errors) == 1 and 'Traceback' not in output, output[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


# ------------------------------------------------------------------------------------------- no code runs
def test_malicious_pickle_never_runs_in_the_library_paths(evil):
    path, marker = evil
    with pytest.raises(UserInputError, match='pickles Python objects'):
        read_weights(path)
    with pytest.raises(UserInputError, match='pickles Python objects'):
        create_model('visionattn_davit_tiny', 10, pretrained_path=str(path), **NARROW)
    with pytest.raises(UserInputError, match='pickles Python objects'):
        validate.load_model(validate.build_parser().parse_args([str(path), '--model', 'visionattn_davit_tiny']))
    with pytest.raises(UserInputError, match='pickles Python objects'):
        export.export(export.build_parser().parse_args([str(path), '--model', 'visionattn_davit_tiny']))
    with pytest.raises(UserInputError, match='pickles Python objects'):
        trainer.parse_args(['--resume', str(path)])
    with pytest.raises(Exception, match='weights_only=True blocked|[Ww]eights only load failed'):  # timm's own loader, weights_only=True
        timm.create_model('visionattn_davit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert not marker.exists()


def test_training_args_namespace_loads_but_not_what_it_hides(tmp_path):
    """Official DeiT-style checkpoints pickle their argparse ``args``: readable, its values still weights-only."""
    sd = timm.create_model('visionattn_davit_tiny', **NARROW).state_dict()
    path = tmp_path / 'best.pth'
    torch.save({'model': sd, 'epoch': 299, 'args': argparse.Namespace(model='x', lr=1e-3, sizes=[224])}, path)
    assert read_weights(path)['args'].lr == 1e-3
    model = timm.create_model('visionattn_davit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **NARROW)
    assert torch.equal(model.state_dict()['head.fc.weight'], sd['head.fc.weight'])
    marker = tmp_path / 'pwned'
    torch.save({'model': sd, 'args': argparse.Namespace(payload=WritesMarker(str(marker)))}, path)
    with pytest.raises(UserInputError, match='pickles Python objects'):
        read_weights(path)
    with pytest.raises(Exception, match='weights_only=True blocked|[Ww]eights only load failed'):
        timm.create_model('visionattn_davit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          **NARROW)
    assert not marker.exists()


@pytest.mark.parametrize('tool, args', [
    ('train.py', ['--pretrained-path', '{evil}', '--data-dir', '{digits}', '--model', 'test_efficientnet']),
    ('train.py', ['--resume', '{evil}']),
    ('validate.py', ['{evil}', '--model', 'visionattn_davit_tiny', '--data-dir', '{digits}']),
    ('export.py', ['{evil}', '--model', 'visionattn_davit_tiny']),
], ids=['train-pretrained', 'train-resume', 'validate', 'export'])
def test_malicious_pickle_cli(evil, digits, tool, args):
    path, marker = evil
    rc, output = run_tool(tool, *[a.format(evil=path, digits=digits) for a in args])
    assert_one_error_line(rc, output, str(path), 'pickles Python objects')
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- bad weights files
def bad_weight_files(tmp_path):
    """{name: path} of files that must be refused for visionattn_davit_tiny (narrowed) with a message naming them."""
    model = timm.create_model('visionattn_davit_tiny', num_classes=10, **NARROW)
    sd = model.state_dict()
    files = {'empty': b'', 'text': b'this is not a checkpoint\n'}
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f'{name}.pth'
        paths[name].write_bytes(data)
    variants = {
        'missing key': {k: v for k, v in list(sd.items())[1:]},
        'extra key': {**sd, 'stages.9.extra.weight': torch.zeros(3)},
        'wrong shape': {k: (v[:-1] if k == 'stem.conv.weight' else v) for k, v in sd.items()},
        'wrong architecture': timm.create_model('test_efficientnet', num_classes=10).state_dict(),
    }
    for name, state_dict in variants.items():
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.pth"
        torch.save(state_dict, paths[name])
    return paths


def test_bad_weights_files_are_one_clear_error(tmp_path):
    for name, path in bad_weight_files(tmp_path).items():
        message = f'{path}'
        with pytest.raises(UserInputError, match=message) as train_err:
            create_model('visionattn_davit_tiny', 10, pretrained_path=str(path), **NARROW)
        with pytest.raises(UserInputError, match=message):
            validate.load_model(validate.build_parser().parse_args(
                [str(path), '--model', 'visionattn_davit_tiny', '--num-classes', '10', '--model-kwargs',
                 *[f'{k}={v}' for k, v in NARROW.items()]]))
        with pytest.raises(UserInputError) as export_err:
            export.export(export.build_parser().parse_args(
                [str(path), '--model', 'visionattn_davit_tiny', '-o', str(tmp_path / 'out'), '--model-kwargs',
                 *[f'{k}={v}' for k, v in NARROW.items()]]))
        assert str(path) in str(export_err.value), (name, export_err.value)
        if name == 'empty':
            assert 'empty' in str(train_err.value)
    assert not list(tmp_path.glob('out*'))  # nothing written for a refused input


def test_bad_weights_cli(tmp_path):
    path = bad_weight_files(tmp_path)['text']
    rc, output = run_tool('export.py', path, '--model', 'visionattn_davit_tiny')
    assert_one_error_line(rc, output, str(path), 'unreadable')


# ------------------------------------------------------------------------------------------- export
def test_export_official_davit_container_with_foreign_arch(tmp_path, capsys):
    """Official DaViT files record ``arch='DaViT_tiny'``: with or without --model they go through the filter."""
    sd = random_state_dict(load_layout('davit', 'DaViT_tiny'))
    path = tmp_path / 'davit_official.pth.tar'
    torch.save({'epoch': 300, 'arch': 'DaViT_tiny', 'state_dict': sd, 'version': 2}, path)
    for extra in ([], ['--model', 'visionattn_davit_tiny']):
        out = tmp_path / f'out{len(extra)}'
        assert export.main([str(path), '--format', 'safetensors', '-o', str(out), *extra]) == 0, capsys.readouterr()
        model = timm.create_model('visionattn_davit_tiny', num_classes=0, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=f'{out}.safetensors'))
        torch.testing.assert_close(model.stem.conv.weight, sd['patch_embeds.0.proj.weight'], rtol=0, atol=0)
    torch.save({'arch': 'x', 'state_dict': sd}, tmp_path / 'foreign.pth')
    assert export.main([str(tmp_path / 'foreign.pth')]) == 2
    assert "architecture 'x', which is not a visionattn model: pass --model" in capsys.readouterr().err


def test_export_narrowed_train_checkpoint_uses_its_model_kwargs(tmp_path, capsys):
    """What tools/train.py's main job writes: a narrowed model whose kwargs are recorded in ``args``."""
    model = timm.create_model('visionattn_davit_tiny', num_classes=10, **NARROW)
    ckpt = tmp_path / 'last.pth.tar'
    torch.save({'arch': 'visionattn_davit_tiny', 'epoch_complete': True, 'args': {'model_kwargs': NARROW},
                'state_dict': model.state_dict()}, ckpt)
    out = tmp_path / 'narrow'
    assert export.main([str(ckpt), '-o', str(out)]) == 0, capsys.readouterr()
    restored = timm.create_model('visionattn_davit_tiny', num_classes=0, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=f'{out}.safetensors'), **NARROW)
    for k, v in restored.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k], rtol=0, atol=0, msg=k)
    # --model-kwargs k=v (train.py's syntax) overrides what the checkpoint records: here into a misfit
    assert export.main([str(ckpt), '-o', str(tmp_path / 'bad'), '--model-kwargs', 'depths=(1, 1, 1, 1)']) == 2
    assert not list(tmp_path.glob('bad*'))


def test_export_never_overwrites_its_input(tmp_path, capsys):
    model = timm.create_model('visionattn_davit_tiny', num_classes=0, **NARROW)
    src = tmp_path / 'weights.safetensors'
    from safetensors.torch import save_file
    save_file(model.state_dict(), src)
    before = src.read_bytes()
    args = [str(src), '--model', 'visionattn_davit_tiny', '-o', str(tmp_path / 'weights'), '--model-kwargs',
            *[f'{k}={v}' for k, v in NARROW.items()]]
    assert export.main(args) == 2
    assert 'would overwrite the input' in capsys.readouterr().err and src.read_bytes() == before


# ------------------------------------------------------------------------------------------- data and config
def test_digits_config_with_a_user_folder_trains_on_it(digits, tmp_path):
    user = tmp_path / 'mydata'
    image = next((Path(digits) / 'train' / '0').glob('*.png')).read_bytes()
    for split in ('train', 'val'):
        for cls in ('cat', 'dog'):
            (user / split / cls).mkdir(parents=True)
            for i in range(2):
                (user / split / cls / f'{i}.png').write_bytes(image)
    before = sorted(p.relative_to(user) for p in user.rglob('*'))
    args, _, _ = trainer.parse_args(['-c', str(ROOT / 'configs/cls/digits_default.yaml'), '--data-dir', str(user)])
    assert args.dataset == 'digits'
    _, _, classes = build_datasets(args)
    assert classes == ['cat', 'dog']
    assert sorted(p.relative_to(user) for p in user.rglob('*')) == before  # nothing written, nothing removed


def test_img_size_reaches_fixed_size_models(digits, tmp_path):
    args, _, _ = trainer.parse_args(['--data-dir', digits, '--model', 'visionattn_convit_tiny', '--img-size', '32',
                                     '--model-kwargs', 'depth=2', 'local_up_to_layer=1', '--batch-size', '8', '--workers', '0',
                                     '--epochs', '1', '--output', str(tmp_path)])
    run = trainer.Trainer(args)
    assert run.model.patch_embed.img_size == (32, 32)
    images, target = next(iter(run.train_loader))
    assert images.shape[-2:] == (32, 32) and run.model(images).shape == (8, 10)


def test_validate_refuses_a_dataset_root_without_split(digits):
    args = validate.build_parser().parse_args(['x.pth', '--data-dir', digits, '--split', ''])
    with pytest.raises(UserInputError, match=r"--split '' but .* holds the split folders \['train', 'val'\]"):
        build_eval_dataset(args)
    args.data_dir = os.path.join(digits, 'val')  # a split folder itself is fine
    _, classes = build_eval_dataset(args)
    assert len(classes) == 10


@pytest.mark.parametrize('text, message', [
    ('epochs: [3\n', 'is not valid YAML'),
    ('epochs: three\n', "epochs: 'three': expected an integer"),
    ('amp: 1\n', 'amp: 1: expected true or false'),
    ('mean: [0.5, 0.5]\n', 'expected a list of 3 values'),
    ('opt: 3\n', 'opt: 3: expected a string'),
    ('interpolation: cubic\n', "expected one of ['nearest'"),
    ('model_kwargs: [1]\n', 'expected a mapping'),
])
def test_config_values_are_checked(tmp_path, text, message):
    path = tmp_path / 'cfg.yaml'
    path.write_text(text)
    with pytest.raises(UserInputError, match=re.escape(message)):
        trainer.parse_args(['-c', str(path)])


def test_config_numbers_written_as_yaml_strings_are_converted(tmp_path):
    path = tmp_path / 'cfg.yaml'
    path.write_text('lr: 1e-3\nepochs: 2\n')  # YAML 1.1 reads 1e-3 as a string
    args, _, _ = trainer.parse_args(['-c', str(path)])
    assert args.lr == 0.001 and args.epochs == 2


@pytest.mark.parametrize('args, needle', [
    (['--epochs', 'x'], "argument --epochs: invalid int value: 'x'"),
    (['--model-kwargs', 'depth'], "expected key=value items, got 'depth'"),
    (['--train-aug', '[a'], 'not valid YAML'),
])
def test_bad_arguments_are_one_error_line(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        trainer.build_parser().parse_args(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('ERROR:') and err.count('\n') == 1 and needle in err


def _load_tool(name):
    """The script ``tools/<name>.py`` as a module (the tools are scripts, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f'_{name}', ROOT / 'tools' / f'{name}.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize('args, needle', [
    (['--model', 'visionattn_nope'], "argument --model: 'visionattn_nope' is not a registered model"),
    (['--model', 'visionattn_ppma_tiny', '--img', '0'], 'argument --img: 0: expected H or H W'),
    (['--model', 'visionattn_ppma_tiny', '--batch', '0'], '--batch 0'),
    (['--model', 'visionattn_davit_tiny', '--official'], "no official transcription for 'visionattn_davit_tiny'"),
    (['--model', 'visionattn_biformer_tiny', '--model-kwargs', 'n_win'], "'n_win': expected KEY=VALUE"),
    (['--model', 'visionattn_biformer_tiny', '--model-kwargs', 'n_win=sixteen'], "'n_win=sixteen': expected KEY=VALUE"),
])
def test_benchmark_memory_bad_arguments_are_one_error_line(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        _load_tool('benchmark_memory').main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('ERROR:') and err.count('\n') == 1 and needle in err


@pytest.mark.parametrize('args, needle', [
    (['--models', 'visionattn_nope'], "argument --models: 'visionattn_nope' is not a registered model"),
    (['--models', 'visionattn_nat_mini', '--sizes', '16'], '--sizes 16'),
    (['--models', 'visionattn_nat_mini', '--rounds', '0'], '--rounds 0'),
])
def test_benchmark_scaling_bad_arguments_are_one_error_line(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        _load_tool('benchmark_scaling').main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('ERROR:') and err.count('\n') == 1 and needle in err
