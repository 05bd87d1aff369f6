"""Depthwise convolutions on NHWC maps: ``x + depthwise_conv(x)`` position encodings (DaViT CPE, CPVT/Twins PEG),
the plain depthwise conv of LePE branches (PPMA, BiFormer), and :func:`depthwise_conv2d`, the depthwise conv with
a faster CPU weight gradient for kernels larger than 3 x 3 (those LePE branches and FLatten's rank restoration)."""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models._features_fx import register_notrace_function

from .padding import exporting

__all__ = ['ConvPosEnc', 'DepthwiseConvNHWC', 'depthwise_conv2d']

# elements of x per swapped-role conv of the weight gradient: chunks of 2 MB (fp32) stay in the L2 cache
SWAPPED_CHUNK_ELEMENTS = 1 << 19


def _same_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Stride-1 depthwise conv of NCHW-shaped ``x`` with padding ``k // 2`` per side."""
    return F.conv2d(x, weight, bias, padding=(weight.shape[-2] // 2, weight.shape[-1] // 2), groups=x.shape[1])


def _weight_grad_swapped(grad: torch.Tensor, x: torch.Tensor, kernel: Tuple[int, int]) -> torch.Tensor:
    """Weight gradient ``[C, 1, kh, kw]`` of a stride-1, 'same'-padded depthwise conv from its NCHW-shaped input
    ``x`` and output gradient ``grad``: the conv with the roles swapped, ``x`` of each (image, channel) correlated
    with its ``grad`` map as the kernel (groups = images x channels), summed over the images, a few images at a
    time. oneDNN's own depthwise weight gradient is fast for 3 x 3 kernels only (5 x 5: 2-3x slower than this)."""
    B, C, H, W = x.shape
    kh, kw = kernel
    step = max(1, min(B, SWAPPED_CHUNK_ELEMENTS // (C * H * W)))
    out = grad.new_zeros(C, kh, kw)
    for s in range(0, B, step):
        xs, gs = x[s:s + step], grad[s:s + step]
        n = xs.shape[0]
        corr = F.conv2d(xs.contiguous().view(1, n * C, H, W), gs.contiguous().view(n * C, 1, H, W),
                        padding=(kh // 2, kw // 2), groups=n * C)
        out += corr.view(n, C, kh, kw).sum(0)
    return out.unsqueeze(1)


class _DepthwiseConvLargeKernel(torch.autograd.Function):
    """Stride-1 depthwise conv, padding ``k // 2``, odd kernel; the weight gradient by
    :func:`_weight_grad_swapped`, the input gradient by the backend's own backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _same_depthwise_conv(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        kh, kw = weight.shape[-2:]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [kh // 2, kw // 2], [1, 1], False, [0, 0], x.shape[1],
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad_swapped(grad, x, (kh, kw))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


@torch.jit.unused
def _use_swapped_weight_grad(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # float32 on CPU under autograd, eager (export and torch.compile see the plain conv), no autocast
    kh, kw = weight.shape[-2:]
    return (torch.is_grad_enabled() and weight.requires_grad and kh * kw > 9 and kh % 2 == 1 and kw % 2 == 1
            and x.device.type == 'cpu' and x.dtype == torch.float32 and not torch.is_autocast_enabled('cpu')
            and not exporting() and not torch.compiler.is_compiling())


@register_notrace_function  # FX: decide at run time (depends on grad mode, device and dtype)
def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depthwise conv of ``x`` ``[B, C, H, W]`` (any memory format; channels-last is fastest) with ``weight``
    ``[C, 1, kh, kw]`` (odd sides), stride 1 and padding ``k // 2``: ``F.conv2d(..., groups=C)``. When training in
    float32 on CPU with a kernel larger than 3 x 3, its weight gradient is the swapped-role conv of
    :func:`_weight_grad_swapped`."""
    if not torch.jit.is_scripting():
        if _use_swapped_weight_grad(x, weight):
            return _DepthwiseConvLargeKernel.apply(x, weight, bias)
    return _same_depthwise_conv(x, weight, bias)


class ConvPosEnc(nn.Module):
    """Residual depthwise convolution on an NHWC map ``[B, H, W, C]``.

    The permute to NCHW is a strided view (channels-last memory), so no copy is made around the
    convolution. The conv is named ``proj``, as in DaViT and Twins checkpoints.
    """

    def __init__(self, dim: int, kernel_size: int = 3, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Conv2d(
            dim, dim, kernel_size, 1, kernel_size // 2, groups=dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class DepthwiseConvNHWC(nn.Module):
    """Depthwise k x k conv (with bias, odd k) applied to an NHWC map ``[B, H, W, C]`` (the permutes are
    channels-last views) through :func:`depthwise_conv2d`; the conv is named ``conv``."""

    def __init__(self, dim: int, kernel_size: int, device=None, dtype=None):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f'kernel_size={kernel_size!r}: expected an odd size (padding kernel_size // 2 keeps '
                             'the map size)')
        self.conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x.permute(0, 3, 1, 2), self.conv.weight, self.conv.bias).permute(0, 2, 3, 1)
