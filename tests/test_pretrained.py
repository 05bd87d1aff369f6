"""``pretrained=True`` for every tag with weights, without network: timm's downloaders are patched to serve a
file this test writes in the source's layout and container (the official one, or timm's for its hub copies).

Each tag must request exactly its configured source, load the file strictly (every tensor equal to the remapped
file), and give the same logits as the same file loaded through ``pretrained_cfg_overlay=dict(file=...)``.
"""
import argparse
import re
import shutil
import urllib.parse

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import visionattn
from layouts import NAME_MAP, load_layout, random_state_dict
from official_checks import family_filter
from visionattn.train import validate
from visionattn.train.errors import UserInputError
from visionattn.train.model import create_pretrained

TAGGED = timm.list_pretrained('visionattn_*')
VARIANT = {model: key.split('/', 1) for key, model in NAME_MAP.items()}  # visionattn name -> [family, official variant]
# where each family's released weights live: the official host, or timm's converted copies on the HF hub
HF_HUB = {'ppma': 'ZhongchenZhao/PPMA', 'davit': 'timm', 'twins': 'timm', 'convit': 'timm'}
URL_HOST = {'nat': 'shi-labs.com'}


def _short(name):
    return timm.models.split_model_name_tag(name)[0].removeprefix('visionattn_')


def test_every_family_with_a_direct_download_has_tags():
    tagged = {timm.models.split_model_name_tag(n)[0] for n in TAGGED}
    for model in visionattn.list_models():
        module = timm.models._registry._model_to_module[model]
        if module in ('nat', 'ppma'):  # direct official downloads for every variant
            assert model in tagged, model
        elif module == 'cnn_attention':  # CBAM / Triplet weights are Google Drive share pages, ELA has none
            assert model not in tagged and timm.models.get_pretrained_cfg(model).notes, model
    assert {VARIANT[timm.models.split_model_name_tag(n)[0]][0] for n in TAGGED} == set(HF_HUB) | set(URL_HOST)


@pytest.mark.parametrize('name', TAGGED)
def test_tag_points_at_the_official_file(name):
    cfg = timm.models.get_pretrained_cfg(name)
    family = VARIANT[timm.models.split_model_name_tag(name)[0]][0]
    short = _short(name)
    if family in URL_HOST:
        url = urllib.parse.urlsplit(cfg.url)
        assert (url.scheme, url.netloc) == ('https', URL_HOST[family]) and url.path.endswith('.pth'), cfg.url
        assert not cfg.hf_hub_id
        # every token of the variant name is in the file name (e.g. dinat_large_384_11x11 ->
        # dinat_large_in22k_in1k_384_11x11.pth), so no tag points at another size's file
        assert set(short.split('_')) <= set(url.path.rsplit('/', 1)[1][:-4].split('_')), cfg.url
        assert ('in22k' in url.path) == ('in22k' in cfg.tag) or short.startswith('dinat_s_large'), cfg.url
    elif HF_HUB[family] == 'timm':
        assert cfg.hf_hub_id == f'timm/{short}.{cfg.tag}' and not cfg.hf_hub_filename
    else:
        assert cfg.hf_hub_id == HF_HUB[family]
        size = short.split('_')[-1][0].upper()
        assert re.fullmatch(rf'checkpoints/classification/PPMA_{size}_\d{{12}}/best\.pth', cfg.hf_hub_filename)
    # the official eval settings travel with the tag
    assert cfg.num_classes == 1000 and cfg.input_size[0] == 3 and cfg.input_size[1] in (224, 384)
    assert 0.8 <= cfg.crop_pct <= 1.0 and cfg.interpolation in ('bicubic', 'bilinear')
    assert len(cfg.mean) == len(cfg.std) == 3 and cfg.license and cfg.origin_url.startswith('https://github.com/')


class Server:
    """Stands in for the network: answers torch.hub URL downloads and HF hub downloads with one local file."""

    def __init__(self, monkeypatch, tmp_path):
        self.dir, self.requests, self.path = tmp_path, [], None
        monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'torch_hub'))
        monkeypatch.setattr(torch.hub, 'download_url_to_file', self._url)
        monkeypatch.setattr(timm.models._hub, 'hf_hub_download', self._hf)

    def _url(self, url, dst, hash_prefix=None, progress=True):
        self.requests.append(url)
        shutil.copyfile(self.path, dst)

    def _hf(self, repo_id, filename, revision=None, cache_dir=None, **kwargs):
        self.requests.append((repo_id, filename))
        if filename.endswith('.safetensors') != str(self.path).endswith('.safetensors'):
            from huggingface_hub.utils import EntryNotFoundError
            raise EntryNotFoundError(f'{repo_id} has no {filename}')
        return str(self.path)

    def serve(self, obj, safetensors=False):
        self.path = self.dir / ('served.safetensors' if safetensors else 'served.pth')
        save_file(obj, self.path) if safetensors else torch.save(obj, self.path)
        return self.path


@pytest.fixture
def server(monkeypatch, tmp_path):
    yield Server(monkeypatch, tmp_path)
    # the served files and their download copies reach 0.8 GB per large variant: pytest keeps the temp
    # folders of its last runs, so they are removed here
    shutil.rmtree(tmp_path, ignore_errors=True)


def _weights(family, variant, seed=0, timm_layout=False):
    """Random tensors in the layout of a released file (BatchNorm variances positive, so the logits are finite)."""
    sd = random_state_dict(load_layout(family, variant, timm_layout), seed)
    return {k: v.abs() + 0.5 if k.endswith('running_var') else v for k, v in sd.items()}


def _release(name, seed=0):
    """(file contents as released, weights the model must end up with, safetensors?) for a tag."""
    family, variant = VARIANT[timm.models.split_model_name_tag(name)[0]]
    if family in URL_HOST:  # raw official state dict
        sd = _weights(family, variant, seed)
        return sd, sd, False
    if HF_HUB[family] == 'timm':  # timm's converted copy, model.safetensors
        sd = _weights(family, variant, seed, timm_layout=True)
        return sd, sd, True
    # PPMA best.pth: the official training script's whole checkpoint; the README accuracies are the EMA weights
    weights, ema = _weights(family, variant, seed), _weights(family, variant, seed + 1)
    ckpt = {'models': weights, 'model_ema': ema, 'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-5}]},
            'lr_scheduler': {'t_initial': 300}, 'epoch': 299, 'scaler': {'scale': 65536.0},
            'args': argparse.Namespace(model=variant, lr=1e-3, output_dir='out', model_ema=True),
            'max_accuracy': 82.58, 'max_accuracy_ema': 82.6}
    return ckpt, ema, False


def _expected_request(cfg):
    if cfg.hf_hub_filename:
        return (cfg.hf_hub_id, cfg.hf_hub_filename)
    return (cfg.hf_hub_id, 'model.safetensors') if cfg.hf_hub_id else cfg.url


def _input(cfg):
    side = cfg.input_size[1] if cfg.fixed_input_size else 64
    return torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('name', TAGGED)
def test_pretrained_downloads_and_loads_the_official_file(server, name):
    release, weights, safetensors = _release(name)
    path = server.serve(release, safetensors)
    torch.manual_seed(1)
    model = timm.create_model(name, pretrained=True).eval()
    cfg = timm.models.get_pretrained_cfg(name)
    assert server.requests == [_expected_request(cfg)]
    expected = family_filter(model)(dict(weights), model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    torch.manual_seed(2)  # another init: equal logits need the file's weights in both models
    overlay = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = _input(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(x), overlay(x), rtol=0, atol=0)


def test_a_file_of_another_architecture_fails_with_the_filter_message(server):
    server.serve(_weights('nat', 'nat_tiny'))  # NAT-T weights behind NAT-M's URL
    with pytest.raises(ValueError, match=r'NAT checkpoint does not match NAT: 156 unexpected keys: '
                                         r'stages\.2\.blocks\.6\.'):
        timm.create_model('visionattn_nat_mini.in1k', pretrained=True)
    with pytest.raises(UserInputError, match=r'the weights of visionattn_nat_mini from https://shi-labs\.com/\S+ '
                                             r'do not fit the model: NAT checkpoint does not match NAT'):
        create_pretrained('visionattn_nat_mini')


def test_pretrained_without_downloadable_weights_is_a_clear_error():
    with pytest.raises(UserInputError, match=r"'visionattn_resnet50_cbam' has no downloadable pretrained weights "
                                             r"\(Official ResNet-50 \+ CBAM .*Google Drive"):
        create_pretrained('visionattn_resnet50_cbam')
    with pytest.raises(UserInputError, match=r"Invalid pretrained tag \(in22k\).*Tags with weights: "
                                             r"visionattn_ppma_tiny\.in1k"):
        create_pretrained('visionattn_ppma_tiny.in22k')


def test_validate_pretrained_evaluates_the_downloaded_weights(server, tmp_path):
    """``tools/validate.py --model M --pretrained`` scores exactly what the same file scores given by hand."""
    root = tmp_path / 'data' / 'validation'
    g = torch.Generator().manual_seed(0)
    for i, cls in enumerate(('n01', 'n02')):
        (root / cls).mkdir(parents=True)
        for j in range(2):
            pixels = torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / cls / f'{j}.png')
    path = server.serve(_weights('nat', 'nat_mini'))
    common = ['--model', 'visionattn_nat_mini', '--data-dir', str(tmp_path / 'data'), '--img-size', '64',
              '--workers', '0', '--batch-size', '4']
    downloaded = validate.validate(validate.build_parser().parse_args(['--pretrained', *common]))
    by_hand = validate.validate(validate.build_parser().parse_args([str(path), *common]))
    assert downloaded['checkpoint'] == timm.models.get_pretrained_cfg('visionattn_nat_mini').url
    assert downloaded['count'] == by_hand['count'] == 4
    assert downloaded['loss'] == by_hand['loss'] and downloaded['top1'] == by_hand['top1']
