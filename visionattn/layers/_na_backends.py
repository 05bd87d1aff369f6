"""Neighbourhood-attention backends: geometry shared by all of them, plus the ``torch``,
``flex`` and ``natten`` implementations (the ``triton`` one lives in ``_na_triton.py``).

Every backend function has the signature ``fn(q, k, v, kernel, dilation, rpb, scale)``:
q/k/v ``[B, H, W, heads, head_dim]`` (heads-last, natten's layout), ``kernel`` and ``dilation``
per-axis ``(int, int)`` tuples with the small-input policy already applied, ``rpb``
``[heads, 2kh-1, 2kw-1]`` or None, ``scale`` a float multiplying q·k (not the bias). Each returns
the output in the layout of q.

Geometry (natten's ``get_window_start``, extended for the small-input policy). On an axis of
length L with kernel k and dilation d, token i lies in group g = i mod d at group position
p = i div d; the group has Lg = ceil((L - g) / d) tokens; the window starts at
s = clamp(p - k//2, 0, max(Lg, k) - k) and holds group positions s .. s+k-1 that are < Lg.
With Lg ≥ k (natten's k·d ≤ L) this is exactly natten; Lg < k only arises from the padding
policy and then means "the whole axis". The RPB of query p and key p' in the same group is
``rpb[h, p'_r - p_r + kh - 1, p'_c - p_c + kw - 1]``.
"""
import functools
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import unset_fake_temporarily

Pair = Tuple[int, int]


def table_cache(maxsize: int):
    """``functools.lru_cache`` for index-table builders; a miss builds real tensors outside inference mode.

    Tables cached during a ``torch.inference_mode()`` call would be inference tensors, which autograd
    cannot save, and tables built while ``torch.export`` / ONNX export traces with fake tensors would be
    fake; built with inference mode and fake mode off they serve every later call, in any grad mode,
    and a trace records them as constants. Hits cost what ``lru_cache`` costs.
    """
    def decorator(fn):
        @functools.wraps(fn)
        def build(*args, **kwargs):
            with torch.inference_mode(False), unset_fake_temporarily():
                return fn(*args, **kwargs)
        return functools.lru_cache(maxsize=maxsize)(build)
    return decorator


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def window_start(pos: torch.Tensor, group_len: torch.Tensor, kernel: int) -> torch.Tensor:
    """Window start (in group positions) for group positions ``pos`` in groups of ``group_len``."""
    return torch.minimum((pos - kernel // 2).clamp(min=0), group_len.clamp(min=kernel) - kernel)


def group_lengths(length: int, dilation: int) -> torch.Tensor:
    """``[d]`` int64: tokens in each dilation group of an axis of ``length``."""
    g = torch.arange(dilation)
    return torch.div(length - g + dilation - 1, dilation, rounding_mode="floor")


# --------------------------------------------------------------------------------------------
# torch backend: query tiles against their key halo, dense matmuls, O(N·(T+k-1)²) memory.
# --------------------------------------------------------------------------------------------

# Query tile sides. An axis whose dilation group has at most TORCH_TILE + k - 1 positions is one tile (its
# halo would span it anyway). Longer groups use, of the candidate sides for that axis, the one that pads the
# group least (ties: the larger). Measured on CPU at k = 7, batch 8, 56² and 28² maps: inference (no grad,
# fused SDPA) is fastest at 7-8 per axis, where a side that divides the group (8 at 56, 7 at 28) avoids
# padded queries; training (:class:`_TorchTrainNA`) at 4 rows by 7-8 columns, whose smaller halo
# (10 x 14 keys per 32 queries against 14 x 14 per 64) costs fewer masked logits and a smaller gradient
# scatter than the duplicated keys cost: stage-1 forward + backward 92 -> 78 ms, stage 2 57 -> 41 ms.
TORCH_TILE = 8
INFERENCE_TILE_SIDES = ((7, 8), (7, 8))
TRAINING_TILE_SIDES = ((4,), (7, 8))


def _tile(length: int, kernel: int, dilation: int, sides: Tuple[int, ...]) -> int:
    """Query tile side on one axis (see ``TORCH_TILE``)."""
    group = _ceil_div(length, dilation)
    if group <= TORCH_TILE + kernel - 1:
        return group
    return min(sides, key=lambda t: (_ceil_div(group, t) * t, -t))


def _tiles(size: Pair, kernel: Pair, dilation: Pair, sides) -> Pair:
    return tuple(_tile(n, kk, d, s) for n, kk, d, s in zip(size, kernel, dilation, sides))


@table_cache(64)
def _axis_plan(length: int, kernel: int, dilation: int, tile: int):
    """Index tables for one axis (CPU tensors).

    Group positions are padded to P = nT·T (nT query tiles of T per group). Each tile's keys
    are a halo of Hl = min(T+k-1, P) consecutive group positions starting at the tile's first
    window start (clamped to P-Hl): window starts are monotone, so the halo holds every key of
    every query in the tile. Returns
    q_src [d, nT, T] absolute index of every query slot (clamped; slots past the group's end
    are padding whose outputs are dropped), k_src [d, nT, Hl] absolute index of every halo key,
    slot [L] the query slot g·P + p = (g·nT + tile)·T + offset of every real token,
    valid [d, nT, T, Hl] and rel [d, nT, T, Hl] (RPB index p' - p + k - 1, clamped).
    """
    d, k, T = dilation, kernel, tile
    n_tiles = _ceil_div(_ceil_div(length, d), T)
    P = n_tiles * T
    halo = min(T + k - 1, P)
    glen = group_lengths(length, d).view(d, 1)
    pos = torch.arange(P).view(1, P)
    start = window_start(pos, glen, k).view(d, n_tiles, T)
    key = start[:, :, :1].clamp(max=P - halo) + torch.arange(halo)  # [d, nT, Hl]
    key4, s4 = key[:, :, None, :], start[..., None]
    valid = (key4 >= s4) & (key4 < s4 + k) & (key4 < glen.view(d, 1, 1, 1))
    rel = (key4 - pos.view(1, n_tiles, T, 1) + k - 1).clamp(0, 2 * k - 2)
    g = torch.arange(d).view(d, 1)
    q_src = (pos * d + g).clamp(max=length - 1).view(d, n_tiles, T)
    k_src = (key * d + g.view(d, 1, 1)).clamp(max=length - 1)
    i = torch.arange(length)
    slot = (i % d) * P + i // d
    return q_src, k_src, slot, valid, rel


@table_cache(32)
def _torch_plan(size: Pair, kernel: Pair, dilation: Pair, tile: Pair, device: torch.device):
    """Flat gather indices over the H·W tokens, in tile order [d_r, d_c, nT_r, nT_c, ·, ·]:
    q_idx [G·T_r·T_c], k_idx [G·Hl_r·Hl_c], out_idx [H·W] (where each token's output sits),
    and the bias index [G, T_r·T_c, Hl_r·Hl_c] into the flattened RPB (keys outside the window
    point one past its end, where the caller puts -inf). G = d_r·d_c·nT_r·nT_c tiles."""
    (qr, kr, sr, vr, rr), (qc, kc, sc, vc, rc) = (
        _axis_plan(size[a], kernel[a], dilation[a], tile[a]) for a in (0, 1))
    (dr, ntr, tr), (dc, ntc, tc) = qr.shape, qc.shape
    hr, hc = kr.shape[-1], kc.shape[-1]
    W = size[1]

    def grid(r, c):  # [dr, nTr, a] x [dc, nTc, b] -> flat [dr, dc, nTr, nTc, a, b]
        return (r.view(dr, 1, ntr, 1, -1, 1) * W + c.view(1, dc, 1, ntc, 1, -1)).reshape(-1)

    # output slot of token (i, j) in the [dr, dc, nTr, nTc, Tr, Tc] order
    gr, offr = sr // tr, sr % tr  # gr = group·nTr + tile
    gc, offc = sc // tc, sc % tc
    out = (((gr // ntr * dc).view(-1, 1) + gc // ntc) * ntr + (gr % ntr).view(-1, 1)) * ntc
    out = ((out + gc % ntc) * tr + offr.view(-1, 1)) * tc + offc
    width = 2 * kernel[1] - 1
    shape8 = (dr, 1, ntr, 1, tr, 1, hr, 1), (1, dc, 1, ntc, 1, tc, 1, hc)
    bias = rr.view(shape8[0]) * width + rc.view(shape8[1])
    bias = torch.where(vr.view(shape8[0]) & vc.view(shape8[1]), bias,
                       (2 * kernel[0] - 1) * width)
    bias = bias.reshape(dr * dc * ntr * ntc, tr * tc, hr * hc)
    return tuple(t.to(device) for t in (grid(qr, qc), grid(kr, kc), out.reshape(-1), bias))


def _masked_attention(q, k, v, bias, scale: float):
    """softmax(scale·q·kᵀ + bias)·v for [B, M, L, D] inputs and a [1, M, LQ, LK] bias (broadcast over B).

    The training path on CPU, where SDPA would take its math path and its -inf-safe softmax adds three
    passes over the logits (isneginf, all, where). ``bias`` marks keys outside a window with the dtype's
    lowest finite value instead of -inf: exp underflows to exactly 0 for them, and a padding query slot with
    no key at all (an empty dilation group) gets a finite row whose output is dropped and whose gradient is 0.
    """
    logits = torch.matmul(q * scale, k.transpose(-1, -2)) + bias
    return torch.matmul(logits.softmax(-1), v)


def _bias_table(rpb: Optional[torch.Tensor], like: torch.Tensor, kernel: Pair, outside: float) -> torch.Tensor:
    """``[heads, (2kh-1)·(2kw-1) + 1]``: the flattened RPB (zeros without one) in ``like``'s dtype (``like`` is
    ``[..., heads, D]``), plus a last column ``outside`` that the bias index gives keys outside a window."""
    nh = like.shape[-2]
    if rpb is None:
        table = like.new_zeros(nh, (2 * kernel[0] - 1) * (2 * kernel[1] - 1))
    else:
        table = rpb.to(like.dtype).reshape(nh, -1)
    return torch.cat([table, table.new_full((nh, 1), outside)], 1)


def na2d_torch(q, k, v, kernel: Pair, dilation: Pair, rpb: Optional[torch.Tensor], scale: float):
    """Pure-PyTorch neighbourhood attention (any device, autograd for q, k, v and rpb).

    Queries are cut, per dilation group, into T×T tiles (T per axis from :func:`_tile`); each
    tile attends densely to its (T+k-1)² key halo through one fused ``scaled_dot_product_attention`` whose additive mask
    holds the RPB and -inf outside each query's window. Time and memory O(N·(T+k-1)²)."""
    B, H, W, nh, D = q.shape
    tile = _tiles((H, W), kernel, dilation, INFERENCE_TILE_SIDES)
    q_idx, k_idx, out_idx, bias_idx = _torch_plan((H, W), kernel, dilation, tile, q.device)
    G, LQ, LK = bias_idx.shape

    def gather(x, idx, n):  # [B, H, W, heads, D] -> [B, heads·G, n, D], token rows gathered
        x = x.reshape(B, H * W, nh * D).index_select(1, idx).reshape(B, G, n, nh, D)
        return x.permute(0, 3, 1, 2, 4).reshape(B, nh * G, n, D)

    explicit = q.device.type == "cpu" and torch.is_grad_enabled()
    table = _bias_table(rpb, q, kernel, torch.finfo(q.dtype).min if explicit else float("-inf"))
    bias = table.index_select(1, bias_idx.view(-1)).view(1, nh * G, LQ, LK)
    if q.is_cuda and bias.requires_grad:  # CUDA's SDPA kernels take no grad of a broadcast mask
        bias = bias.expand(B, -1, -1, -1).contiguous()
    qg, kg, vg = gather(q, q_idx, LQ), gather(k, k_idx, LK), gather(v, k_idx, LK)
    if explicit:
        out = _masked_attention(qg, kg, vg, bias, scale)
    else:
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=bias, scale=scale)
    out = out.reshape(B, nh, G * LQ, D).transpose(1, 2).index_select(1, out_idx)
    return out.reshape(B, H, W, nh, D)


class _TorchTrainNA(torch.autograd.Function):
    """The torch backend's tiled attention under autograd, from the fused ``qkv`` ``[B, H, W, 3, heads, D]``
    (the layout of the ``qkv`` linear's output) to ``[B, H, W, heads, D]``, with a hand-written backward.

    Forward as :func:`na2d_torch`'s explicit path: q tiles and k / v halos gathered head-major (k and v in
    one gather), q scaled in its gathered copy, logits + bias, softmax, product with v. The backward returns
    the gradient of ``qkv`` as one tensor: the q part gathered back from the tile slots (each token has one
    slot; padding slots have no gradient), the k / v halo parts scatter-added in one ``index_add_``. Autograd
    through the written-out ops instead zero-fills and scatter-adds three full-size gradients (one per
    ``index_select``), copies every head permutation, and stacks q / k / v into the ``qkv`` gradient.
    """

    @staticmethod
    def forward(ctx, qkv, table, q_idx, k_idx, out_idx, bias_idx, scale: float):
        B, H, W, _, nh, D = qkv.shape
        G, LQ, LK = bias_idx.shape
        tokens = qkv.reshape(B, H * W, 3, nh, D)
        q = tokens[:, :, 0].permute(0, 2, 1, 3).index_select(2, q_idx).mul_(scale)       # [B, nh, G·LQ, D]
        kv = tokens[:, :, 1:].permute(2, 0, 3, 1, 4).index_select(3, k_idx)              # [2, B, nh, G·LK, D]
        q, k, v = q.view(-1, LQ, D), kv[0].view(-1, LK, D), kv[1].view(-1, LK, D)
        logits = torch.bmm(q, k.transpose(1, 2))
        logits.view(B, nh * G, LQ, LK).add_(table.index_select(1, bias_idx.view(-1)).view(1, nh * G, LQ, LK))
        attn = torch.softmax(logits, -1)
        out = torch.bmm(attn, v).view(B, nh, G * LQ, D).transpose(1, 2).index_select(1, out_idx)
        ctx.save_for_backward(q, kv, attn, q_idx, k_idx, out_idx, bias_idx)
        ctx.scale, ctx.table_width = scale, table.shape[1]
        return out.view(B, H, W, nh, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, kv, attn, q_idx, k_idx, out_idx, bias_idx = ctx.saved_tensors
        B, H, W, nh, D = grad.shape
        G, LQ, LK = bias_idx.shape
        k, v = kv[0].view(-1, LK, D), kv[1].view(-1, LK, D)
        grad = grad.reshape(B, H * W, nh, D).transpose(1, 2)
        if G * LQ == H * W:  # no padding slot: q_idx is the slot -> token permutation
            g = grad.index_select(2, q_idx)
        else:
            g = grad.new_zeros(B, nh, G * LQ, D).index_copy_(2, out_idx, grad)
        g = g.view(-1, LQ, D)
        d_logits = torch._softmax_backward_data(torch.bmm(g, v.transpose(1, 2)), attn, -1, attn.dtype)
        dkv = torch.empty_like(kv).view(2, -1, LK, D)
        torch.bmm(d_logits.transpose(1, 2), q, out=dkv[0])
        torch.bmm(attn.transpose(1, 2), g, out=dkv[1])
        dq = torch.bmm(d_logits, k).mul_(ctx.scale).view(B, nh, G * LQ, D)
        dqkv = grad.new_empty(B, H * W, 3, nh, D)
        dqkv[:, :, 0].copy_(dq.transpose(1, 2).index_select(1, out_idx))
        halo = dkv.new_zeros(2 * B * nh, H * W, D).index_add_(1, k_idx, dkv.view(2 * B * nh, G * LK, D))
        dqkv[:, :, 1:].copy_(halo.view(2, B, nh, H * W, D).permute(1, 3, 0, 2, 4))
        d_table = None
        if ctx.needs_input_grad[1]:
            d_bias = d_logits.view(B, nh, G * LQ * LK).sum(0)
            d_table = d_bias.new_zeros(nh, ctx.table_width).index_add_(1, bias_idx.view(-1), d_bias)
        return dqkv.view(B, H, W, 3, nh, D), d_table, None, None, None, None, None


def na2d_torch_train(qkv: torch.Tensor, kernel: Pair, dilation: Pair, rpb: Optional[torch.Tensor],
                     scale: float) -> torch.Tensor:
    """:func:`na2d_torch` of the fused ``qkv`` ``[B, H, W, 3, heads, D]`` under autograd (CPU, float32 / float64),
    with training tiles and the hand-written backward of :class:`_TorchTrainNA`; returns ``[B, H, W, heads, D]``."""
    H, W = qkv.shape[1], qkv.shape[2]
    tile = _tiles((H, W), kernel, dilation, TRAINING_TILE_SIDES)
    q_idx, k_idx, out_idx, bias_idx = _torch_plan((H, W), kernel, dilation, tile, qkv.device)
    table = _bias_table(rpb, qkv, kernel, torch.finfo(qkv.dtype).min)
    return _TorchTrainNA.apply(qkv, table, q_idx, k_idx, out_idx, bias_idx, scale)


# --------------------------------------------------------------------------------------------
# gather backend: every query's kh·kw keys gathered densely, index tables computed in the graph.
# --------------------------------------------------------------------------------------------

def _axis_neighbours(length: int, kernel: int, dilation: int, device: torch.device):
    """One axis of length L, small-input policy included, with tensor ops only (``length`` may be
    symbolic): key index [L, k] (absolute, clamped), validity [L, k] and RPB index [L, k] of every query."""
    i = torch.arange(length, device=device)
    n = i[-1:] + 1  # the length as a [1] tensor, so no Python branch depends on it
    d = torch.where(n >= kernel * dilation, torch.full_like(n, dilation),
                    torch.div(n, kernel, rounding_mode="floor").clamp(min=1))
    g, p = i % d, torch.div(i, d, rounding_mode="floor")
    glen = torch.div(n - g + d - 1, d, rounding_mode="floor")
    key = window_start(p, glen, kernel)[:, None] + torch.arange(kernel, device=device)  # group positions
    index = torch.minimum(key * d + g[:, None], n - 1)
    rel = (key - p[:, None] + kernel - 1).clamp(0, 2 * kernel - 2)
    return index, key < glen[:, None], rel


def na2d_gather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: Tuple[int, int],
                dilation: Tuple[int, int], rpb: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Neighbourhood attention by gathering each query's kh·kw keys and values (any device, autograd).

    The index tables are computed inside the graph from the input size, with the small-input policy
    as tensor ops (``dilation`` may be given before or after the policy), so this backend scripts with
    TorchScript and exports with symbolic height and width. Memory O(N·kh·kw·C)."""
    B, H, W, nh, D = q.shape
    kh, kw = kernel
    ir, vr, rr = _axis_neighbours(H, kh, dilation[0], q.device)
    ic, vc, rc = _axis_neighbours(W, kw, dilation[1], q.device)
    index = (ir[:, None, :, None] * W + ic[None, :, None, :]).reshape(-1)  # [H·W·kh·kw] token rows
    keys = k.reshape(B, H * W, nh, D).index_select(1, index).reshape(B, H, W, kh * kw, nh, D)
    values = v.reshape(B, H * W, nh, D).index_select(1, index).reshape(B, H, W, kh * kw, nh, D)
    attn = torch.einsum("bhwnd,bhwknd->bhwnk", q * scale, keys)
    if rpb is not None:
        rel = (rr[:, None, :, None] * (2 * kw - 1) + rc[None, :, None, :]).reshape(-1)
        bias = rpb.to(q.dtype).reshape(nh, -1).index_select(1, rel).reshape(nh, H, W, kh * kw)
        attn = attn + bias.permute(1, 2, 0, 3)
    valid = (vr[:, None, :, None] & vc[None, :, None, :]).reshape(H, W, 1, kh * kw)
    attn = attn.masked_fill(~valid, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhwnk,bhwknd->bhwnd", attn, values)


# --------------------------------------------------------------------------------------------
# Group layout of the flex and triton backends: G = d_r·d_c groups of P_r×P_c query slots,
# P = ceil(L/d); slot (g, p_r, p_c) is flattened as (g·P_r + p_r)·P_c + p_c.
# --------------------------------------------------------------------------------------------

@table_cache(32)
def rpb_classes(size: Pair, kernel: Pair, dilation: Pair, device: torch.device):
    """RPB of the group layout as kh·kw window-offset classes (contention-free RPB gradients).

    Per axis a query's RPB offset o = start - p + k - 1 lies in [0, k-1], and its bias at window
    offset t is rpb[h, o_r + t_r, o_c + t_c]: it depends only on the class c = o_r·kw + o_c.
    Returns ``onehot`` [G·P_r·P_c, kh·kw] (float32 class indicator of each slot, all-zero for
    padding slots) and ``rel`` [kh·kw classes, kh·kw offsets], the flattened RPB index. So the
    per-slot bias is ``onehot @ rpb.view(h, -1)[:, rel]`` and a per-slot bias gradient ``ds``
    [h, slots, kh·kw] reduces to drpb by ``index_add(rel, onehot.T @ ds)``.
    """
    offsets, real = [], []
    for a in (0, 1):
        p = torch.arange(_ceil_div(size[a], dilation[a])).view(1, -1)
        glen = group_lengths(size[a], dilation[a]).view(-1, 1)
        offsets.append(window_start(p, glen, kernel[a]) - p + kernel[a] - 1)  # [d, P]
        real.append(p < glen)
    (dr, pr), (dc, pc) = offsets[0].shape, offsets[1].shape
    kh, kw = kernel
    cls = (offsets[0].view(dr, 1, pr, 1) * kw + offsets[1].view(1, dc, 1, pc)).clamp(0, kh * kw - 1)
    keep = real[0].view(dr, 1, pr, 1) & real[1].view(1, dc, 1, pc)
    onehot = torch.nn.functional.one_hot(cls.reshape(-1), kh * kw).float()
    onehot *= keep.reshape(-1, 1)
    t = torch.arange(kh * kw)
    c = t.view(-1, 1)
    rel = (c // kw + t // kw) * (2 * kw - 1) + (c % kw + t % kw)
    return onehot.to(device), rel.to(device)


def to_groups(x: torch.Tensor, dilation: Pair) -> torch.Tensor:
    """``[B, H, W, heads, D]`` -> ``[B, heads, d_r·d_c, ceil(H/d_r), ceil(W/d_c), D]``
    (contiguous). Slots past a group's end repeat real tokens; they are never valid keys."""
    B, H, W, nh, D = x.shape
    dr, dc = dilation
    pr, pc = _ceil_div(H, dr), _ceil_div(W, dc)
    x = x.index_select(1, _group_src(H, dr, x.device)).index_select(2, _group_src(W, dc, x.device))
    x = x.view(B, dr, pr, dc, pc, nh, D).permute(0, 5, 1, 3, 2, 4, 6)
    return x.reshape(B, nh, dr * dc, pr, pc, D).contiguous()


def from_groups(y: torch.Tensor, size: Pair, dilation: Pair) -> torch.Tensor:
    """Inverse of :func:`to_groups`: ``[B, heads, G, P_r, P_c, D]`` -> ``[B, H, W, heads, D]``."""
    B, nh, _, pr, pc, D = y.shape
    dr, dc = dilation
    y = y.view(B, nh, dr, dc, pr, pc, D).permute(0, 2, 4, 3, 5, 1, 6).reshape(
        B, dr * pr, dc * pc, nh, D)
    return y.index_select(1, _group_dst(size[0], dr, y.device)).index_select(
        2, _group_dst(size[1], dc, y.device))


@table_cache(64)
def _group_src(length: int, dilation: int, device: torch.device) -> torch.Tensor:
    p = torch.arange(_ceil_div(length, dilation))
    g = torch.arange(dilation).view(-1, 1)
    return (p * dilation + g).clamp(max=length - 1).reshape(-1).to(device)


@table_cache(64)
def _group_dst(length: int, dilation: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(length)
    return ((i % dilation) * _ceil_div(length, dilation) + i // dilation).to(device)


# --------------------------------------------------------------------------------------------
# flex backend
# --------------------------------------------------------------------------------------------

_FLEX_BLOCK = 128
_flex_compiled = {}  # device type -> compiled flex_attention, or None after a compile failure


def _flex_fn(device_type: str, compile: bool):
    from torch.nn.attention.flex_attention import flex_attention
    if not compile or _flex_compiled.get(device_type, True) is None:
        return flex_attention
    if device_type not in _flex_compiled:
        _flex_compiled[device_type] = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled[device_type]


@table_cache(32)
def _flex_tables(size: Pair, kernel: Pair, dilation: Pair, device: torch.device):
    """Per-axis window starts ``[d, P]`` and group lengths ``[d]``, plus the block sparsity
    (kv_num_blocks ``[1, 1, nQB]``, kv_indices ``[1, 1, nQB, nKB]``) of the flattened group
    layout, computed from the windows without materialising the N×N mask."""
    starts, lens, pads = [], [], []
    for a in (0, 1):
        p = _ceil_div(size[a], dilation[a])
        glen = group_lengths(size[a], dilation[a])
        starts.append(window_start(torch.arange(p).view(1, p), glen.view(-1, 1), kernel[a]))
        lens.append(glen)
        pads.append(p)
    pr, pc = pads
    dr, dc = dilation
    n = dr * dc * pr * pc
    # each query's window rows r and the column range [c0, c0+kw) -> flat key index ranges
    s_r = starts[0].view(dr, 1, pr, 1).expand(dr, dc, pr, pc)
    s_c = starts[1].view(1, dc, 1, pc).expand(dr, dc, pr, pc)
    grp = torch.arange(dr * dc).view(dr, dc, 1, 1) * (pr * pc)
    rows = s_r[..., None] + torch.arange(kernel[0])  # [dr, dc, pr, pc, kh]
    lo = grp[..., None] + rows * pc + s_c[..., None]
    hi = lo + min(kernel[1], pc) - 1
    lo, hi = lo.clamp(max=n - 1).reshape(n, -1), hi.clamp(max=n - 1).reshape(n, -1)
    nb = _ceil_div(n, _FLEX_BLOCK)
    qb = (torch.arange(n) // _FLEX_BLOCK).view(n, 1)
    touched = torch.zeros(nb, nb, dtype=torch.bool)
    for span in range(_ceil_div(kernel[1], _FLEX_BLOCK) + 1):  # blocks a window row can span
        kb = torch.minimum(lo // _FLEX_BLOCK + span, hi // _FLEX_BLOCK)
        touched[qb.expand_as(kb).reshape(-1), kb.reshape(-1)] = True
    counts = touched.sum(1).to(torch.int32)
    order = torch.argsort((~touched).to(torch.int8), dim=1, stable=True).to(torch.int32)
    to = functools.partial(torch.Tensor.to, device=device)
    return (to(starts[0]), to(starts[1]), to(lens[0]), to(lens[1]),
            to(counts.view(1, 1, nb)), to(order.view(1, 1, nb, nb)), pr, pc)


def na2d_flex(q, k, v, kernel: Pair, dilation: Pair, rpb: Optional[torch.Tensor], scale: float,
              compile: bool = True):
    """FlexAttention neighbourhood attention: NA ``mask_mod`` and RPB ``score_mod`` over the
    group layout, block sparsity from the windows. Compiled with ``torch.compile`` (Triton on
    CUDA, C++ on CPU), once per geometry and dtype (dynamo's recompile limit applies); if
    compilation fails, warns once and runs flex eagerly (unfused, O(N²) memory).
    ``compile=False`` forces the eager path. PyTorch's FlexAttention has no CPU backward: CPU
    inputs that require grad raise."""
    from torch.nn.attention.flex_attention import BlockMask
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, rpb)):
        raise RuntimeError("backend 'flex': PyTorch FlexAttention has no backward on CPU; "
                           "use backend='torch' for training on CPU")
    B, H, W, nh, D = q.shape
    kh, kw = kernel
    s_r, s_c, len_r, len_c, counts, order, pr, pc = _flex_tables(
        (H, W), kernel, dilation, q.device)
    dc = dilation[1]
    per_group = pr * pc

    def coords(idx):
        g, rem = idx // per_group, idx % per_group
        return g, g // dc, g % dc, rem // pc, rem % pc

    def mask_mod(b, h, q_idx, kv_idx):
        g, gr, gc, qr, qc = coords(q_idx)
        g2, _, _, kr, kc = coords(kv_idx)
        sr, sc = s_r[gr, qr], s_c[gc, qc]
        return ((g == g2) & (kr >= sr) & (kr < sr + kh) & (kr < len_r[gr])
                & (kc >= sc) & (kc < sc + kw) & (kc < len_c[gc]))

    score_mod = None
    if rpb is not None:
        # per-slot bias [heads, slots, kh·kw]: its gradient spreads over all slots instead of
        # piling atomics onto the (2k-1)² RPB entries
        onehot, rel = rpb_classes((H, W), kernel, dilation, q.device)
        slot_bias = onehot @ rpb.float().reshape(nh, -1)[:, rel]

        def score_mod(score, b, h, q_idx, kv_idx):
            _, gr, gc, qr, qc = coords(q_idx)
            _, _, _, kr, kc = coords(kv_idx)
            t = ((kr - s_r[gr, qr]).clamp(0, kh - 1) * kw + (kc - s_c[gc, qc]).clamp(0, kw - 1))
            return score + slot_bias[h, q_idx, t]

    n = dilation[0] * dilation[1] * per_group
    block_mask = BlockMask.from_kv_blocks(counts, order, BLOCK_SIZE=_FLEX_BLOCK,
                                          mask_mod=mask_mod, seq_lengths=(n, n))
    qg, kg, vg = (to_groups(t, dilation).view(B, nh, n, D) for t in (q, k, v))
    fn = _flex_fn(q.device.type, compile)
    try:
        out = fn(qg, kg, vg, score_mod=score_mod, block_mask=block_mask, scale=scale)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # compilation unavailable (no compiler, unsupported platform...)
        if fn is not _flex_fn(q.device.type, False):
            _flex_compiled[q.device.type] = None
            warnings.warn(f"backend 'flex': torch.compile failed ({type(err).__name__}: {err}); "
                          "running FlexAttention eagerly (unfused, O(N^2) memory)",
                          RuntimeWarning)
            return na2d_flex(q, k, v, kernel, dilation, rpb, scale, compile=False)
        raise
    return from_groups(out.view(B, nh, dilation[0] * dilation[1], pr, pc, D), (H, W), dilation)


# --------------------------------------------------------------------------------------------
# natten backend
# --------------------------------------------------------------------------------------------

def na2d_natten(q, k, v, kernel: Pair, dilation: Pair, rpb: Optional[torch.Tensor], scale: float):
    """``natten.na2d`` (natten ≥ 0.20): no RPB, and no masking of padded small inputs."""
    if rpb is not None:
        raise ValueError("backend 'natten': natten >= 0.20 has no relative position bias; "
                         "use 'torch', 'flex' or 'triton' with rpb")
    if q.shape[1] < kernel[0] or q.shape[2] < kernel[1]:
        raise ValueError(f"backend 'natten': input {tuple(q.shape[1:3])} is smaller than the "
                         f"kernel {kernel}; natten cannot mask the padded keys of the "
                         "small-input policy")
    import natten
    return natten.na2d(q, k, v, kernel_size=kernel, dilation=dilation, scale=scale)
