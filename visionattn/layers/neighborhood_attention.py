"""2-D neighbourhood attention (NAT / DiNAT) with relative position bias, on every device.

``neighborhood_attention_2d`` works on heads-last tensors ``[B, H, W, heads, head_dim]``
(natten's layout) with natten's exact neighbourhood semantics and the NAT RPB rule (see
``_na_backends`` for the geometry); ``NeighborhoodAttention2d`` is the NAT/DiNAT module around
it, with the parameter names of the natten ≤ 0.17 checkpoints (``qkv``, ``rpb``, ``proj``).

Backends (``torch``, ``flex``, ``natten``, ``triton``, ``gather``) are selected here, in one place:
an explicit ``backend=`` argument wins, then the innermost ``with na_backend(name):``, then
the environment variable ``VISIONATTN_NA_BACKEND``, else ``auto``. ``auto`` picks:

- non-CUDA tensors (CPU): ``torch``;
- CUDA, ``rpb is None``, natten built with its CUDA kernels (``natten.HAS_LIBNATTEN``) and no
  axis padded by the small-input policy: ``natten`` (its fused FNA kernels);
- otherwise on CUDA: ``triton`` if Triton is importable, else ``flex``.

Deployment: a TorchScript-compiled module, and a ``torch.export`` / ONNX trace whose height or width
is symbolic, use ``gather`` (index tables computed in the graph from the input size); a trace at a fixed
size follows the rule above (``torch`` on CPU, its tables recorded as constants).

(On an H200, fp16, B=4, 4 heads, 56², k=7, forward+backward with RPB: triton 0.9 ms, flex
2.8 ms, torch 3.0 ms; natten's CUDA kernels were not available there to compare.)

An explicitly requested backend that cannot run a call raises ``ValueError`` (unsupported
arguments, e.g. ``natten`` with an RPB) or ``RuntimeError`` (missing library or device, e.g.
``triton`` on CPU without ``TRITON_INTERPRET=1``, ``flex`` backward on CPU), naming the backend
and the reason.
"""
import contextlib
import contextvars
import os
from typing import Optional, Tuple, Union

import torch
from torch import nn

from ._na_backends import na2d_flex, na2d_gather, na2d_natten, na2d_torch, na2d_torch_train
from .fused_linear import fused_linear
from .padding import exporting
from .weight_init import init_trunc_normal_

__all__ = ["neighborhood_attention_2d", "neighborhood_attention_2d_qkv", "NeighborhoodAttention2d",
           "na_backend", "BACKENDS", "ENV_VAR", "effective_dilation"]

BACKENDS = ("torch", "flex", "natten", "triton", "gather")
ENV_VAR = "VISIONATTN_NA_BACKEND"
_context_backend = contextvars.ContextVar("visionattn_na_backend", default=None)

IntPair = Union[int, Tuple[int, int]]


def _check_name(name: str) -> str:
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown neighbourhood-attention backend {name!r}; "
                         f"choose one of {BACKENDS + ('auto',)}")
    return name


@contextlib.contextmanager
def na_backend(name: str):
    """Within the block, calls without an explicit ``backend=`` use backend ``name``."""
    token = _context_backend.set(_check_name(name))
    try:
        yield
    finally:
        _context_backend.reset(token)


def _triton_na():
    try:
        from ._na_triton import na2d_triton
    except ImportError as err:
        raise RuntimeError(f"backend 'triton': Triton is not importable ({err})") from err
    return na2d_triton


def _natten_has_cuda_kernels() -> bool:
    try:
        import natten
    except ImportError:
        return False
    return bool(getattr(natten, "HAS_LIBNATTEN", False))


def _auto(q: torch.Tensor, rpb, padded: bool) -> str:
    if q.device.type != "cuda":
        return "torch"
    if rpb is None and not padded and _natten_has_cuda_kernels():
        return "natten"
    try:
        _triton_na()
        return "triton"
    except RuntimeError:
        return "flex"


def _resolve(backend: Optional[str], q: torch.Tensor, rpb, padded: bool):
    name = _check_name(backend or _context_backend.get() or os.environ.get(ENV_VAR) or "auto")
    if name == "auto":
        name = _auto(q, rpb, padded)
    if name == "torch":
        return na2d_torch
    if name == "flex":
        return na2d_flex
    if name == "gather":
        return na2d_gather
    if name == "natten":
        try:
            import natten  # noqa: F401
        except ImportError as err:
            raise RuntimeError(f"backend 'natten': natten is not importable ({err})") from err
        return na2d_natten
    fn = _triton_na()
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"backend 'triton': needs CUDA tensors (got {q.device.type}); "
                           "CPU runs only under TRITON_INTERPRET=1")
    return fn


def _pair(x: IntPair, what: str) -> Tuple[int, int]:
    pair = (x, x) if isinstance(x, int) else tuple(x)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"{what} must be a positive int or a pair of them, got {x!r}")
    return pair


def effective_dilation(size: int, kernel: int, dilation: int) -> int:
    """Small-input policy for one axis: the dilation actually used.

    natten needs ``kernel·dilation ≤ size``. When that holds, ``dilation`` is kept (exact natten
    semantics). Otherwise the dilation drops to ``max(1, size // kernel)``, the largest that
    fits; if even ``size < kernel``, dilation is 1 and the axis is treated as zero-padded to
    ``kernel`` with the padded keys masked, i.e. every query attends to all ``size`` tokens of
    the axis with RPB index ``i' - i + kernel - 1``. (natten ≤ 0.14 instead zero-padded the
    module input to ``kernel·dilation`` without masking; natten ≥ 0.15 raises.)
    """
    return dilation if kernel * dilation <= size else max(1, size // kernel)


def _check_rpb(rpb: Optional[torch.Tensor], heads: int, kernel: Tuple[int, int]) -> None:
    if rpb is not None and tuple(rpb.shape) != (heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1):
        raise ValueError(f"rpb must be [heads, 2kh-1, 2kw-1] = {[heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1]}, "
                         f"got {list(rpb.shape)}")


def neighborhood_attention_2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              kernel_size: IntPair, dilation: IntPair = 1,
                              rpb: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                              backend: Optional[str] = None) -> torch.Tensor:
    """Neighbourhood attention on q/k/v ``[B, H, W, heads, head_dim]``; returns that layout.

    Each query attends to the ``kh×kw`` keys of its dilated neighbourhood (natten semantics:
    per-axis dilation groups, window start clamped so every query sees exactly k keys per axis).
    Logits are ``scale·q·k + rpb[h, (i'-i)/d + kh - 1, (j'-j)/d + kw - 1]`` with ``rpb`` of shape
    ``[heads, 2kh-1, 2kw-1]`` (optional) and ``scale`` defaulting to ``head_dim ** -0.5``.
    ``kernel_size`` and ``dilation`` are ints or per-axis pairs; axes shorter than
    ``kernel·dilation`` follow the small-input policy of :func:`effective_dilation`.
    ``backend``: one of ``BACKENDS`` or ``'auto'``; see the module docstring for the rule.
    """
    if q.dim() != 5 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError("q, k, v must all be [B, H, W, heads, head_dim], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    kernel, dilation = _pair(kernel_size, "kernel_size"), _pair(dilation, "dilation")
    _check_rpb(rpb, q.shape[3], kernel)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    size = tuple(q.shape[1:3])
    if not all(isinstance(n, int) for n in size):  # traced with a symbolic size: tables in the graph
        return na2d_gather(q, k, v, kernel, dilation, rpb, scale)
    dil = tuple(effective_dilation(n, kk, d) for n, kk, d in zip(size, kernel, dilation))
    padded = size[0] < kernel[0] or size[1] < kernel[1]
    return _resolve(backend, q, rpb, padded)(q, k, v, kernel, dil, rpb, scale)


def neighborhood_attention_2d_qkv(qkv: torch.Tensor, kernel_size: IntPair, dilation: IntPair = 1,
                                  rpb: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                                  backend: Optional[str] = None) -> torch.Tensor:
    """:func:`neighborhood_attention_2d` of a fused ``qkv`` ``[B, H, W, 3, heads, head_dim]`` (q, k, v along
    dim 3: the ``qkv`` linear's output); returns ``[B, H, W, heads, head_dim]``.

    When the ``torch`` backend runs on CPU under autograd (float32 / float64, no autocast), this trains through
    ``na2d_torch_train``: the same tiled attention, whose backward returns the ``qkv`` gradient as one tensor
    instead of three that autograd then stacks. Otherwise it is ``neighborhood_attention_2d(*qkv.unbind(3), ...)``.
    """
    if qkv.dim() != 6 or qkv.shape[3] != 3:
        raise ValueError(f"qkv must be [B, H, W, 3, heads, head_dim], got {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(3)
    size = tuple(qkv.shape[1:3])
    if (torch.is_grad_enabled() and qkv.device.type == "cpu" and qkv.dtype in (torch.float32, torch.float64)
            and all(isinstance(n, int) for n in size) and not exporting()
            and not torch.is_autocast_enabled("cpu")):
        kernel, dil = _pair(kernel_size, "kernel_size"), _pair(dilation, "dilation")
        dil = tuple(effective_dilation(n, kk, d) for n, kk, d in zip(size, kernel, dil))
        padded = size[0] < kernel[0] or size[1] < kernel[1]
        if _resolve(backend, q, rpb, padded) is na2d_torch:
            _check_rpb(rpb, q.shape[3], kernel)
            scale = q.shape[-1] ** -0.5 if scale is None else scale
            return na2d_torch_train(qkv, kernel, dil, rpb, scale)
    return neighborhood_attention_2d(q, k, v, kernel_size, dilation, rpb, scale, backend)


class NeighborhoodAttention2d(nn.Module):
    """NAT / DiNAT neighbourhood attention on channels-last input ``[B, H, W, C]``.

    ``qkv`` (Linear C→3C; output rows q | k | v, each head-major), ``rpb``
    (``[heads, 2k-1, 2k-1]``, only with ``rel_pos_bias``) and ``proj`` match the natten ≤ 0.17
    checkpoint keys ``attn.qkv``, ``attn.rpb``, ``attn.proj``. q is scaled by ``qk_scale`` or
    ``head_dim ** -0.5``. The backend follows ``na_backend`` / ``VISIONATTN_NA_BACKEND`` / auto.
    ``attn_drop`` must be 0 in training (no backend drops attention probabilities; the official
    NAT and DiNAT models use 0).
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: IntPair, dilation: IntPair = 1,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, attn_drop: float = 0.,
                 proj_drop: float = 0., rel_pos_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.dilation = _pair(dilation, "dilation")
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            kh, kw = self.kernel_size
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kh - 1, 2 * kw - 1))
            init_trunc_normal_(self.rpb, std=.02, a=-2., b=2.)
        else:
            self.register_parameter("rpb", None)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.attn_drop > 0:
            raise NotImplementedError("attention dropout is not supported by the "
                                      "neighbourhood-attention backends; use attn_drop=0")
        B, H, W, C = x.shape
        qkv = fused_linear(x, self.qkv.weight, self.qkv.bias).reshape(B, H, W, 3, self.num_heads, self.head_dim)
        if torch.jit.is_scripting():
            q, k, v = qkv.unbind(3)
            x = na2d_gather(q, k, v, self.kernel_size, self.dilation, self.rpb, self.scale)
        else:
            x = neighborhood_attention_2d_qkv(qkv, self.kernel_size, self.dilation, self.rpb, self.scale)
        return self.proj_drop(fused_linear(x.reshape(B, H, W, C), self.proj.weight, self.proj.bias))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"rel_pos_bias={self.rpb is not None}")
