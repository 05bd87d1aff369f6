"""Bottom/right zero-padding of feature maps to a multiple of a window or stride, and the crop back.

Both helpers are written so that ``torch.export`` keeps height and width symbolic: while exporting the
pad and the crop are always emitted (a zero amount is a no-op in the graph) instead of branching on
the traced size, and under TorchScript they are plain tensor code.
"""
import torch
import torch.nn.functional as F
from timm.models._features_fx import register_notrace_function

__all__ = ['pad_to_multiple', 'crop_to', 'exporting']


def exporting() -> bool:
    """True while ``torch.export`` (or the ONNX exporter built on it) traces the model."""
    if not torch.jit.is_scripting():
        return torch.compiler.is_exporting()
    return False


@register_notrace_function  # the branch depends on the (symbolic) map size
def pad_to_multiple(x: torch.Tensor, multiple: int, channels_last: bool = False) -> torch.Tensor:
    """Zero-pad H and W on the bottom/right to multiples of ``multiple``.

    ``x`` is NCHW, or NHWC with ``channels_last=True``; the result has the same layout.
    """
    H, W = (x.shape[-3], x.shape[-2]) if channels_last else (x.shape[-2], x.shape[-1])
    # ceil-div form, not ``-H % multiple``: traced symbolic sizes stay short expressions that simplify
    pad_h = (H + multiple - 1) // multiple * multiple - H
    pad_w = (W + multiple - 1) // multiple * multiple - W
    if exporting() or pad_h > 0 or pad_w > 0:
        x = F.pad(x, [0, 0, 0, pad_w, 0, pad_h] if channels_last else [0, pad_w, 0, pad_h])
    return x


@register_notrace_function  # the branch depends on the (symbolic) map size
def crop_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop an NHWC map ``[B, Hp, Wp, C]`` to its top-left ``height`` x ``width``."""
    if exporting() or x.shape[1] != height or x.shape[2] != width:
        x = x[:, :height, :width]
    return x
