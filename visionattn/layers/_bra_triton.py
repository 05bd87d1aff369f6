"""Fused Triton routed attention for BiFormer's Bi-Level Routing Attention (BRA).

A feature map is split into R regions of T tokens; query region r attends to the ``topk`` key
regions ``index[n, r, :]``: every query token of r takes softmax(scale · q kᵀ) v over all
topk·T tokens of those regions, per head, all heads sharing the routing. Layout is heads-last
``[N, R, T, heads, D]``; q, k, v may be any views with a unit last stride (slices of one qkv
projection) and are read in place by region index, so the topk gathered copies of K/V that the
official code builds are never materialised. The output is contiguous ``[N, R, T, heads, Dv]``.

One program handles one BLOCK_Q query tile of one (batch, region, head) and sweeps the key
tiles of its routed regions with an online softmax; the forward saves the log-sum-exp. The
backward recomputes the probabilities per query tile, writes dq directly and atomically adds
dk, dv in fp32 (a key region is read by several query regions). Accumulation is fp32.
CPU tensors run under ``TRITON_INTERPRET=1`` (tests only).
"""
import torch
import triton
import triton.language as tl

MIN_TILE, MAX_TILE = 16, 64  # token tile bounds (tl.dot needs >= 16 rows)


@triton.jit
def _row(n, r, t, head, s_n, s_r, s_t, s_m):
    """Offset of token t of region r, batch n, head ``head`` in a strided [N, R, T, M, D]."""
    return n.to(tl.int64) * s_n + r.to(tl.int64) * s_r + t * s_t + head * s_m


@triton.jit
def _dense_row(n, r, t, head, R, T, M, D):
    """``_row`` for a contiguous [N, R, T, M, D] tensor."""
    return _row(n, r, t, head, R * T * M * D, T * M * D, M * D, D)


@triton.jit
def _tile_setup(R, T, M, N_QTILES, BLOCK_Q: tl.constexpr):
    """Batch, query region, head, query tokens and their in-range mask of this program."""
    pid = tl.program_id(0)
    tile = pid % N_QTILES
    head = (pid // N_QTILES) % M
    region_row = pid // (N_QTILES * M)  # n·R + r
    offs_q = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    return region_row // R, region_row % R, head, region_row, offs_q, offs_q < T


@triton.jit
def _key_tile(q, K, INDEX, n, region_row, head, route, k0, T, TOPK, scale,
              s_kn, s_kr, s_kt, s_km, offs_dq, dq_mask, BLOCK_K: tl.constexpr,
              PRECISION: tl.constexpr):
    """Key region, key tokens, key tile and scaled scores (-inf on padding keys)."""
    key_region = tl.load(INDEX + region_row.to(tl.int64) * TOPK + route)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_in = offs_k < T
    k_row = _row(n, key_region, offs_k, head, s_kn, s_kr, s_kt, s_km)
    k = tl.load(K + k_row[:, None] + offs_dq[None, :], mask=k_in[:, None] & dq_mask[None, :],
                other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    return key_region, offs_k, k_in, k, tl.where(k_in[None, :], s, float("-inf"))


@triton.jit
def _bra_fwd(Q, K, V, INDEX, O, LSE, scale, R, T, M, TOPK, N_QTILES,
             s_qn, s_qr, s_qt, s_qm, s_kn, s_kr, s_kt, s_km, s_vn, s_vr, s_vt, s_vm,
             DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr,
             BLOCK_DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
             PRECISION: tl.constexpr):
    n, r, head, region_row, offs_q, q_in = _tile_setup(R, T, M, N_QTILES, BLOCK_Q)
    offs_dq = tl.arange(0, BLOCK_DQK)
    dq_mask = offs_dq < DQK
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < DV
    q = tl.load(Q + _row(n, r, offs_q, head, s_qn, s_qr, s_qt, s_qm)[:, None] + offs_dq[None, :],
                mask=q_in[:, None] & dq_mask[None, :], other=0.0)
    m = tl.full([BLOCK_Q], -1e30, tl.float32)
    l = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], tl.float32)
    for route in range(TOPK):
        for k0 in range(0, T, BLOCK_K):
            key_region, offs_k, k_in, k, s = _key_tile(
                q, K, INDEX, n, region_row, head, route, k0, T, TOPK, scale,
                s_kn, s_kr, s_kt, s_km, offs_dq, dq_mask, BLOCK_K, PRECISION)
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v_row = _row(n, key_region, offs_k, head, s_vn, s_vr, s_vt, s_vm)
            v = tl.load(V + v_row[:, None] + offs_dv[None, :],
                        mask=k_in[:, None] & dv_mask[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l = l * alpha + tl.sum(p, 1)
            m = m_new
    o_off = _dense_row(n, r, offs_q, head, R, T, M, DV)[:, None] + offs_dv[None, :]
    tl.store(O + o_off, (acc / l[:, None]).to(O.dtype.element_ty),
             mask=q_in[:, None] & dv_mask[None, :])
    tl.store(LSE + (region_row.to(tl.int64) * M + head) * T + offs_q, m + tl.log(l), mask=q_in)


@triton.jit
def _bra_bwd(Q, K, V, INDEX, O, DO, LSE, DQ, DK, DV_ACC, scale, R, T, M, TOPK, N_QTILES,
             s_qn, s_qr, s_qt, s_qm, s_kn, s_kr, s_kt, s_km, s_vn, s_vr, s_vt, s_vm,
             DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr,
             BLOCK_DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
             PRECISION: tl.constexpr):
    n, r, head, region_row, offs_q, q_in = _tile_setup(R, T, M, N_QTILES, BLOCK_Q)
    offs_dq = tl.arange(0, BLOCK_DQK)
    dq_mask = offs_dq < DQK
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < DV
    q_mask = q_in[:, None] & dq_mask[None, :]
    q = tl.load(Q + _row(n, r, offs_q, head, s_qn, s_qr, s_qt, s_qm)[:, None] + offs_dq[None, :],
                mask=q_mask, other=0.0)
    o_off = _dense_row(n, r, offs_q, head, R, T, M, DV)[:, None] + offs_dv[None, :]
    o_mask = q_in[:, None] & dv_mask[None, :]
    do = tl.load(DO + o_off, mask=o_mask, other=0.0)
    o = tl.load(O + o_off, mask=o_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    # +inf on padding queries zeroes their probabilities
    lse = tl.load(LSE + (region_row.to(tl.int64) * M + head) * T + offs_q, mask=q_in,
                  other=float("inf"))
    dq = tl.zeros([BLOCK_Q, BLOCK_DQK], tl.float32)
    for route in range(TOPK):
        for k0 in range(0, T, BLOCK_K):
            key_region, offs_k, k_in, k, s = _key_tile(
                q, K, INDEX, n, region_row, head, route, k0, T, TOPK, scale,
                s_kn, s_kr, s_kt, s_km, offs_dq, dq_mask, BLOCK_K, PRECISION)
            p = tl.exp(s - lse[:, None])
            v_row = _row(n, key_region, offs_k, head, s_vn, s_vr, s_vt, s_vm)
            kv_mask = k_in[:, None] & dv_mask[None, :]
            v = tl.load(V + v_row[:, None] + offs_dv[None, :], mask=kv_mask, other=0.0)
            dv_off = _dense_row(n, key_region, offs_k, head, R, T, M, DV)
            tl.atomic_add(DV_ACC + dv_off[:, None] + offs_dv[None, :],
                          tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION),
                          mask=kv_mask)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
            dk_off = _dense_row(n, key_region, offs_k, head, R, T, M, DQK)
            tl.atomic_add(DK + dk_off[:, None] + offs_dq[None, :],
                          tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale,
                          mask=k_in[:, None] & dq_mask[None, :])
    dq_off = _dense_row(n, r, offs_q, head, R, T, M, DQK)[:, None] + offs_dq[None, :]
    tl.store(DQ + dq_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _launch(q, v, index):
    """Grid, shape arguments, strides and compile-time constants of one kernel launch."""
    N, R, T, M, d_qk = q.shape
    d_v = v.shape[-1]
    tile = min(MAX_TILE, max(MIN_TILE, triton.next_power_of_2(T)))
    n_qtiles = triton.cdiv(T, tile)
    grid = (N * R * M * n_qtiles,)
    args = (R, T, M, index.shape[-1], n_qtiles)
    meta = dict(DQK=d_qk, DV=d_v, BLOCK_DQK=max(16, triton.next_power_of_2(d_qk)),
                BLOCK_DV=max(16, triton.next_power_of_2(d_v)), BLOCK_Q=tile, BLOCK_K=tile,
                PRECISION="ieee" if q.dtype == torch.float32 else None)
    return grid, args, meta


def _strides(q, k, v):
    """Batch, region, token and head strides of q, k and v (their last stride is 1)."""
    return (*q.stride()[:4], *k.stride()[:4], *v.stride()[:4])


class _RoutedAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, index, scale):
        out = torch.empty(v.shape, device=q.device, dtype=q.dtype)
        N, R, T, M, _ = q.shape
        lse = torch.empty(N, R, M, T, device=q.device, dtype=torch.float32)
        grid, args, meta = _launch(q, v, index)
        _bra_fwd[grid](q, k, v, index, out, lse, scale, *args, *_strides(q, k, v), **meta)
        ctx.save_for_backward(q, k, v, index, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, index, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        dk = torch.zeros(k.shape, device=q.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=q.device, dtype=torch.float32)
        grid, args, meta = _launch(q, v, index)
        _bra_bwd[grid](q, k, v, index, out, grad_out, lse, dq, dk, dv, ctx.scale, *args,
                       *_strides(q, k, v), **meta)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None


def routed_attention_triton(q, k, v, index, scale: float) -> torch.Tensor:
    """Routed region attention; q, k ``[N, R, T, heads, Dqk]``, v ``[N, R, T, heads, Dv]``,
    index ``[N, R, topk]`` key-region ids -> contiguous ``[N, R, T, heads, Dv]``."""
    if k.shape != q.shape or v.shape[:4] != q.shape[:4] or index.shape[:2] != q.shape[:2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} and "
                         f"index {tuple(index.shape)} do not match")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _RoutedAttentionTriton.apply(q, k, v, index.contiguous(), float(scale))
