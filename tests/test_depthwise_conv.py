"""depthwise_conv2d: the depthwise conv whose CPU weight gradient for kernels above 3 x 3 is a swapped-role conv
(BiFormer / PPMA LePE, FLatten's rank restoration), against autograd through ``F.conv2d``."""
import pytest
import torch
import torch.nn.functional as F

import visionattn.layers.conv_pos_enc as dw
from visionattn.layers import BiLevelRoutingAttention, DepthwiseConvNHWC, FocusedLinearAttention, depthwise_conv2d


def _reference(x, weight, bias):
    return F.conv2d(x, weight, bias, padding=(weight.shape[-2] // 2, weight.shape[-1] // 2), groups=x.shape[1])


@pytest.mark.parametrize('shape, kernel, chunk_images', [
    ((5, 6, 9, 7), (5, 5), 2),    # three chunks, the last one image
    ((3, 4, 6, 11), (7, 3), 3),   # non-square kernel, one chunk
    ((4, 3, 4, 4), (5, 5), 1),    # kernel wider than the map
])
@pytest.mark.parametrize('with_bias, input_grad', [(True, True), (False, False)])
def test_large_kernel_gradients_equal_autograd(monkeypatch, shape, kernel, chunk_images, with_bias, input_grad):
    B, C, H, W = shape
    monkeypatch.setattr(dw, 'SWAPPED_CHUNK_ELEMENTS', chunk_images * C * H * W)
    torch.manual_seed(0)
    x = torch.randn(B, H, W, C, dtype=torch.float64).permute(0, 3, 1, 2).requires_grad_(input_grad)
    weight = torch.randn(C, 1, *kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(C, dtype=torch.float64, requires_grad=True) if with_bias else None
    grad = torch.randn(B, C, H, W, dtype=torch.float64)
    inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    out = dw._DepthwiseConvLargeKernel.apply(x, weight, bias)
    ref = _reference(x, weight, bias)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for ours, theirs in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def _count_swapped(monkeypatch):
    calls = []
    original = dw._weight_grad_swapped

    def spy(*args):
        calls.append(args[1].shape)
        return original(*args)
    monkeypatch.setattr(dw, '_weight_grad_swapped', spy)
    return calls


@pytest.mark.parametrize('kernel, dtype, grad_mode, weight_grad, swapped', [
    (5, torch.float32, True, True, True),
    (3, torch.float32, True, True, False),     # oneDNN's own 3 x 3 weight gradient is the fast one
    (5, torch.float64, True, True, False),
    (5, torch.float32, False, True, False),
    (5, torch.float32, True, False, False),
])
def test_swapped_weight_gradient_only_where_it_is_faster(monkeypatch, kernel, dtype, grad_mode, weight_grad, swapped):
    calls = _count_swapped(monkeypatch)
    x = torch.randn(2, 8, 6, 6, dtype=dtype, requires_grad=True)
    weight = torch.randn(8, 1, kernel, kernel, dtype=dtype, requires_grad=weight_grad)
    with torch.set_grad_enabled(grad_mode):
        out = depthwise_conv2d(x, weight, None)
        torch.testing.assert_close(out, _reference(x, weight, None))
        if grad_mode:
            out.sum().backward()
    assert bool(calls) == swapped


@pytest.mark.parametrize('layer, args', [
    (lambda: BiLevelRoutingAttention(32, num_heads=2, n_win=2, topk=2), lambda x: (x.view(2, 8, 8, 32),)),
    (lambda: FocusedLinearAttention(32, 2, (8, 8)), lambda x: (x, 8, 8)),
], ids=['biformer_lepe', 'flatten_dwc'])
def test_layers_train_through_it_with_the_same_gradients(monkeypatch, layer, args):
    """The 5 x 5 convs of the BiFormer LePE and the FLatten dwc take the swapped weight gradient in float32
    training, and every parameter gradient equals the one through the plain conv."""
    torch.manual_seed(0)
    m = layer()
    x = torch.randn(2, 64, 32)

    def grads():
        m.zero_grad()
        m(*args(x)).square().sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}
    calls = _count_swapped(monkeypatch)
    ours = grads()
    assert len(calls) == 1
    monkeypatch.setattr(dw, '_use_swapped_weight_grad', lambda x, w: False)
    plain = grads()
    assert len(calls) == 1
    for name in plain:
        torch.testing.assert_close(ours[name], plain[name], rtol=1e-5, atol=1e-5, msg=name)


def test_even_kernel_is_refused():
    with pytest.raises(ValueError, match=r'kernel_size=4: expected an odd size'):
        DepthwiseConvNHWC(8, 4)
