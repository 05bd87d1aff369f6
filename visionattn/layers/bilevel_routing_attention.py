"""Bi-Level Routing Attention (BiFormer, Zhu et al., CVPR 2023; https://github.com/rayleizhu/BiFormer).

On an NHWC map split into R regions of T tokens:

1. region level: the mean query and mean key of every region give an (R x R) affinity; each query
   region keeps the ``topk`` key regions of highest affinity (no gradient flows through routing);
2. token level: every query token attends (softmax, multi-head) to all ``topk * T`` tokens of its
   routed regions; a depthwise conv of v (LePE) is added before the output projection.

Two official semantics (module argument ``mode``):

* ``'legacy'`` (``ops/bra_legacy.py``, BiFormer T/S/B/STL): the normed input is zero-padded
  bottom/right to multiples of ``n_win`` *before* the qkv projection (pad tokens carry q = k = v = bias
  and take part in region means, routing and attention), ``n_win x n_win`` regions, routing logits
  ``(q_r * scale) @ k_r^T``, scale ``qk_dim ** -0.5`` (the full width, not the head width), LePE on the
  padded v map, output cropped.
* ``'nchw'`` (``ops/bra_nchw.py``, BiFormer-STL-NCHW): regions of ``(H // n_win, W // n_win)``
  tokens (ceil-mode: there may be more than ``n_win`` per side), region means over the real tokens
  only, routing logits ``q_r @ k_r^T``, q/k/v zero-padded *after* the projection (pad keys have
  logit 0 and value 0 and are not masked), LePE on the unpadded v map.

The token-level step never gathers the ``topk`` copies of K/V that the official code builds: see
:func:`routed_attention` and its backends. ``GlobalAttentionLePE`` is the full attention BiFormer
uses in its last stage.
"""
import contextlib
import contextvars
import os
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models._features_fx import register_notrace_function, register_notrace_module

from .conv_pos_enc import DepthwiseConvNHWC
from .fused_linear import fused_linear
from .padding import crop_to, exporting

__all__ = [
    'BiLevelRoutingAttention', 'GlobalAttentionLePE', 'routed_attention', 'route_regions', 'bra_backend',
    'BRA_BACKENDS', 'BRA_ENV_VAR',
]

#: elements of the K/V rows (and logits) one block of query regions gathers; bounds the temporaries
BLOCK_ELEMENTS = 1 << 22

#: routing to at least 1 / DENSE_MAX_WASTE of the regions of a region table of at most DENSE_MAX_TOKENS tokens
#: per image runs as one masked attention over the whole table (see :func:`_dense_routed_attention`)
DENSE_MAX_WASTE = 4
DENSE_MAX_TOKENS = 256

BRA_BACKENDS = ('torch', 'triton')
BRA_ENV_VAR = 'VISIONATTN_BRA_BACKEND'
_context_backend = contextvars.ContextVar('visionattn_bra_backend', default=None)


def _check_backend(name: str) -> str:
    if name not in BRA_BACKENDS + ('auto',):
        raise ValueError(f'unknown routed-attention backend {name!r}; choose one of {BRA_BACKENDS + ("auto",)}')
    return name


@contextlib.contextmanager
def bra_backend(name: str):
    """Within the block, :func:`routed_attention` calls without an explicit ``backend=`` use ``name``."""
    token = _context_backend.set(_check_backend(name))
    try:
        yield
    finally:
        _context_backend.reset(token)


# ---------------------------------------------------------------------------------------------
# region routing

@register_notrace_function  # topk over a size-dependent number of regions
def route_regions(q_r: torch.Tensor, k_r: torch.Tensor, topk: int, scale: float = 1.0) -> torch.Tensor:
    """Indices (N, R, topk) of the key regions of highest ``(q_r * scale) @ k_r^T``; q_r, k_r (N, R, C).

    The inputs are detached (routing gets no gradient); half-precision affinities are computed in float32.
    """
    q_r, k_r = q_r.detach(), k_r.detach()
    if q_r.dtype in (torch.float16, torch.bfloat16):
        q_r, k_r = q_r.float(), k_r.float()
    if scale != 1.0:
        q_r = q_r * scale
    return torch.topk(q_r @ k_r.transpose(-2, -1), k=topk, dim=-1).indices


# ---------------------------------------------------------------------------------------------
# token-to-token attention over the routed regions

@torch.jit.ignore
def _block_elements() -> int:
    return BLOCK_ELEMENTS


def _regions_per_block(total: int, topk: int, tokens: int, heads: int, head_channels: int) -> int:
    """Query regions per block so that gathered K/V rows plus one block of logits stay in the budget."""
    per_region = topk * tokens * heads * (head_channels + tokens)
    return max(1, min(total, _block_elements() // max(per_region, 1)))


def _blocks(total: int, topk: int, tokens: int, heads: int, head_channels: int) -> List[Tuple[int, int]]:
    """(start, stop) of the blocks of query regions; one block while exporting (sizes are symbolic then: a Python
    range over them would fix the traced batch)."""
    if exporting():
        return [(0, total)]
    step = _regions_per_block(total, topk, tokens, heads, head_channels)
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def _flat_index(index: torch.Tensor) -> torch.Tensor:
    """(N, R, topk) region ids -> (N * R, topk) rows of the flattened (N * R) region table."""
    n, r, topk = index.shape
    offset = torch.arange(n, device=index.device, dtype=index.dtype).mul_(r).view(n, 1, 1)
    return (index + offset).reshape(n * r, topk)


def _region_tables(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor):
    """(N, R, T, M, D) q, k, v and (N, R, topk) index -> (rows (N*R, topk), q, k, v as (N*R, T, M, D) views)."""
    n, r, t, m, dq = q.shape
    return (_flat_index(index), q.reshape(n * r, t, m, dq), k.reshape(n * r, t, m, dq),
            v.reshape(n * r, t, m, v.shape[-1]))


def _gather_heads(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Region table x (NR, T, M, D) and rows (b, topk) -> keys (b, M, topk * T, D) (one copy of the rows)."""
    b, topk = rows.shape
    g = torch.index_select(x, 0, rows.reshape(-1))  # 3x faster than x[rows] on a strided region table
    return g.view(b, topk * x.shape[1], x.shape[2], x.shape[3]).transpose(1, 2)


def _routed_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """PyTorch forward: per block of query regions, gather the routed K/V rows and run SDPA."""
    n, r, t, m, dq = q.shape
    dv = v.shape[-1]
    topk = index.shape[-1]
    rows, qf, kf, vf = _region_tables(q, k, v, index)
    outs = [q.new_empty(0, t, m, dv)]  # an empty batch has no block
    for start, stop in _blocks(n * r, topk, t, m, dq + dv):
        sel = rows[start:stop]
        outs.append(F.scaled_dot_product_attention(
            qf[start:stop].transpose(1, 2), _gather_heads(kf, sel), _gather_heads(vf, sel),
            scale=scale).transpose(1, 2))
    out = outs[1] if len(outs) == 2 else torch.cat(outs)
    return out.reshape(n, r, t, m, dv)


def _softmax_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs, else the input's dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _cpu_flash(q: torch.Tensor, v: torch.Tensor) -> bool:
    """The CPU flash-attention kernels apply: CPU tensors and one head size for q/k and v."""
    return q.device.type == 'cpu' and q.shape[-1] == v.shape[-1]


def _attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """(B, M, Lq, D) attention -> (out, log-sum-exp of the scaled logits): CPU flash kernel, else written out."""
    if _cpu_flash(q, v):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    s = (q @ k.transpose(-2, -1)).to(_softmax_dtype(q)).mul_(scale)
    lse = s.logsumexp(-1)
    return (s.sub_(lse[..., None]).exp_().to(v.dtype) @ v), lse


def _attention_lse_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, scale: float):
    """Gradients (dq, dk, dv) of :func:`_attention_lse` from its saved output and log-sum-exp."""
    if _cpu_flash(q, v):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, False, scale=scale)
    acc = _softmax_dtype(q)
    p = (q @ k.transpose(-2, -1)).to(acc).mul_(scale).sub_(lse[..., None]).exp_()
    dv = p.to(grad.dtype).transpose(-2, -1) @ grad
    dp = (grad @ v.transpose(-2, -1)).to(acc)
    ds = p.mul_(dp.sub_((grad * out).to(acc).sum(-1, keepdim=True))).mul_(scale).to(q.dtype)
    return ds @ k, ds.transpose(-2, -1) @ q, dv


class _RoutedAttention(torch.autograd.Function):
    """Training path of the PyTorch backend: saves q, k, v, the index, the output and its log-sum-exp; the
    backward gathers the routed rows again per block of query regions (CPU: the flash-attention backward kernel)
    and scatter-adds the K/V gradients into their regions. No gathered K/V or probabilities are kept."""

    @staticmethod
    def forward(ctx, q, k, v, index, scale):
        n, r, t, m, dq = q.shape
        dv = v.shape[-1]
        rows, qf, kf, vf = _region_tables(q, k, v, index)
        out = q.new_empty(n * r, m, t, dv)
        lse = torch.empty(n * r, m, t, dtype=_softmax_dtype(q), device=q.device)
        for start, stop in _blocks(n * r, index.shape[-1], t, m, dq + dv):
            sel = rows[start:stop]
            out[start:stop], lse[start:stop] = _attention_lse(
                qf[start:stop].transpose(1, 2), _gather_heads(kf, sel), _gather_heads(vf, sel), scale)
        ctx.save_for_backward(q, k, v, index, out, lse)
        ctx.scale = scale
        return out.transpose(1, 2).reshape(n, r, t, m, dv)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, index, out, lse = ctx.saved_tensors
        n, r, t, m, dq = q.shape
        dv = v.shape[-1]
        topk = index.shape[-1]
        rows, qf, kf, vf = _region_tables(q, k, v, index)
        gf = grad_out.reshape(n * r, t, m, dv)
        grad_q = torch.empty(n * r, t, m, dq, dtype=q.dtype, device=q.device)
        grad_k = torch.zeros(n * r, t, m, dq, dtype=k.dtype, device=k.device)
        grad_v = torch.zeros(n * r, t, m, dv, dtype=v.dtype, device=v.device)
        for start, stop in _blocks(n * r, topk, t, m, dq + dv):
            sel = rows[start:stop]
            b = stop - start
            dqb, dkb, dvb = _attention_lse_backward(
                gf[start:stop].transpose(1, 2), qf[start:stop].transpose(1, 2), _gather_heads(kf, sel),
                _gather_heads(vf, sel), out[start:stop], lse[start:stop], ctx.scale)
            grad_q[start:stop] = dqb.transpose(1, 2)
            flat_sel = sel.reshape(-1)
            grad_k.index_add_(0, flat_sel, dkb.transpose(1, 2).reshape(b * topk, t, m, dq))
            grad_v.index_add_(0, flat_sel, dvb.transpose(1, 2).reshape(b * topk, t, m, dv))
        return (grad_q.view(n, r, t, m, dq), grad_k.view(n, r, t, m, dq), grad_v.view(n, r, t, m, dv),
                None, None)


def _use_dense(index: torch.Tensor, tokens: int) -> bool:
    """Whether :func:`_dense_routed_attention` computes this call (not while exporting: the traced graph keeps the
    blocked form, whose size does not depend on the map)."""
    r, topk = index.shape[1], index.shape[2]
    return r <= DENSE_MAX_WASTE * topk and r * tokens <= DENSE_MAX_TOKENS and not exporting()


def _dense_routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """:func:`routed_attention` as one attention per image over all ``R * T`` tokens of its region table, each
    query masked to the tokens of its routed regions (no gather, autograd through SDPA's fused kernels).

    Where the routed regions are a large share of all regions (BiFormer's third stage at 224²: 16 of 49 regions
    of 2 x 2 tokens) the per-region products are tiny (4 queries x 64 keys); one masked product over the
    196 tokens does 3x the multiply-adds in far fewer, larger steps (forward + backward at batch 8: 26 -> 8 ms).
    The boolean mask, which SDPA keeps as floats for backward, is ``(R T)^2`` per image, hence the size cap.
    """
    n, r, t, m, _ = q.shape
    routed = torch.zeros(n, r, r, dtype=torch.bool, device=q.device).scatter_(2, index, True)
    mask = routed[:, :, None, :, None].expand(n, r, t, r, t).reshape(n, 1, r * t, r * t)
    q, k, v = (x.reshape(n, r * t, m, x.shape[-1]).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(n, r, t, m, v.shape[-1])


def _triton_routed_attention():
    try:
        from ._bra_triton import routed_attention_triton
    except ImportError as err:
        raise RuntimeError(f"backend 'triton': Triton is not importable ({err})") from err
    return routed_attention_triton


def _resolve_backend(backend: Optional[str], q: torch.Tensor) -> str:
    name = _check_backend(backend or _context_backend.get() or os.environ.get(BRA_ENV_VAR) or 'auto')
    if name == 'auto':
        if q.device.type != 'cuda' or exporting():
            return 'torch'
        try:
            _triton_routed_attention()
            return 'triton'
        except RuntimeError:
            return 'torch'
    if name == 'triton' and q.device.type != 'cuda' and os.environ.get('TRITON_INTERPRET') != '1':
        raise RuntimeError(f"backend 'triton': needs CUDA tensors (got {q.device.type}); "
                           'CPU runs only under TRITON_INTERPRET=1')
    return name


@torch.jit.unused
def _dispatch(q, k, v, index, scale: float, backend: Optional[str]):
    if _resolve_backend(backend, q) == 'triton':
        return _triton_routed_attention()(q, k, v, index, scale)
    if _use_dense(index, q.shape[2]):
        return _dense_routed_attention(q, k, v, index, scale)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _RoutedAttention.apply(q, k, v, index, scale)
    return _routed_forward(q, k, v, index, scale)


@register_notrace_function  # blocks sized by the input
def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, scale: float,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Attention of every query region to the tokens of its routed key regions.

    q, k (N, R, T, M, Dq) and v (N, R, T, M, Dv) hold M heads of the T tokens of R regions (any strides,
    unit last stride); ``index`` (N, R, topk) lists each query region's key regions. Returns
    (N, R, T, M, Dv): ``softmax(scale * q k^T) v`` over the ``topk * T`` routed tokens.

    Backends (chosen here): an explicit ``backend=`` wins, then ``with bra_backend(name):``, then the
    environment variable ``VISIONATTN_BRA_BACKEND``, else ``auto``: ``triton`` on CUDA when Triton is
    importable (fused kernels reading K/V rows by region index, forward and backward), otherwise
    ``torch``: blocks of query regions gather their routed rows within a fixed budget
    (``BLOCK_ELEMENTS``) and run SDPA; training saves q, k, v and the index and recomputes the
    probabilities per block in backward, so neither the ``topk`` copies of K/V nor the attention
    probabilities are kept. When the routed regions are at least ``1 / DENSE_MAX_WASTE`` of a region table
    of at most ``DENSE_MAX_TOKENS`` tokens, ``torch`` runs one masked SDPA over the table instead
    (:func:`_dense_routed_attention`). TorchScript and exported graphs use the blocked ``torch`` forward.
    """
    if torch.jit.is_scripting():
        return _routed_forward(q, k, v, index, scale)
    return _dispatch(q, k, v, index, scale, backend)


# ---------------------------------------------------------------------------------------------
# modules


def _split_regions(x: torch.Tensor, grid: Tuple[int, int], region: Tuple[int, int]) -> torch.Tensor:
    """NHWC ``(n, h, w, C)`` zero-padded bottom/right to ``grid * region`` -> ``(n * gh * gw, rh * rw, C)`` tokens of
    the ``gh x gw`` regions of ``rh x rw`` tokens (raster order). The caller gives both factors, so a dynamic-shape
    trace keeps short size expressions (a generic window partition of the padded map costs sympy seconds per
    layer)."""
    n, h, w, c = x.shape
    (gh, gw), (rh, rw) = grid, region
    if exporting() or gh * rh > h or gw * rw > w:
        x = F.pad(x, [0, 0, 0, gw * rw - w, 0, gh * rh - h])
    return x.reshape(n, gh, rh, gw, rw, c).transpose(2, 3).reshape(n * gh * gw, rh * rw, c)


def _merge_regions(x: torch.Tensor, n: int, grid: Tuple[int, int], region: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`_split_regions` without the crop: ``(n * gh * gw, rh * rw, C)`` -> ``(n, gh * rh, gw * rw, C)``."""
    (gh, gw), (rh, rw) = grid, region
    return x.reshape(n, gh, gw, rh, rw, x.shape[-1]).transpose(2, 3).reshape(n, gh * rh, gw * rw, x.shape[-1])


@register_notrace_module  # FX leaf: padding, regions and blocks sized by the input
class BiLevelRoutingAttention(nn.Module):
    """BRA on a normed NHWC map ``[N, H, W, C]`` -> ``[N, H, W, C]``.

    Parameters: ``qkv`` (Linear C -> 2 qk_dim + C, rows [q | k | v]; the official ``qkv.qkv`` /
    ``qkv_linear``), ``lepe`` (depthwise ``side_dwconv`` conv, the official ``lepe``), ``proj`` (the
    official ``wo`` / ``output_linear``). ``mode`` is ``'legacy'`` or ``'nchw'`` (see the module docstring);
    ``auto_pad`` (legacy only) pads maps whose sides are not multiples of ``n_win``; without it such a
    map raises ``ValueError``.
    """

    def __init__(self, dim: int, num_heads: int, n_win: int = 7, topk: int = 4, qk_dim: Optional[int] = None,
                 side_dwconv: int = 5, mode: str = 'legacy', auto_pad: bool = True, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        qk_dim = qk_dim or dim
        if mode not in ('legacy', 'nchw'):
            raise ValueError(f"mode={mode!r}: expected 'legacy' or 'nchw'")
        if mode == 'nchw' and qk_dim != dim:
            raise ValueError(f"qk_dim={qk_dim}: mode='nchw' projects q, k and v to dim={dim}")
        if dim % num_heads or qk_dim % num_heads:
            raise ValueError(f'num_heads={num_heads} must divide dim={dim} and qk_dim={qk_dim}')
        if n_win < 1 or not 1 <= topk <= n_win * n_win:
            raise ValueError(f'topk={topk}, n_win={n_win}: expected n_win >= 1 and 1 <= topk <= n_win**2')
        self.dim, self.qk_dim, self.num_heads = dim, qk_dim, num_heads
        self.n_win, self.topk, self.mode, self.auto_pad = n_win, topk, mode, auto_pad
        self.scale = (qk_dim if mode == 'legacy' else dim) ** -0.5
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, **dd)
        self.lepe = DepthwiseConvNHWC(dim, side_dwconv, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, qk_dim={self.qk_dim}, num_heads={self.num_heads}, n_win={self.n_win}, '
                f'topk={self.topk}, mode={self.mode!r}, auto_pad={self.auto_pad}')

    def _attend(self, qkv: torch.Tensor, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Region table qkv (n * R, T, 2 qk_dim + C) and index (n, R, topk) -> (attention (n * R, T, C), the table's
        v view). The LePE takes that view, so the gradients of v meet before the split's backward, which then
        writes the table's gradient once (a slice of qkv would add a zero-filled table-sized gradient)."""
        n, r, _ = index.shape
        nr, t = qkv.shape[:2]
        m, cq = self.num_heads, self.qk_dim
        q, k, v = qkv.split([cq, cq, self.dim], dim=-1)
        out = routed_attention(
            q.unflatten(0, (n, r)).unflatten(-1, (m, cq // m)), k.unflatten(0, (n, r)).unflatten(-1, (m, cq // m)),
            v.unflatten(0, (n, r)).unflatten(-1, (m, self.dim // m)), index, self.scale)
        return out.reshape(nr, t, self.dim), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        if self.mode == 'legacy':
            return self._forward_legacy(x, n, h, w)
        return self._forward_nchw(x, n, h, w)

    def _forward_legacy(self, x: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
        s = self.n_win
        if not self.auto_pad and (h % s or w % s):
            raise ValueError(f'input: a {h}x{w} map is not divisible into n_win={s} regions per side; '
                             'use auto_pad=True (pads as the official auto_pad) or a multiple of n_win')
        grid, region = (s, s), ((h + s - 1) // s, (w + s - 1) // s)  # pads as the official auto_pad
        qkv = F.linear(_split_regions(x, grid, region), self.qkv.weight, self.qkv.bias)  # (n * s^2, T, 2cq + C)
        cq = self.qk_dim
        means = qkv.view(n, s * s, region[0] * region[1], qkv.shape[-1])[..., :2 * cq].mean(2)
        index = route_regions(means[..., :cq], means[..., cq:], self.topk, self.scale)
        out, v = self._attend(qkv, index)
        out = _merge_regions(out, n, grid, region) + self.lepe(_merge_regions(v, n, grid, region))
        out = fused_linear(out, self.proj.weight, self.proj.bias)
        return crop_to(out, h, w)

    def _forward_nchw(self, x: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
        s = self.n_win
        if h < s or w < s:
            raise ValueError(f'input: a {h}x{w} map is smaller than n_win={s} tokens per side, the least '
                             "mode='nchw' regions of (H // n_win, W // n_win) tokens need")
        rh, rw = h // s, w // s
        grid = ((h + rh - 1) // rh, (w + rw - 1) // rw)  # ceil mode: more than n_win regions where rh does not divide h
        qkv = fused_linear(x, self.qkv.weight, self.qkv.bias)  # (n, h, w, 3C)
        c = self.dim
        regions = _split_regions(qkv, grid, (rh, rw))  # zero-padded after the projection: (n * R, T, 3C)
        # region means over the real tokens (official avg_pool2d(ceil_mode=True, count_include_pad=False))
        rows = (h - torch.arange(grid[0], device=x.device) * rh).clamp(max=rh)
        cols = (w - torch.arange(grid[1], device=x.device) * rw).clamp(max=rw)
        counts = (rows[:, None] * cols[None, :]).reshape(-1, 1).to(qkv.dtype)
        means = regions[..., :2 * c].sum(1).view(n, grid[0] * grid[1], 2 * c) / counts
        index = route_regions(means[..., :c], means[..., c:], self.topk)
        out = crop_to(_merge_regions(self._attend(regions, index)[0], n, grid, (rh, rw)), h, w)
        out = out + self.lepe(qkv[..., 2 * c:])
        return fused_linear(out, self.proj.weight, self.proj.bias)


class GlobalAttentionLePE(nn.Module):
    """Full multi-head attention with LePE on an NHWC map (BiFormer's last stage).

    ``qkv`` (no bias), ``proj``, ``lepe`` (depthwise ``side_dwconv`` conv) as the official
    ``AttentionLePE`` (``lepe_on='x'``: LePE of the attention input) or ``nchwAttentionLePE``
    (``lepe_on='v'``); LePE is added before ``proj``; scale ``head_dim ** -0.5``.
    """

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5, lepe_on: str = 'x',
                 device=None, dtype=None):
        super().__init__()
        if lepe_on not in ('x', 'v'):
            raise ValueError(f"lepe_on={lepe_on!r}: expected 'x' or 'v'")
        if dim % num_heads:
            raise ValueError(f'num_heads={num_heads} does not divide dim={dim}')
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.lepe_on_v = lepe_on == 'v'
        self.qkv = nn.Linear(dim, 3 * dim, bias=False, **dd)
        self.lepe = DepthwiseConvNHWC(dim, side_dwconv, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        m = self.num_heads
        qkv = fused_linear(x, self.qkv.weight, None)
        q, k, v = qkv.view(n, h * w, 3, m, c // m).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        lepe = self.lepe(qkv[..., 2 * c:] if self.lepe_on_v else x)
        out = out.transpose(1, 2).reshape(n, h, w, c) + lepe
        return fused_linear(out, self.proj.weight, self.proj.bias)
