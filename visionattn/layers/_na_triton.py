"""Fused Triton neighbourhood attention with RPB and dilation: forward and backward kernels.

The kernels read q/k/v in place, heads-last ``[B, H, W, heads, D]`` (any strides with a unit
last stride), and view each (batch, head, dilation group) as a plain d = 1 neighbourhood
problem on that group's ``P_r×P_c`` grid of slots (``_na_backends`` group layout). One program
handles one TQ_R×TQ_C query tile of one such plane and sweeps the tile's key halo in
TK_R×TK_C key tiles: scores → + RPB gathered by relative index → -inf outside each query's
window → online softmax; the forward saves the log-sum-exp. The backward recomputes the
probabilities per query tile, writes dq directly, atomically adds dk, dv (fp32) and, when
the RPB needs a gradient, writes dS into a ``[B, heads, slots, kh·kw]`` buffer that torch
reduces to drpb through the window-offset classes of ``rpb_classes`` (a sum and a small
matmul; no atomics on the (2k-1)² RPB entries).
CPU tensors run under ``TRITON_INTERPRET=1`` (tests only).
"""
import torch
import triton
import triton.language as tl

from ._na_backends import rpb_classes

TQ_R, TQ_C, TK_R, TK_C = 8, 8, 8, 8  # query / key tile shapes


@triton.jit
def _start(p, glen, K: tl.constexpr):
    return tl.minimum(tl.maximum(p - K // 2, 0), tl.maximum(glen, K) - K)


@triton.jit
def _tile_setup(N_TILES, TILES_C, G, NH, H, W, DR, DC, TQR: tl.constexpr, TQC: tl.constexpr):
    pid = tl.program_id(0)
    plane = pid // N_TILES  # (batch·NH + head)·G + group
    tile = pid % N_TILES
    t_r = tile // TILES_C
    t_c = tile % TILES_C
    g = plane % G
    head = (plane // G) % NH
    b = plane // (G * NH)
    gr = g // DC
    gc = g % DC
    len_r = (H - gr + DR - 1) // DR
    len_c = (W - gc + DC - 1) // DC
    offs = tl.arange(0, TQR * TQC)
    qr = t_r * TQR + offs // TQC
    qc = t_c * TQC + offs % TQC
    return plane, b, head, g, gr, gc, len_r, len_c, t_r, t_c, qr, qc


@triton.jit
def _row(b, head, gr, gc, r, c, DR, DC, sb, sh, sw, sn):
    """Offset of the token at group slot (r, c) of plane (b, head, (gr, gc))."""
    return b.to(tl.int64) * sb + (r * DR + gr) * sh + (c * DC + gc) * sw + head * sn


@triton.jit
def _halo(t_r, t_c, len_r, len_c, KH: tl.constexpr, KW: tl.constexpr, TQR: tl.constexpr,
          TQC: tl.constexpr):
    """Key rows [r_lo, r_hi) and columns [c_lo, c_hi) covering every window of the tile."""
    r_lo = _start(t_r * TQR, len_r, KH)
    r_hi = _start(t_r * TQR + TQR - 1, len_r, KH) + KH
    c_lo = _start(t_c * TQC, len_c, KW)
    c_hi = _start(t_c * TQC + TQC - 1, len_c, KW) + KW
    return r_lo, r_hi, c_lo, c_hi


@triton.jit
def _scores(q, K, RPB, b, head, gr, gc, kr0, kc0, qr, qc, sr, sc, len_r, len_c, DR, DC,
            sb, sh, sw, sn, scale, offs_d, dmask, KH: tl.constexpr, KW: tl.constexpr,
            TKR: tl.constexpr, TKC: tl.constexpr, HAS_RPB: tl.constexpr,
            PRECISION: tl.constexpr):
    """Scaled, biased, window-masked scores of a query tile against one key tile."""
    offs_k = tl.arange(0, TKR * TKC)
    kr = kr0 + offs_k // TKC
    kc = kc0 + offs_k % TKC
    k_in = (kr < len_r) & (kc < len_c)
    k_row = _row(b, head, gr, gc, kr, kc, DR, DC, sb, sh, sw, sn)
    kmask = k_in[:, None] & dmask[None, :]
    k = tl.load(K + k_row[:, None] + offs_d[None, :], mask=kmask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    valid = ((kr[None, :] >= sr[:, None]) & (kr[None, :] < sr[:, None] + KH)
             & (kc[None, :] >= sc[:, None]) & (kc[None, :] < sc[:, None] + KW) & k_in[None, :])
    if HAS_RPB:
        # clamped: padding query slots may reach past the table; their outputs are dropped
        rel_r = tl.minimum(tl.maximum(kr[None, :] - qr[:, None] + KH - 1, 0), 2 * KH - 2)
        rel_c = tl.minimum(tl.maximum(kc[None, :] - qc[:, None] + KW - 1, 0), 2 * KW - 2)
        bias_ptr = RPB + head * (2 * KH - 1) * (2 * KW - 1) + rel_r * (2 * KW - 1) + rel_c
        s += tl.load(bias_ptr, mask=valid, other=0.0)
    s = tl.where(valid, s, float("-inf"))
    return s, k, valid, kr, kc, k_row, kmask


@triton.jit
def _na_fwd(Q, K, V, RPB, O, LSE, scale, N_TILES, TILES_C, G, NH, H, W, DR, DC, PR, PC,
            sb, sh, sw, sn, ob, oh, ow, on,
            KH: tl.constexpr, KW: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
            TQR: tl.constexpr, TQC: tl.constexpr, TKR: tl.constexpr, TKC: tl.constexpr,
            HAS_RPB: tl.constexpr, PRECISION: tl.constexpr):
    plane, b, head, g, gr, gc, len_r, len_c, t_r, t_c, qr, qc = _tile_setup(
        N_TILES, TILES_C, G, NH, H, W, DR, DC, TQR, TQC)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_D
    q_real = (qr < len_r) & (qc < len_c)
    qmask = q_real[:, None] & dmask[None, :]
    q_row = _row(b, head, gr, gc, qr, qc, DR, DC, sb, sh, sw, sn)
    q = tl.load(Q + q_row[:, None] + offs_d[None, :], mask=qmask, other=0.0)
    sr = _start(qr, len_r, KH)
    sc = _start(qc, len_c, KW)
    r_lo, r_hi, c_lo, c_hi = _halo(t_r, t_c, len_r, len_c, KH, KW, TQR, TQC)
    m = tl.full([TQR * TQC], -1e30, tl.float32)
    l = tl.zeros([TQR * TQC], tl.float32)
    acc = tl.zeros([TQR * TQC, BLOCK_D], tl.float32)
    for kr0 in range(r_lo, r_hi, TKR):
        for kc0 in range(c_lo, c_hi, TKC):
            s, k, valid, kr, kc, k_row, kmask = _scores(
                q, K, RPB, b, head, gr, gc, kr0, kc0, qr, qc, sr, sc, len_r, len_c, DR, DC,
                sb, sh, sw, sn, scale, offs_d, dmask, KH, KW, TKR, TKC, HAS_RPB, PRECISION)
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(V + k_row[:, None] + offs_d[None, :], mask=kmask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l = l * alpha + tl.sum(p, 1)
            m = m_new
    o_row = _row(b, head, gr, gc, qr, qc, DR, DC, ob, oh, ow, on)
    tl.store(O + o_row[:, None] + offs_d[None, :], (acc / l[:, None]).to(O.dtype.element_ty),
             mask=qmask)
    tl.store(LSE + plane.to(tl.int64) * PR * PC + qr * PC + qc, m + tl.log(l), mask=q_real)


@triton.jit
def _na_bwd(Q, K, V, RPB, O, DO, LSE, DQ, DK, DV, DS, scale, N_TILES, TILES_C, G, NH,
            H, W, DR, DC, PR, PC, sb, sh, sw, sn, ob, oh, ow, on,
            KH: tl.constexpr, KW: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
            TQR: tl.constexpr, TQC: tl.constexpr, TKR: tl.constexpr, TKC: tl.constexpr,
            HAS_RPB: tl.constexpr, NEED_DRPB: tl.constexpr, PRECISION: tl.constexpr):
    plane, b, head, g, gr, gc, len_r, len_c, t_r, t_c, qr, qc = _tile_setup(
        N_TILES, TILES_C, G, NH, H, W, DR, DC, TQR, TQC)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_D
    q_real = (qr < len_r) & (qc < len_c)
    qmask = q_real[:, None] & dmask[None, :]
    q = tl.load(Q + _row(b, head, gr, gc, qr, qc, DR, DC, sb, sh, sw, sn)[:, None]
                + offs_d[None, :], mask=qmask, other=0.0)
    o_off = _row(b, head, gr, gc, qr, qc, DR, DC, ob, oh, ow, on)[:, None] + offs_d[None, :]
    do = tl.load(DO + o_off, mask=qmask, other=0.0)
    o = tl.load(O + o_off, mask=qmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    # +inf on padding slots zeroes their probabilities
    lse = tl.load(LSE + plane.to(tl.int64) * PR * PC + qr * PC + qc, mask=q_real,
                  other=float("inf"))
    sr = _start(qr, len_r, KH)
    sc = _start(qc, len_c, KW)
    r_lo, r_hi, c_lo, c_hi = _halo(t_r, t_c, len_r, len_c, KH, KW, TQR, TQC)
    ds_row = (plane.to(tl.int64) * PR * PC + qr * PC + qc) * (KH * KW)
    dq = tl.zeros([TQR * TQC, BLOCK_D], tl.float32)
    for kr0 in range(r_lo, r_hi, TKR):
        for kc0 in range(c_lo, c_hi, TKC):
            s, k, valid, kr, kc, k_row, kmask = _scores(
                q, K, RPB, b, head, gr, gc, kr0, kc0, qr, qc, sr, sc, len_r, len_c, DR, DC,
                sb, sh, sw, sn, scale, offs_d, dmask, KH, KW, TKR, TKC, HAS_RPB, PRECISION)
            p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
            v = tl.load(V + k_row[:, None] + offs_d[None, :], mask=kmask, other=0.0)
            dkv_off = (_row(b, head, gr, gc, kr, kc, DR, DC, ob, oh, ow, on)[:, None]
                       + offs_d[None, :])
            tl.atomic_add(DV + dkv_off,
                          tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION),
                          mask=kmask)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
            tl.atomic_add(DK + dkv_off,
                          tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale,
                          mask=kmask)
            if NEED_DRPB:  # dS at window offset t of each real query (written once)
                t = (kr[None, :] - sr[:, None]) * KW + (kc[None, :] - sc[:, None])
                tl.store(DS + ds_row[:, None] + t, ds, mask=valid & q_real[:, None])
    tl.store(DQ + o_off, (dq * scale).to(DQ.dtype.element_ty), mask=qmask)


def _launch(q, kernel, dilation):
    """Grid, geometry arguments and compile-time constants for q ``[B, H, W, heads, D]``."""
    B, H, W, nh, D = q.shape
    dr, dc = dilation
    pr, pc = triton.cdiv(H, dr), triton.cdiv(W, dc)
    tiles_c = triton.cdiv(pc, TQ_C)
    n_tiles = triton.cdiv(pr, TQ_R) * tiles_c
    grid = (B * nh * dr * dc * n_tiles,)
    args = (n_tiles, tiles_c, dr * dc, nh, H, W, dr, dc, pr, pc)
    meta = dict(KH=kernel[0], KW=kernel[1], HEAD_D=D,
                BLOCK_D=max(16, triton.next_power_of_2(D)), TQR=TQ_R, TQC=TQ_C, TKR=TK_R,
                TKC=TK_C, PRECISION="ieee" if q.dtype == torch.float32 else None)
    return grid, args, meta


class _NATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rpb, kernel, dilation, scale):
        B, H, W, nh, D = q.shape
        o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        grid, args, meta = _launch(q, kernel, dilation)
        lse = torch.empty(grid[0] // args[0] * args[8] * args[9], device=q.device,
                          dtype=torch.float32)
        _na_fwd[grid](q, k, v, rpb if rpb is not None else q, o, lse, scale, *args,
                      *q.stride()[:4], *o.stride()[:4], HAS_RPB=rpb is not None, **meta)
        ctx.save_for_backward(q, k, v, rpb, o, lse)
        ctx.geometry = kernel, dilation, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, rpb, o, lse = ctx.saved_tensors
        kernel, dilation, scale = ctx.geometry
        do = do.contiguous()
        dq = torch.empty_like(o)
        dk = torch.zeros(o.shape, device=q.device, dtype=torch.float32)
        dv = torch.zeros_like(dk)
        grid, args, meta = _launch(q, kernel, dilation)
        B, nh, slots = q.shape[0], q.shape[3], args[2] * args[8] * args[9]
        need_drpb = rpb is not None and ctx.needs_input_grad[3]
        ds = (torch.zeros(B, nh, slots, kernel[0] * kernel[1], device=q.device,
                          dtype=torch.float32) if need_drpb else dk)
        _na_bwd[grid](q, k, v, rpb if rpb is not None else q, o, do, lse, dq, dk, dv, ds, scale,
                      *args, *q.stride()[:4], *o.stride()[:4], HAS_RPB=rpb is not None,
                      NEED_DRPB=need_drpb, **meta)
        drpb = None
        if need_drpb:
            onehot, rel = rpb_classes(tuple(q.shape[1:3]), kernel, dilation, q.device)
            per_class = (onehot.t() @ ds.sum(0)).reshape(nh, -1)  # [heads, classes·offsets]
            drpb = torch.zeros(nh, rpb[0].numel(), device=q.device, dtype=torch.float32)
            drpb = drpb.index_add_(1, rel.reshape(-1), per_class).view_as(rpb)
        return dq, dk.to(k.dtype), dv.to(v.dtype), drpb, None, None, None


def na2d_triton(q, k, v, kernel, dilation, rpb, scale):
    """Fused Triton neighbourhood attention; q/k/v ``[B, H, W, heads, D]`` -> same layout."""
    if not (q.stride() == k.stride() == v.stride() and q.stride(-1) == 1):
        q, k, v = (t.contiguous() for t in (q, k, v))
    if rpb is not None:
        rpb = rpb.to(torch.float32).contiguous()
    return _NATriton.apply(q, k, v, rpb, tuple(kernel), tuple(dilation), float(scale))
