"""Polyline-path masked attention (PPMA, Zhao et al., NeurIPS 2025; https://github.com/zhongchenzhao/PPMA).

Multi-head self-attention over an NHWC map whose logits get a learned, token-dependent decay mask
along polyline paths in the 2-D grid:

* per token and head, two decays ``alpha, beta <= 0`` (``softplus(dt_linear(x_head) + dt_bias) * -exp(A_log)``,
  ``dt_linear`` shared by the heads and applied to the block's normed input);
* 1-D segment sums: ``S[i, j] = sum_{t=min(i,j)+1}^{max(i,j)} a_t`` of ``alpha`` along every row
  (``mask_w``, (B, n, H, W, W)) and of ``beta`` along every column (``mask_h``, (B, n, W, H, H));
* **whole** mode: ``M[(h1,w1),(h2,w2)] = mask_w[h1][w1,w2] + mask_h[w2][h1,h2]`` (horizontal along the
  query's row, then vertical along the key's column) and
  ``out = 0.5 softmax(QK^T + M) V + 0.5 softmax(QK^T + M^T) V`` (probabilities averaged, not logits);
* **chunk** mode (criss-cross): per-row ``A_w = softmax(Q_row K_row^T + mask_w)``, per-column
  ``A_h = softmax(Q_col K_col^T + mask_h)``, ``out = 0.5 A_h(A_w V) + 0.5 A_w(A_h V)``.

Queries and keys carry a 1-D rotary embedding of the raster index ``h * W + w`` (angles
``10000^-linspace(0, 1, d/2)``, interleaved pairs); keys are scaled by ``d^-1/2``; a depthwise 5x5 conv
of ``v`` (LePE) is added before the output projection.

Memory: the L x L mask is never built. Whole mode runs over blocks of query rows, adding the two
segment-sum tables to the logits by broadcasting. Chunk mode runs over groups of heads (or, for one
head too large, over row / column blocks) so that its row and column maps stay within a fixed budget.
Both modes train through custom autograd functions whose backward recomputes the probabilities
(per query block / per head) instead of keeping them: training saves q, k, v and the decays only.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models._features_fx import register_notrace_function, register_notrace_module

from .conv_pos_enc import DepthwiseConvNHWC
from .fused_linear import fused_linear
from .padding import exporting

__all__ = [
    'PolylinePathAttention', 'PolylineRoPE', 'segment_sum', 'apply_rope', 'polyline_whole_attention',
    'polyline_chunk_attention',
]

#: elements of one (block of queries x all keys) logit tensor; bounds the temporaries of both modes
BLOCK_ELEMENTS = 1 << 22


@torch.jit.ignore
def _block_elements() -> int:
    return BLOCK_ELEMENTS


def _segment_sign(n: int, like: torch.Tensor) -> torch.Tensor:
    """(n, n) table of +1 on and below the diagonal, -1 above it, in ``like``'s dtype and device."""
    idx = torch.arange(n, device=like.device)
    return torch.where(idx[:, None] >= idx[None, :], 1., -1.).to(like.dtype)


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """``S[..., i, j] = sum_{t=min(i,j)+1}^{max(i,j)} a[..., t]`` for ``a`` of shape (..., T): (..., T, T).

    Symmetric, zero on the diagonal: ``(c_i - c_j) * sign(i - j)`` of the cumulative sum ``c``, the
    official ``tril(c_i - c_j) + triu(c_j - c_i)`` in two passes over the (T, T) tables.
    """
    c = a.cumsum(-1)
    return (c.unsqueeze(-1) - c.unsqueeze(-2)).mul_(_segment_sign(a.shape[-1], a))


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x_2i, x_2i+1)`` of ``x`` (..., H, W, d) by the (H, W, d) angle tables.

    ``x * cos + rot(x) * sin`` with ``rot(x)_2i = -x_2i+1``, ``rot(x)_2i+1 = x_2i``; the result is contiguous.
    """
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    sin, cos = sin.unflatten(-1, (-1, 2)), cos.unflatten(-1, (-1, 2))
    return torch.stack((x0 * cos[..., 0] - x1 * sin[..., 0], x1 * cos[..., 1] + x0 * sin[..., 1]), dim=-1).flatten(-2)


@register_notrace_module  # tables sized by the (symbolic) map
class PolylineRoPE(nn.Module):
    """The official ``Relpos``: holds the ``angle`` buffer (d,) and returns (sin, cos) of shape (H, W, d).

    ``angle = 1 / 10000 ** linspace(0, 1, d/2)``, each value twice (official buffer layout); the
    position of token (h, w) is its raster index ``h * W + w``.
    """

    def __init__(self, head_dim: int, device=None, dtype=None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f'head_dim={head_dim}: rotary embedding needs an even head dimension')
        angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 2, device=device, dtype=dtype))
        self.register_buffer('angle', angle.unsqueeze(-1).repeat(1, 2).flatten())

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(sin, cos) for the NHWC map ``x``, in ``x``'s dtype."""
        h, w = x.shape[1], x.shape[2]
        index = torch.arange(h * w, device=self.angle.device).to(self.angle)
        phase = (index[:, None] * self.angle[None, :]).reshape(h, w, -1)
        return torch.sin(phase).to(x.dtype), torch.cos(phase).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# whole mode

def _whole_logits(
        q_rows: torch.Tensor, k: torch.Tensor, mask_w: torch.Tensor, mask_h: torch.Tensor, r0: int, r1: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits ``QK^T + M`` and ``QK^T + M^T`` of query rows ``r0:r1``, each (B, n, r, W, H, W).

    ``q_rows`` (B, n, r*W, d), ``k`` (B, n, L, d); ``mask_w`` (B, n, H, W, W), ``mask_h`` (B, n, W, H, H).
    ``M^T[(h1,w1),(h2,w2)] = mask_w[h2][w1,w2] + mask_h[w1][h1,h2]`` (the tables are symmetric).
    """
    b, n, h, w, _ = mask_w.shape
    r = r1 - r0
    s = torch.matmul(q_rows, k.transpose(-1, -2)).view(b, n, r, w, h, w)
    z1 = s + mask_w[:, :, r0:r1, :, None, :]
    z1 += mask_h.permute(0, 1, 3, 4, 2)[:, :, r0:r1, None]
    s += mask_w.permute(0, 1, 3, 2, 4)[:, :, None]
    s += mask_h.permute(0, 1, 3, 2, 4)[:, :, r0:r1, :, :, None]
    return z1, s


def _rows_per_block(b: int, n: int, h: int, w: int) -> int:
    return max(1, min(h, _block_elements() // max(1, b * n * w * h * w)))


def _whole_rows(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, mask_w: torch.Tensor, mask_h: torch.Tensor,
                r0: int, r1: int) -> torch.Tensor:
    """Whole-mode output of query rows ``r0:r1`` from flat qf, kf (B, n, L, d), vf (B, n, L, dv)."""
    b, n, h, w, _ = mask_w.shape
    z1, z2 = _whole_logits(qf[:, :, r0 * w:r1 * w], kf, mask_w, mask_h, r0, r1)
    p = torch.softmax(z1.view(b, n, (r1 - r0) * w, h * w), -1) + torch.softmax(
        z2.view(b, n, (r1 - r0) * w, h * w), -1)
    return torch.matmul(p, vf).mul_(0.5)


def _whole_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_w: torch.Tensor,
                   mask_h: torch.Tensor) -> torch.Tensor:
    """Whole-mode attention over blocks of query rows; q, k, v (B, n, H, W, d) -> (B, n, H*W, d).

    While exporting, all rows form one block: a Python loop over a symbolic height would fix the graph
    to the traced size."""
    b, n, h, w, d = q.shape
    qf, kf, vf = q.reshape(b, n, h * w, d), k.reshape(b, n, h * w, d), v.reshape(b, n, h * w, v.shape[-1])
    if exporting():
        return _whole_rows(qf, kf, vf, mask_w, mask_h, 0, h)
    step = _rows_per_block(b, n, h, w)
    out = [_whole_rows(qf, kf, vf, mask_w, mask_h, r0, min(h, r0 + step)) for r0 in range(0, h, step)]
    return out[0] if len(out) == 1 else torch.cat(out, 2)


class _WholeAttention(torch.autograd.Function):
    """Whole-mode attention whose backward recomputes each block's probabilities (nothing L x L is saved)."""

    @staticmethod
    def forward(ctx, q, k, v, mask_w, mask_h):
        ctx.save_for_backward(q, k, v, mask_w, mask_h)
        return _whole_forward(q, k, v, mask_w, mask_h)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask_w, mask_h = ctx.saved_tensors
        b, n, h, w, d = q.shape
        L = h * w
        qf, kf, vf = q.reshape(b, n, L, d), k.reshape(b, n, L, d), v.reshape(b, n, L, v.shape[-1])
        grad_out = grad_out.contiguous()
        dq = torch.empty_like(qf)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        d_mw = torch.zeros_like(mask_w)                                  # [h1, w1, w2]
        d_mw_k = mask_w.new_zeros(b, n, w, h, w)                         # [w1, h2, w2] of mask_w[h2][w1, w2]
        d_mh_q = mask_h.new_zeros(b, n, h, h, w)                         # [h1, h2, w2] of mask_h[w2][h1, h2]
        d_mh_t = mask_h.new_zeros(b, n, h, w, h)                         # [h1, w1, h2] of mask_h[w1][h1, h2]
        step = _rows_per_block(b, n, h, w)
        for r0 in range(0, h, step):
            r1 = min(h, r0 + step)
            r = r1 - r0
            rows = slice(r0 * w, r1 * w)
            q_rows, g = qf[:, :, rows], grad_out[:, :, rows]
            z1, z2 = _whole_logits(q_rows, kf, mask_w, mask_h, r0, r1)
            p1 = torch.softmax(z1.view(b, n, r * w, L), -1)
            p2 = torch.softmax(z2.view(b, n, r * w, L), -1)
            del z1, z2
            dv += torch.matmul((p1 + p2).transpose(-1, -2), g).mul_(0.5)
            dp = torch.matmul(g, vf.transpose(-1, -2)).mul_(0.5)
            dz1 = p1.mul_(dp - (dp * p1).sum(-1, keepdim=True))
            dz2 = p2.mul_(dp.sub_((dp * p2).sum(-1, keepdim=True)))
            ds = dz1 + dz2
            dq[:, :, rows] = torch.matmul(ds, kf)
            dk += torch.matmul(ds.transpose(-1, -2), q_rows)
            dz1 = dz1.view(b, n, r, w, h, w)
            dz2 = dz2.view(b, n, r, w, h, w)
            d_mw[:, :, r0:r1] += dz1.sum(4)
            d_mh_q[:, :, r0:r1] += dz1.sum(3)
            d_mw_k += dz2.sum(2)
            d_mh_t[:, :, r0:r1] += dz2.sum(5)
        d_mw += d_mw_k.permute(0, 1, 3, 2, 4)
        d_mh = d_mh_q.permute(0, 1, 4, 2, 3) + d_mh_t.permute(0, 1, 3, 2, 4)
        return dq.view_as(q), dk.view_as(k), dv.view_as(v), d_mw, d_mh


@register_notrace_function  # blocks over query rows with Python loops sized by the input
def polyline_whole_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_w: torch.Tensor,
                             mask_h: torch.Tensor) -> torch.Tensor:
    """Whole-mode polyline attention: q, k (B, n, H, W, d), v (B, n, H, W, dv) -> (B, n, H*W, dv).

    ``mask_w`` (B, n, H, W, W) / ``mask_h`` (B, n, W, H, H) are the row / column segment sums.
    """
    if torch.jit.is_scripting() or not torch.is_grad_enabled():
        return _whole_forward(q, k, v, mask_w, mask_h)
    return _whole_autograd(q, k, v, mask_w, mask_h)


@torch.jit.unused
def _whole_autograd(q, k, v, mask_w, mask_h):
    return _WholeAttention.apply(q, k, v, mask_w, mask_h)


# ---------------------------------------------------------------------------------------------
# chunk mode

def _chunk_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_w: torch.Tensor,
                 mask_h: torch.Tensor) -> torch.Tensor:
    """Criss-cross attention for one group of heads: (B, g, H, W, d) -> (B, g, H, W, d)."""
    qc, kc, vc = q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)
    a_w = torch.softmax(torch.matmul(q, k.transpose(-1, -2)).add_(mask_w), -1)      # (B, g, H, W, W)
    a_h = torch.softmax(torch.matmul(qc, kc.transpose(-1, -2)).add_(mask_h), -1)    # (B, g, W, H, H)
    rows_then_cols = torch.matmul(a_h, torch.matmul(a_w, v).transpose(2, 3))       # (B, g, W, H, d)
    cols_then_rows = torch.matmul(a_w, torch.matmul(a_h, vc).transpose(2, 3))      # (B, g, H, W, d)
    return cols_then_rows.add_(rows_then_cols.transpose(2, 3)).mul_(0.5)


def _row_softmax(q: torch.Tensor, k: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T + segment_sum(decay)) over the last axis.

    q, k (B, g, R, T, d) and decay (B, g, R, T) -> (B, g, R, T, T).
    """
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)).add_(segment_sum(decay)), -1)


def _chunk_streamed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                    beta: torch.Tensor) -> torch.Tensor:
    """:func:`_chunk_heads` for maps too large for one head's row/column maps (no autograd).

    Three passes over row / column blocks within ``BLOCK_ELEMENTS``: ``X_h = A_h V`` by columns; then
    by rows ``X_w = A_w V`` and ``A_w X_h``; then by columns ``A_h X_w`` (A_h computed twice).
    """
    b, g, h, w, _ = q.shape
    qc, kc, vc, beta_c = q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), beta.transpose(2, 3)
    cols = max(1, _block_elements() // max(1, b * g * h * h))
    rows = max(1, _block_elements() // max(1, b * g * w * w))
    x_h = torch.cat([
        torch.matmul(_row_softmax(qc[:, :, c:c + cols], kc[:, :, c:c + cols], beta_c[:, :, c:c + cols]),
                     vc[:, :, c:c + cols]) for c in range(0, w, cols)], 2).transpose(2, 3)   # (B, g, H, W, d)
    out = torch.empty_like(q)
    x_w = torch.empty_like(v)
    for r in range(0, h, rows):
        a_w = _row_softmax(q[:, :, r:r + rows], k[:, :, r:r + rows], alpha[:, :, r:r + rows])
        x_w[:, :, r:r + rows] = torch.matmul(a_w, v[:, :, r:r + rows])
        out[:, :, r:r + rows] = torch.matmul(a_w, x_h[:, :, r:r + rows])
    x_w = x_w.transpose(2, 3)
    for c in range(0, w, cols):
        a_h = _row_softmax(qc[:, :, c:c + cols], kc[:, :, c:c + cols], beta_c[:, :, c:c + cols])
        out[:, :, :, c:c + cols] += torch.matmul(a_h, x_w[:, :, c:c + cols]).transpose(2, 3)
    return out.mul_(0.5)


def _segment_sum_backward(grad: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`segment_sum` w.r.t. its input, for an upstream gradient (..., T, T)."""
    signed = grad * _segment_sign(grad.shape[-1], grad)
    d_cumsum = signed.sum(-1) - signed.sum(-2)
    return d_cumsum.flip(-1).cumsum(-1).flip(-1)


def _softmax_backward(p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d logits of ``p = softmax(logits)`` given d p (overwrites ``grad``)."""
    return grad.sub_((grad * p).sum(-1, keepdim=True)).mul_(p)


class _ChunkAttention(torch.autograd.Function):
    """Chunk-mode attention from the decays; the backward recomputes the row/column maps per head group."""

    @staticmethod
    def forward(ctx, q, k, v, alpha, beta):
        ctx.save_for_backward(q, k, v, alpha, beta)
        return _chunk_no_grad(q, k, v, alpha, beta)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, alpha, beta = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        d_alpha, d_beta = torch.empty_like(alpha), torch.empty_like(beta)
        b, n, h, w, _ = q.shape
        group = max(1, min(n, _block_elements() // max(1, b * h * w * (h + w))))
        for g0 in range(0, n, group):
            head = slice(g0, g0 + group)
            qh, kh, vh = q[:, head], k[:, head], v[:, head]
            qc, kc, vc = qh.transpose(2, 3), kh.transpose(2, 3), vh.transpose(2, 3)
            a_w = _row_softmax(qh, kh, alpha[:, head])                          # (B, g, H, W, W)
            a_h = _row_softmax(qc, kc, beta[:, head].transpose(2, 3))           # (B, g, W, H, H)
            x_w = torch.matmul(a_w, vh)                                         # rows: A_w V
            x_h = torch.matmul(a_h, vc)                                         # cols: A_h V
            g = grad_out[:, head].mul(0.5)                                      # rows layout
            gc = g.transpose(2, 3)
            # out = 0.5 (A_h X_w)^T + 0.5 A_w X_h^T
            x_h_rows = x_h.transpose(2, 3)
            d_a_w = torch.matmul(g, x_h_rows.transpose(-1, -2))
            d_x_h = torch.matmul(a_w.transpose(-1, -2), g).transpose(2, 3)      # cols layout
            d_a_h = torch.matmul(gc, x_w.transpose(2, 3).transpose(-1, -2))
            d_x_w = torch.matmul(a_h.transpose(-1, -2), gc).transpose(2, 3)     # rows layout
            d_a_w += torch.matmul(d_x_w, vh.transpose(-1, -2))
            d_a_h += torch.matmul(d_x_h, vc.transpose(-1, -2))
            dv_h = torch.matmul(a_w.transpose(-1, -2), d_x_w)
            dv_h += torch.matmul(a_h.transpose(-1, -2), d_x_h).transpose(2, 3)
            d_s_w = _softmax_backward(a_w, d_a_w)
            d_s_h = _softmax_backward(a_h, d_a_h)
            del a_w, a_h, d_a_w, d_a_h
            dq_h = torch.matmul(d_s_w, kh)
            dq_h += torch.matmul(d_s_h, kc).transpose(2, 3)
            dk_h = torch.matmul(d_s_w.transpose(-1, -2), qh)
            dk_h += torch.matmul(d_s_h.transpose(-1, -2), qc).transpose(2, 3)
            dq[:, head], dk[:, head], dv[:, head] = dq_h, dk_h, dv_h
            d_alpha[:, head] = _segment_sum_backward(d_s_w)
            d_beta[:, head] = _segment_sum_backward(d_s_h).transpose(2, 3)
        return dq, dk, dv, d_alpha, d_beta


def _chunk_no_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                   beta: torch.Tensor) -> torch.Tensor:
    if exporting():  # all heads in one group: a group size computed from a symbolic map would fix the graph
        return _chunk_heads(q, k, v, segment_sum(alpha), segment_sum(beta.transpose(2, 3)))
    b, n, h, w, _ = q.shape
    group = min(n, _block_elements() // max(1, b * h * w * (h + w)))  # 0: one head does not fit
    step = max(1, group)
    outs: List[torch.Tensor] = []
    for g0 in range(0, n, step):
        g1 = min(n, g0 + step)
        qg, kg, vg, ag, bg = q[:, g0:g1], k[:, g0:g1], v[:, g0:g1], alpha[:, g0:g1], beta[:, g0:g1]
        if group >= 1:
            outs.append(_chunk_heads(qg, kg, vg, segment_sum(ag), segment_sum(bg.transpose(2, 3))))
        else:
            outs.append(_chunk_streamed(qg, kg, vg, ag, bg))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


@register_notrace_function  # head groups and blocks sized by the input
def polyline_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                             beta: torch.Tensor) -> torch.Tensor:
    """Chunk-mode (criss-cross) polyline attention: q, k, v (B, n, H, W, d), decays (B, n, H, W) -> (B, n, H, W, d).

    Heads run in groups whose row/column maps fit ``BLOCK_ELEMENTS`` (segment-sum tables built per
    group), and a head whose maps alone do not fit runs in row / column blocks. Under autograd a custom
    function keeps only q, k, v and the decays; its backward recomputes the maps per head group.
    """
    if torch.jit.is_scripting() or not torch.is_grad_enabled():
        return _chunk_no_grad(q, k, v, alpha, beta)
    return _chunk_autograd(q, k, v, alpha, beta)


@torch.jit.unused
def _chunk_autograd(q, k, v, alpha, beta):
    return _ChunkAttention.apply(q, k, v, alpha, beta)


# ---------------------------------------------------------------------------------------------
# module

class PathDecay(nn.Module):
    """The official ``path_embed``: per-token decays alpha, beta (B, n, H, W) from the normed NHWC input.

    ``dt_linear`` (Linear(d, 2), no bias) is shared by the heads; ``dt_bias`` and ``A_log`` are per head.
    """

    def __init__(self, dim: int, num_heads: int, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4, a_init_range: Tuple[float, float] = (1., 1.1), device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.dt_linear = nn.Linear(dim // num_heads, 2, bias=False, **dd)
        self.dt_bias = nn.Parameter(torch.empty(num_heads, **dd))
        self.A_log = nn.Parameter(torch.empty(num_heads, **dd))
        self.dt_range = (dt_min, dt_max, dt_init_floor)
        self.a_init_range = a_init_range
        self.reset_parameters()

    def reset_parameters(self):
        """Official init: dt ~ logU(dt_min, dt_max) floored, dt_bias = softplus^-1(dt); A ~ U(range), A_log = log A."""
        dt_min, dt_max, floor = self.dt_range
        with torch.no_grad():
            dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(*self.a_init_range).log())

    def block_diagonal_weight(self) -> torch.Tensor:
        """``dt_linear`` for all heads at once: a (2n, C) block-diagonal weight (output order head, {alpha, beta})."""
        w = self.dt_linear.weight
        return torch.kron(torch.eye(self.num_heads, dtype=w.dtype, device=w.device), w)

    def decays(self, dt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """alpha, beta (B, n, H, W) from ``dt`` (B, H, W, n, 2) = dt_linear of every head."""
        a = -torch.exp(self.A_log)
        decay = F.softplus(dt + self.dt_bias[:, None]) * a[:, None]
        decay = decay.permute(0, 3, 4, 1, 2)
        return decay[:, :, 0], decay[:, :, 1]


@register_notrace_module  # FX leaf: blocks and head groups sized by the input
class PolylinePathAttention(nn.Module):
    """PPMA token mixer on an NHWC map (official ``MambaAttentionAllDouble`` / ``MambaAttentionChunkDouble``).

    ``mode='whole'``: full attention with the polyline mask; ``mode='chunk'``: criss-cross rows/columns.
    Parameters keep the official names (``q_proj``, ``k_proj``, ``v_proj``, ``lepe.conv``, ``out_proj``,
    ``path_embed``); the four input projections run as one GEMM. ``forward(x, rope)`` takes the stage's
    (sin, cos) tables from :class:`PolylineRoPE`; linears run through :func:`fused_linear`.
    """

    def __init__(self, dim: int, num_heads: int, mode: str = 'whole', device=None, dtype=None):
        super().__init__()
        if mode not in ('whole', 'chunk'):
            raise ValueError(f"mode={mode!r}: expected 'whole' or 'chunk'")
        if dim % num_heads:
            raise ValueError(f'num_heads={num_heads} does not divide dim={dim}')
        dd = {'device': device, 'dtype': dtype}
        self.mode = mode
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(dim, dim, **dd)
        self.k_proj = nn.Linear(dim, dim, **dd)
        self.v_proj = nn.Linear(dim, dim, **dd)
        self.lepe = DepthwiseConvNHWC(dim, 5, **dd)
        self.out_proj = nn.Linear(dim, dim, **dd)
        self.path_embed = PathDecay(dim, num_heads, **dd)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """q | k * scale | v | dt of every head, from one GEMM: (B, H, W, 3C + 2n)."""
        weight = torch.cat([
            self.q_proj.weight, self.k_proj.weight * self.scale, self.v_proj.weight,
            self.path_embed.block_diagonal_weight()])
        bias = torch.cat([
            self.q_proj.bias, self.k_proj.bias * self.scale, self.v_proj.bias,
            self.q_proj.bias.new_zeros(2 * self.num_heads)])
        return fused_linear(x, weight, bias)

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor],
                shortcut: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` (B, H, W, C) normed input, ``rope`` (sin, cos); ``shortcut`` (optional) is added to the output."""
        b, h, w, c = x.shape
        n, d = self.num_heads, self.head_dim
        sin, cos = rope
        q, k, v, dt = self._project(x).split([c, c, c, 2 * n], dim=-1)
        alpha, beta = self.path_embed.decays(dt.unflatten(-1, (n, 2)))
        if torch.is_grad_enabled():  # saved for backward: keep v, not the whole projection output it views
            v = v.contiguous()
        lepe = self.lepe(v)
        q = apply_rope(q.unflatten(-1, (n, d)).permute(0, 3, 1, 2, 4), sin, cos)
        k = apply_rope(k.unflatten(-1, (n, d)).permute(0, 3, 1, 2, 4), sin, cos)
        v = v.unflatten(-1, (n, d)).permute(0, 3, 1, 2, 4)
        if self.mode == 'whole':
            out = polyline_whole_attention(
                q, k, v, segment_sum(alpha), segment_sum(beta.transpose(2, 3))).view(b, n, h, w, d)
        else:
            out = polyline_chunk_attention(q, k, v, alpha, beta)
        out = out.permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
        return fused_linear(out + lepe, self.out_proj.weight, self.out_proj.bias, residual=shortcut)
