"""CBAM / Triplet Attention / ELA: official fidelity of the modules and networks, checkpoint loading, timm plug-in use.

Spec: ../shared/specs/cnn_attention_and_conventions.md Part A; layouts in tests/fixtures/official_layouts/
{cbam,triplet,ela}. The references below are transcriptions of the official code (Jongchan/attention-module
MODELS/{cbam,model_resnet}.py, landskape-ai/triplet-attention MODELS/{triplet_attention,resnet,mobilenet}.py,
Xuwei86/ELA_Code MbV2/models/mbv2_ela72.py), written out step by step with the official module names so that
their state dicts are the official layouts. The generic API matrix lives in test_models.py.
"""
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import visionattn  # noqa: F401
from layouts import load_layout, variants, wrap
from official_checks import assert_filter_maps_layout, assert_param_count, meta_model
from visionattn.layers import CBAM, ELA, TripletAttention
from visionattn.models.cnn_attention import FAMILY_CARD, AttentionMobileNetV2, checkpoint_filter_fn

VARIANTS = [(f, v, n) for f in ('cbam', 'triplet', 'ela') for v, n in variants(f)]
OUR_VARIANT = 'visionattn_resnet50_ela_b'


# ------------------------------------------------------------------------------------------
# reference transcription of the official modules (NCHW)
# ------------------------------------------------------------------------------------------

class RefBasicConv(nn.Module):
    def __init__(self, k=7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, k, stride=1, padding=(k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01, affine=True)

    def forward(self, x):
        return self.bn(self.conv(x))


class RefChannelPool(nn.Module):
    def forward(self, x):
        return torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)


class RefSpatialGate(nn.Module):
    def __init__(self, k=7):
        super().__init__()
        self.compress = RefChannelPool()
        self.spatial = RefBasicConv(k)

    def forward(self, x):
        return x * torch.sigmoid(self.spatial(self.compress(x)))


class RefChannelGate(nn.Module):
    def __init__(self, c, r=16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(c, c // r), nn.ReLU(), nn.Linear(c // r, c))

    def forward(self, x):
        total = None
        for pool in ('avg', 'max'):
            if pool == 'avg':
                p = F.avg_pool2d(x, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3)))
            else:
                p = F.max_pool2d(x, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3)))
            att = self.mlp(p)
            total = att if total is None else total + att
        return x * torch.sigmoid(total).unsqueeze(2).unsqueeze(3).expand_as(x)


class RefCBAM(nn.Module):
    def __init__(self, c, r=16, no_spatial=False):
        super().__init__()
        self.ChannelGate = RefChannelGate(c, r)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = RefSpatialGate()

    def forward(self, x):
        x = self.ChannelGate(x)
        return x if self.no_spatial else self.SpatialGate(x)


class RefTriplet(nn.Module):
    def __init__(self, c=0, r=16, no_spatial=False, k=7):
        super().__init__()
        self.ChannelGateH = RefSpatialGate(k)
        self.ChannelGateW = RefSpatialGate(k)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = RefSpatialGate(k)

    def forward(self, x):
        x_out11 = self.ChannelGateH(x.permute(0, 2, 1, 3).contiguous()).permute(0, 2, 1, 3).contiguous()
        x_out21 = self.ChannelGateW(x.permute(0, 3, 2, 1).contiguous()).permute(0, 3, 2, 1).contiguous()
        if not self.no_spatial:
            x_out = self.SpatialGate(x)
            return (1 / 3) * (x_out + x_out11 + x_out21)
        return (1 / 2) * (x_out11 + x_out21)


class RefELA(nn.Module):
    """``custom_att`` of mbv2_ela72.py, generalised to the paper's (k, groups, GN groups)."""

    def __init__(self, c, k=7, groups=None, gn=16):
        super().__init__()
        self.conv = nn.Conv1d(c, c, kernel_size=k, padding=k // 2, groups=c // 8 if groups is None else groups,
                              bias=False)
        self.gn = nn.GroupNorm(gn, c)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        b, c, h, w = x.size()
        x_h = torch.mean(x, dim=3, keepdim=True).view(b, c, h)
        x_w = torch.mean(x, dim=2, keepdim=True).view(b, c, w)
        x_h = self.sigmoid(self.gn(self.conv(x_h))).view(b, c, h, 1)
        x_w = self.sigmoid(self.gn(self.conv(x_w))).view(b, c, 1, w)
        return x * x_h * x_w


# ------------------------------------------------------------------------------------------
# reference transcription of the official networks
# ------------------------------------------------------------------------------------------

class RefBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample, att, att_name):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.att_name = att_name
        setattr(self, att_name, att(planes))

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out = getattr(self, self.att_name)(out)
        return self.relu(out + residual)


class RefBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample, att, att_name):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.att_name = att_name
        setattr(self, att_name, att(planes * 4))

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out = getattr(self, self.att_name)(out)
        return self.relu(out + residual)


class RefResidualNet(nn.Module):
    """ResidualNet('ImageNet', depth, 1000, att_type): torchvision-style, fixed AvgPool2d(7) head."""

    def __init__(self, depth, att, att_name):
        super().__init__()
        block, layers = {18: (RefBasicBlock, [2, 2, 2, 2]), 34: (RefBasicBlock, [3, 4, 6, 3]),
                         50: (RefBottleneck, [3, 4, 6, 3]), 101: (RefBottleneck, [3, 4, 23, 3])}[depth]
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                downsample = None
                if j == 0 and (stride != 1 or self.inplanes != planes * block.expansion):
                    downsample = nn.Sequential(
                        nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                        nn.BatchNorm2d(planes * block.expansion))
                blocks.append(block(self.inplanes, planes, stride, downsample, att, att_name))
                self.inplanes = planes * block.expansion
            setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
        self.avgpool = nn.AvgPool2d(7)
        self.fc = nn.Linear(512 * block.expansion, 1000)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).view(x.size(0), -1))


_MBV2_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                 (6, 320, 1, 1)]


class RefTripletInvertedResidual(nn.Module):
    """MODELS/mobilenet.py: ConvBNReLU blocks nested, TripletAttention(oup) after the pw-linear BN."""

    def __init__(self, inp, oup, stride, t):
        super().__init__()
        hidden = int(round(inp * t))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if t != 1:
            layers.append(nn.Sequential(nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(True)))
        layers += [nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                 nn.BatchNorm2d(hidden), nn.ReLU6(True)),
                   nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup), RefTriplet(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class RefTripletMobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        features = [nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(True))]
        inp = 32
        for t, c, n, s in _MBV2_SETTING:
            for i in range(n):
                features.append(RefTripletInvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        features.append(nn.Sequential(nn.Conv2d(inp, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(True)))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.25), nn.Linear(1280, 1000))

    def forward(self, x):
        return self.classifier(self.features(x).mean(-1).mean(-1))


class RefELAInvertedResidual(nn.Module):
    """mbv2_ela72.py: flat Sequential, custom_att(hidden, hidden) after the depthwise conv + BN + ReLU6 (t != 1)."""

    def __init__(self, inp, oup, stride, t):
        super().__init__()
        hidden = round(inp * t)
        self.identity = stride == 1 and inp == oup
        if t == 1:
            self.conv = nn.Sequential(
                nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                nn.ReLU6(inplace=True), nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))
        else:
            self.conv = nn.Sequential(
                nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                nn.ReLU6(inplace=True), RefELA(hidden),
                nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x):
        return x + self.conv(x) if self.identity else self.conv(x)


class RefELAMobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True))]
        inp = 32
        for t, c, n, s in _MBV2_SETTING:
            for i in range(n):
                layers.append(RefELAInvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        self.features = nn.Sequential(*layers)
        self.conv = nn.Sequential(nn.Conv2d(inp, 1280, 1, 1, 0, bias=False), nn.BatchNorm2d(1280),
                                  nn.ReLU6(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(1280, 1000))

    def forward(self, x):
        x = self.avgpool(self.conv(self.features(x)))
        return self.classifier(x.view(x.size(0), -1))


REFERENCES = {
    ('cbam', 'resnet18_cbam'): lambda: RefResidualNet(18, RefCBAM, 'cbam'),
    ('cbam', 'resnet50_cbam'): lambda: RefResidualNet(50, RefCBAM, 'cbam'),
    ('triplet', 'resnet18_triplet_attention'): lambda: RefResidualNet(18, RefTriplet, 'triplet_attention'),
    ('triplet', 'resnet50_triplet_attention'): lambda: RefResidualNet(50, RefTriplet, 'triplet_attention'),
    ('triplet', 'triplet_attention_mobilenet_v2'): RefTripletMobileNetV2,
    ('ela', 'mbv2_ela72'): RefELAMobileNetV2,
}


def perturb_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BN statistic a non-default value (gates' BN weights 0 -> ~1, biases 0 -> random,
    running stats off identity), keeping activations of the scale of the input through a deep network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return module


def test_all_variants_registered():
    registered = sorted(m for m in visionattn.list_models() if timm.models._registry._model_to_module[m] == 'cnn_attention')
    assert registered == sorted([n for _, _, n in VARIANTS] + [OUR_VARIANT])
    assert sorted(FAMILY_CARD['accuracy']) == registered


# ------------------------------------------------------------------------------------------
# parameter counts, layouts, checkpoint files
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('family,variant,name', VARIANTS)
def test_param_count_and_layout(family, variant, name):
    assert_param_count(name, family, variant)
    assert_filter_maps_layout(name, family, variant)
    layout = load_layout(family, variant)
    assert len(meta_model(name).state_dict()) == len(layout['state_dict'])


@pytest.mark.parametrize('key', sorted(REFERENCES))
def test_reference_transcription_has_the_official_layout(key):
    """The references used below are the official architectures: same keys, shapes and count."""
    ref = REFERENCES[key]()
    layout = load_layout(*key)
    assert [(k, list(v.shape)) for k, v in ref.state_dict().items()] == [(k, s) for k, s, _ in layout['state_dict']]
    assert sum(p.numel() for p in ref.parameters()) == layout['params']


def test_param_count_own_variant():
    """ELA-B after the 3x3 conv: 9 C per module on the bottleneck widths (sum 3,776 over ResNet-50)."""
    assert sum(p.numel() for p in meta_model(OUR_VARIANT).parameters()) == 25_557_032 + 9 * 3_776


@pytest.mark.parametrize('container', ['raw', 'state_dict', 'module'])
def test_official_checkpoint_loads(tmp_path, container):
    """An official-layout file in each container loads through pretrained_cfg_overlay: every weight equals the
    file's (renamed) tensor, and the logits equal the official transcription's."""
    ref = perturb_(REFERENCES[('cbam', 'resnet18_cbam')]()).eval()
    path = tmp_path / f'resnet18_cbam_{container}.pth'
    torch.save(wrap(ref.state_dict(), container), path)
    model = timm.create_model('visionattn_resnet18_cbam', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    expected = checkpoint_filter_fn(ref.state_dict(), model)
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    for k, v in got.items():
        assert torch.equal(v, expected[k]), f'{k} differs from the file'
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = ref(x)
        assert (model(x) - expected).abs().max() <= 1e-5 * expected.abs().max()  # fp32, other conv algorithms


def test_official_training_file_loads(tmp_path):
    """The file train_imagenet.py writes: {epoch, arch, state_dict (module.), best_prec1, optimizer}."""
    ref = perturb_(REFERENCES[('triplet', 'triplet_attention_mobilenet_v2')]()).eval()
    path = tmp_path / 'model_best.pth.tar'
    torch.save({'epoch': 400, 'arch': 'mobilenet', 'best_prec1': 71.99,
                'state_dict': {f'module.{k}': v for k, v in ref.state_dict().items()},
                'optimizer': torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9).state_dict()}, path)
    model = timm.create_model('visionattn_mobilenetv2_triplet', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = ref(x)
        assert (model(x) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_filter_rejects_incomplete_checkpoint():
    model = meta_model('visionattn_resnet18_triplet')
    sd = model.state_dict()
    del sd['layer1.0.se.ChannelGateW.spatial.conv.weight']
    with pytest.raises(ValueError, match=r'missing keys: layer1\.0\.se\.ChannelGateW'):
        checkpoint_filter_fn(sd, model)


# ------------------------------------------------------------------------------------------
# the modules against the official transcriptions
# ------------------------------------------------------------------------------------------

MODULE_CASES = {
    'cbam': (lambda: CBAM(64), lambda: RefCBAM(64)),
    'cbam_r8_no_spatial': (lambda: CBAM(64, reduction=8, no_spatial=True), lambda: RefCBAM(64, 8, no_spatial=True)),
    'triplet': (lambda: TripletAttention(64), lambda: RefTriplet(64)),
    'triplet_k3': (lambda: TripletAttention(64, kernel_size=3), lambda: RefTriplet(64, k=3)),
    'triplet_no_spatial': (lambda: TripletAttention(64, no_spatial=True), lambda: RefTriplet(64, no_spatial=True)),
    'ela_T': (lambda: ELA(64, 'T'), lambda: RefELA(64, 5, 64, 32)),
    'ela_B': (lambda: ELA(64, 'B'), lambda: RefELA(64, 7, 64, 16)),
    'ela_S': (lambda: ELA(64, 'S'), lambda: RefELA(64, 5, 8, 16)),
    'ela_L': (lambda: ELA(64, 'L'), lambda: RefELA(64, 7, 8, 16)),
    'ela_custom': (lambda: ELA(64, kernel_size=3, groups=4, gn_groups=8), lambda: RefELA(64, 3, 4, 8)),
}


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('case', sorted(MODULE_CASES))
def test_module_matches_official(case, train):
    """Same state-dict keys as the official module; outputs (eval: running stats; train: batch stats and the
    updated running stats) and input gradients equal to fp32 round-off, on a non-square map."""
    ours_fn, ref_fn = MODULE_CASES[case]
    torch.manual_seed(0)
    ref = perturb_(ref_fn(), seed=1).train(train)
    ours = ours_fn().train(train)
    assert list(ours.state_dict()) == [k for k in ref.state_dict()]
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 64, 13, 18)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out = ref(x_ref), ours(x_ours)
    torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    out_ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.parametrize('module', [CBAM(32), ELA(32, 'S')], ids=['cbam', 'ela'])
def test_inplace_only_without_autograd(module):
    """inplace=True scales the input buffer when no graph is recorded, and equals the out-of-place result;
    with autograd the input is left untouched."""
    module = perturb_(module).eval()
    x = torch.randn(2, 32, 9, 11)
    expected = module(x)
    module.inplace = True
    y = x.clone()
    with torch.no_grad():
        out = module(y)
    assert out.data_ptr() == y.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    y = x.clone().requires_grad_()
    out = module(y)
    torch.testing.assert_close(y.detach(), x, rtol=0, atol=0)
    out.sum().backward()
    assert y.grad is not None


def test_official_initialisation():
    """Spatial-gate BN weight 0 (CBAM, Triplet's H-W gate), other gate BNs 1, MLP biases 0; BN momentum 0.01."""
    cbam, trip = CBAM(64), TripletAttention(64)
    assert cbam.SpatialGate.spatial.bn.weight.item() == 0 and cbam.SpatialGate.spatial.bn.momentum == 0.01
    assert cbam.ChannelGate.mlp[1].bias.abs().sum() == 0 and cbam.ChannelGate.mlp[3].bias.abs().sum() == 0
    assert trip.SpatialGate.spatial.bn.weight.item() == 0
    assert trip.ChannelGateH.spatial.bn.weight.item() == 1 and trip.ChannelGateW.spatial.bn.weight.item() == 1
    model = timm.create_model('visionattn_resnet50_cbam')
    assert all(m.weight.item() == 0 for n, m in model.named_modules() if n.endswith('SpatialGate.spatial.bn'))
    assert model.layer1[0].bn3.weight.min() == 1  # no zero-init of the last BN (official init)


@pytest.mark.parametrize('module', [CBAM(16, reduction=4), TripletAttention(16), ELA(16, 'L')],
                         ids=['cbam', 'triplet', 'ela'])
def test_module_scripts_and_traces(module):
    module = perturb_(module).eval()
    x = torch.randn(2, 16, 7, 10)
    expected = module(x)
    torch.testing.assert_close(torch.jit.script(module)(x), expected)
    torch.testing.assert_close(torch.fx.symbolic_trace(module)(x), expected)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r'gn_groups=32: expected a positive divisor of channels=144 \(ELA-T'):
        ELA(144, 'T')  # MobileNetV2's 144-wide layers cannot take ELA-T
    with pytest.raises(ValueError, match=r'groups=12: expected a positive divisor of channels=100'):
        ELA(100, 'L', gn_groups=4)
    with pytest.raises(ValueError, match=r"variant='X'"):
        ELA(64, 'X')
    with pytest.raises(ValueError, match=r'kernel_size=4: expected a positive odd int'):
        ELA(64, kernel_size=4)
    with pytest.raises(ValueError, match=r'kernel_size=6: expected a positive odd int'):
        CBAM(64, kernel_size=6)
    with pytest.raises(ValueError, match=r'kernel_size=0: expected a positive odd int'):
        TripletAttention(64, kernel_size=0)
    with pytest.raises(ValueError, match=r'reduction=128: expected an int in \[1, channels=64\]'):
        CBAM(64, reduction=128)
    with pytest.raises(ValueError, match=r'rd_ratio=2'):
        CBAM(64, rd_ratio=2)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['reduction_ratio'\]"):
        TripletAttention(64, reduction_ratio=16)
    with pytest.raises(ValueError, match=r"attn_position='middle'"):
        timm.create_model('visionattn_mobilenetv2_ela_l', attn_position='middle', device='meta')


# ------------------------------------------------------------------------------------------
# the networks against the official transcriptions (float64, every parameter perturbed)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('key', sorted(REFERENCES), ids=lambda k: k[1])
def test_network_matches_official(key):
    """Official weights (perturbed transcription, official layout) through checkpoint_filter_fn give the official
    logits at 224x224 -- the only size the official ResNets run -- in float64."""
    name = dict(((f, v), n) for f, v, n in VARIANTS)[key]
    ref = perturb_(REFERENCES[key](), seed=2).double().eval()
    model = timm.create_model(name).double().eval()
    model.load_state_dict(checkpoint_filter_fn({'state_dict': {f'module.{k}': v for k, v in ref.state_dict().items()}},
                                               model))
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        expected = ref(x)
        got = model(x)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-10 * scale, (got - expected).abs().max() / scale


def test_ela_resnet_position_and_mmdet_order():
    """visionattn_resnet50_ela_b: ELA on the bottleneck width after conv2 + BN + ReLU, before conv3."""
    model = perturb_(timm.create_model(OUR_VARIANT)).eval()
    block = model.layer2[0]
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.append(n))
             for n, m in block.named_modules() if n in ('conv2', 'bn2', 'act2.act', 'act2.attn', 'conv3')]
    x = torch.randn(1, 256, 32, 32)
    with torch.no_grad():
        block(x)
    for h in hooks:
        h.remove()
    assert seen == ['conv2', 'bn2', 'act2.act', 'act2.attn', 'conv3']
    assert block.act2.attn.conv.weight.shape == (128, 1, 7)  # ELA-B: depthwise k7 on width 128


# ------------------------------------------------------------------------------------------
# the modules inside timm's own models
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
@pytest.mark.parametrize('layer', [CBAM, TripletAttention, partial(ELA, variant='B')], ids=['cbam', 'triplet', 'ela'])
def test_timm_resnet_attn_layer(arch, layer):
    """timm.create_model(arch, block_args=dict(attn_layer=...)) builds, runs and trains with each module; for CBAM
    and Triplet it is exactly the registered model (same state dict, same logits)."""
    torch.manual_seed(0)
    model = timm.create_model(arch, block_args=dict(attn_layer=layer), num_classes=10)
    out = model(torch.randn(2, 3, 64, 80))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    kind = {CBAM: 'cbam', TripletAttention: 'triplet'}.get(layer)
    if kind:
        # NCHW like timm's model, so that the same conv algorithms run: identical logits
        ours = perturb_(timm.create_model(f'visionattn_{arch}_{kind}', num_classes=10, channels_last=False)).eval()
        model.load_state_dict(ours.state_dict())
        x = torch.randn(2, 3, 64, 80)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), ours(x))


@pytest.mark.parametrize('position', ['dw', 'out'])
@pytest.mark.parametrize('layer', [CBAM, TripletAttention, partial(ELA, variant='S', gn_groups=8)],
                         ids=['cbam', 'triplet', 'ela'])  # GN 16 does not divide the 24-wide block outputs
def test_mobilenetv2_attn_layer_swap(layer, position):
    """attn_layer= / attn_position= put any module in timm's MobileNetV2 (se slot or after the pw-linear BN)."""
    model = timm.create_model('visionattn_mobilenetv2_ela_l', attn_layer=layer, attn_position=position, num_classes=5)
    mods = [m for m in model.modules() if isinstance(m, nn.Module) and type(m) is (layer.func if isinstance(
        layer, partial) else layer)]
    assert len(mods) == (16 if position == 'dw' else 17)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    assert isinstance(model, AttentionMobileNetV2)


def test_resnet_attn_swap_through_block_args():
    model = timm.create_model('visionattn_resnet50_cbam', block_args=dict(attn_layer='se'), device='meta')
    assert type(model.layer1[0].se).__name__ == 'SEModule'


# ------------------------------------------------------------------------------------------
# the layout-aware reductions the gates use
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('dims', [[1], [2], [3], [2, 3]])
def test_reductions_equal_torch(dims, channels_last):
    """max_over / mean_over = amax / mean (values, result layout, gradients) in both memory formats."""
    from visionattn.layers.reduce import max_over, mean_over
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for ours, ref in ((max_over, lambda t: t.amax(dims)), (mean_over, lambda t: t.mean(dims))):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, expected = ours(a, dims), ref(b)
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(expected)
        out.backward(g)
        expected.backward(g)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: max_over(t, dims), (x.clone().requires_grad_(),))


def test_max_gradient_is_shared_between_ties():
    from visionattn.layers.reduce import max_over
    x = torch.tensor([[[[1.0, 3.0, 3.0]]]]).requires_grad_()
    max_over(x, [3]).sum().backward()
    assert x.grad.flatten().tolist() == [0.0, 0.5, 0.5]


@pytest.mark.parametrize('case', ['cbam', 'triplet', 'ela_L'])
def test_module_matches_official_channels_last(case):
    """The modules on a channels-last input (as inside the models) equal the official ones on the same values."""
    ours_fn, ref_fn = MODULE_CASES[case]
    ref = perturb_(ref_fn(), seed=3).eval()
    ours = ours_fn().eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 64, 11, 9)
    torch.testing.assert_close(ours(x.contiguous(memory_format=torch.channels_last)), ref(x), rtol=1e-6, atol=1e-6)
