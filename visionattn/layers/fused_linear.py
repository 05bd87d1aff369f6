"""Inference-time fused ``Linear`` for CPU: ``act(x W^T + b) (+ residual)`` in one oneDNN call.

On CPU, PyTorch runs ``nn.Linear`` through ``addmm`` (MKL sgemm): the bias is first copied into the
output, then the GEMM accumulates into it, and an activation or residual add is another full pass.
oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile's CPU
backend emits for the same pattern) applies bias, GELU and a residual add in the GEMM epilogue, and
its JIT-generated kernels also run the GEMM itself ~2x faster than MKL on AMD CPUs. Results are
fp32 (no reduced-precision math); they differ from ``F.linear`` by accumulation order only.

The fused path is taken only where it is safe: no autograd (``torch.is_grad_enabled()`` is False),
CPU float32 tensors, eager mode (not TorchScript, not torch.compile), and a one-off probe at import
succeeded. Every other case -- training, CUDA, other dtypes, scripting, compiling -- runs the plain
ops. Set
``VISIONATTN_ONEDNN_LINEAR=0`` to disable the fused path.
"""
import os
from typing import Optional

import torch
import torch.nn.functional as F
from timm.models._features_fx import register_notrace_function

__all__ = ['fused_linear', 'gelu_mlp', 'onednn_linear_available', 'ONEDNN_CARD_NOTE']

#: the model cards' "Known differences" entry of every family whose linears run through :func:`fused_linear`
ONEDNN_CARD_NOTE = (
    'At CPU fp32 inference the block Linears (qkv / proj, the MLP) run as oneDNN calls with their bias, GELU and '
    'the MLP residual add fused (`visionattn.layers.fused_linear`; set VISIONATTN_ONEDNN_LINEAR=0 to disable): '
    'the same fp32 function, another accumulation order (~1e-6). Training, CUDA, TorchScript and torch.compile '
    'use the plain ops.')


def _probe() -> bool:
    if os.environ.get('VISIONATTN_ONEDNN_LINEAR', '1') == '0':
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        op = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, 2, 8, generator=g)
        w1, b1 = torch.randn(16, 8, generator=g), torch.randn(16, generator=g)
        w2, b2 = torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
        with torch.no_grad():
            h = op(x, w1, b1, 'gelu', [], 'none')
            y = op.binary(h, x, w2, b2, 'add')
            z = op(x, w1, None, 'none', [], '')
            ok = (torch.allclose(h, F.gelu(F.linear(x, w1, b1)), atol=1e-5)
                  and torch.allclose(y, F.linear(h, w2, b2) + x, atol=1e-5)
                  and torch.allclose(z, F.linear(x, w1), atol=1e-5))
        return bool(ok)
    except Exception:  # op missing or different in this torch build: keep the plain path
        return False


_ONEDNN = _probe()


def onednn_linear_available() -> bool:
    """Whether the fused oneDNN path is usable in this process."""
    return _ONEDNN


@torch.jit.unused
def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # under torch.compile the plain ops are left to inductor (which does its own fusion)
    return (_ONEDNN and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and x.device.type == 'cpu' and x.dtype == torch.float32 and weight.dtype == torch.float32)


@torch.jit.unused
def _onednn_linear(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        act: str,
        residual: Optional[torch.Tensor],
) -> torch.Tensor:
    op = torch.ops.mkldnn._linear_pointwise
    if residual is None:
        return op(x, weight, bias, act, [], 'none' if act == 'gelu' else '')
    if act != 'none':
        x = op(x, weight, bias, act, [], 'none' if act == 'gelu' else '')
        return x.add_(residual)
    return op.binary(x, residual, weight, bias, 'add')


@register_notrace_function  # FX: decide at run time (depends on grad mode and device)
def fused_linear(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        act: str = 'none',
        residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``act(F.linear(x, weight, bias)) + residual`` (``act``: 'none' or 'gelu' (exact erf GELU)).

    ``residual`` (optional) must have the output's shape. Fused through oneDNN at CPU fp32
    inference (see the module docstring), plain ops otherwise; the plain path never modifies its
    inputs in place.
    """
    if act != 'none' and act != 'gelu':
        raise ValueError("fused_linear: act must be 'none' or 'gelu', got " + act)
    if not torch.jit.is_scripting():
        if _use_onednn(x, weight):
            return _onednn_linear(x, weight, bias, act, residual)
    out = F.linear(x, weight, bias)
    if act == 'gelu':
        out = F.gelu(out)
    if residual is not None:
        out = out + residual
    return out


class _GeluLinear(torch.autograd.Function):
    """``F.linear(gelu(h), weight, bias)`` that saves ``h`` only: ``gelu(h)`` is recomputed in backward."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        grad_weight = flat.t() @ F.gelu(h).reshape(-1, h.shape[-1])
        grad_bias = flat.sum(0) if ctx.has_bias else None
        return torch.ops.aten.gelu_backward(grad @ weight, h), grad_weight, grad_bias


@torch.jit.unused
def _recompute_gelu(x: torch.Tensor) -> bool:
    # autocast would run the backward's matmuls on mixed dtypes; the meta device has no autocast state
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling() and x.device.type != 'meta'
            and not torch.is_autocast_enabled(x.device.type))


@register_notrace_function  # FX: decide at run time (depends on grad mode and device)
def gelu_mlp(
        x: torch.Tensor,
        fc1_weight: torch.Tensor,
        fc1_bias: Optional[torch.Tensor],
        fc2_weight: torch.Tensor,
        fc2_bias: Optional[torch.Tensor],
        residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``fc2(gelu(fc1(x))) + residual`` (exact GELU; ``residual`` optional).

    Inference: two :func:`fused_linear` calls (GELU and the residual add in the oneDNN epilogues). With autograd
    (outside autocast and torch.compile) the GELU output is recomputed in backward instead of kept, so an MLP saves
    its hidden map once, not twice (a third of a transformer block's saved activations).
    """
    if not torch.jit.is_scripting():
        if _recompute_gelu(x):
            out = _GeluLinear.apply(F.linear(x, fc1_weight, fc1_bias), fc2_weight, fc2_bias)
            return out if residual is None else out + residual
    x = fused_linear(x, fc1_weight, fc1_bias, act='gelu')
    return fused_linear(x, fc2_weight, fc2_bias, residual=residual)
