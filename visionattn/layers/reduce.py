"""Max / mean over axes of a 4-D map, fast in either memory format (the pooling of the CNN attention gates).

``torch.amax`` / ``sum`` over an axis that is not innermost in memory (H or W of a channels-last tensor, H of
an NCHW one) run several times slower than the same reduction on a permuted view whose memory is contiguous.
:func:`max_over` and :func:`mean_over` reduce on that view and return the result with the remaining axes in
their logical order (a view; values identical). Under autograd the max routes its gradient to the arg-max
entries (split between exact ties, as ``amax`` does) in two passes instead of ``amax``'s five.
"""
from typing import List, Tuple

import torch
from timm.models._features_fx import register_notrace_function

__all__ = ['max_over', 'mean_over']


def _memory_view(x: torch.Tensor, dims: List[int]) -> Tuple[torch.Tensor, List[int], List[int]]:
    """(view of ``x`` with its axes in memory order, ``dims`` in that view, how to put the result back)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        order = [0, 2, 3, 1]
    else:
        order = [i for i in range(x.dim())]
    vdims: List[int] = []
    kept: List[int] = []
    for i, d in enumerate(order):
        if d in dims:
            vdims.append(i)
        else:
            kept.append(d)
    back: List[int] = []
    for d in sorted(kept):  # result axis order -> logical order
        back.append(kept.index(d))
    return x.permute(order), vdims, back


class _MaxOver(torch.autograd.Function):
    """``amax`` whose backward is one mask and one select (ties share the gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dims: List[int]) -> torch.Tensor:
        out = x.amax(dims, keepdim=True)
        ctx.save_for_backward(x, out)
        ctx.dims = dims
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, out = ctx.saved_tensors
        mask = x == out
        if torch.count_nonzero(mask) != out.numel():  # exact ties (rare): split as amax (a slow bool sum)
            grad = grad / mask.sum(ctx.dims, keepdim=True)
        return torch.where(mask, grad, torch.zeros((), dtype=grad.dtype)), None


@torch.jit.ignore
def _max_with_cheap_grad(view: torch.Tensor, vdims: List[int]) -> torch.Tensor:
    out = _MaxOver.apply(view, vdims)
    for d in sorted(vdims, reverse=True):
        out = out.squeeze(d)
    return out


@register_notrace_function
def max_over(x: torch.Tensor, dims: List[int]) -> torch.Tensor:
    """``x.amax(dims)`` (``dims`` a list of axes; they are removed)."""
    view, vdims, back = _memory_view(x, dims)
    if torch.jit.is_scripting() or not (torch.is_grad_enabled() and x.requires_grad):
        out = view.amax(vdims)
    else:
        out = _max_with_cheap_grad(view, vdims)
    return out.permute(back)


@register_notrace_function
def mean_over(x: torch.Tensor, dims: List[int]) -> torch.Tensor:
    """``x.mean(dims)`` as ``sum * (1 / n)``: equal to rounding, and its backward broadcasts the small gradient
    instead of dividing a materialised full-size one."""
    view, vdims, back = _memory_view(x, dims)
    n = 1
    for d in dims:
        n *= x.shape[d]
    return (view.sum(vdims) * (1.0 / n)).permute(back)
