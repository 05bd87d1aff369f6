"""Neighbourhood attention op: every backend against a naive masked full-attention reference
(with RPB, dilation, even kernels, non-square maps and the small-input policy), natten.na2d,
gradients, backend selection and the NAT module."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import visionattn.layers.neighborhood_attention as na_mod
from visionattn.layers import _na_backends
from visionattn.layers._na_backends import na2d_flex
from visionattn.layers.neighborhood_attention import (
    ENV_VAR, NeighborhoodAttention2d, effective_dilation, na_backend, neighborhood_attention_2d,
    neighborhood_attention_2d_qkv)

REPO = Path(__file__).resolve().parents[1]


def _axis(length, k, d):
    """[L, L] window mask and RPB index from the spec's per-axis rule, in absolute coords."""
    i = torch.arange(length)
    g, p = i % d, i // d
    glen = (length - g + d - 1) // d
    start = torch.minimum((p - k // 2).clamp(min=0), glen.clamp(min=k) - k)
    j = torch.arange(length)[None]
    mask = (j % d == g[:, None]) & (j // d >= start[:, None]) & (j // d < start[:, None] + k)
    rel = (j // d - p[:, None] + k - 1).clamp(0, 2 * k - 2)
    return mask, rel


def reference(q, k, v, kernel, dilation, rpb=None, scale=None):
    """Dense N×N attention with the neighbourhood as a -inf mask; q/k/v [B, H, W, heads, D]."""
    return _dense(q, k, v, _axis(q.shape[1], kernel[0], dilation[0]),
                  _axis(q.shape[2], kernel[1], dilation[1]), rpb, scale)


def _dense(q, k, v, rows, cols, rpb=None, scale=None):
    B, H, W, nh, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    (mr, rr), (mc, rc) = rows, cols
    mask = (mr[:, None, :, None] & mc[None, :, None, :]).reshape(H * W, H * W)
    flat = [t.reshape(B, H * W, nh, D) for t in (q, k, v)]
    logits = torch.einsum("bqhd,bkhd->bhqk", flat[0] * scale, flat[1])
    if rpb is not None:
        logits = logits + rpb[:, rr[:, None, :, None], rc[None, :, None, :]].reshape(
            nh, H * W, H * W)
    attn = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", attn, flat[2]).reshape(B, H, W, nh, D)


# (H, W, kernel, dilation): non-square, sizes not divisible by d, k = size, even k, per-axis
CASES = [(14, 14, 7, 1), (14, 14, 7, 2), (15, 13, 5, 2), (23, 17, 3, 5), (10, 10, 7, 1),
         (7, 7, 7, 1), (7, 9, 7, 1), (16, 20, 5, 3), (9, 12, 4, 2), (8, 6, 6, 1),
         (30, 19, 3, (4, 6)), (12, 10, (5, 3), (2, 3)), (11, 13, (2, 4), 1)]


def _pair(x):
    return (x, x) if isinstance(x, int) else x


def _inputs(H, W, kernel, heads=2, dim=8, batch=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, H, W, heads, dim, generator=gen, dtype=dtype) for _ in range(3))
    kh, kw = _pair(kernel)
    rpb = torch.randn(heads, 2 * kh - 1, 2 * kw - 1, generator=gen, dtype=dtype)
    return q, k, v, rpb


@pytest.mark.parametrize("H,W,kernel,dilation", CASES)
def test_torch_backend_matches_reference_and_natten(H, W, kernel, dilation):
    natten = pytest.importorskip("natten")
    q, k, v, rpb = _inputs(H, W, kernel)
    kernel, dilation = _pair(kernel), _pair(dilation)
    for bias in (rpb, None):
        out = neighborhood_attention_2d(q, k, v, kernel, dilation, bias, backend="torch")
        ref = reference(q, k, v, kernel, dilation, bias)
        assert out.shape == q.shape
        assert (out - ref).abs().max() <= 1e-5
    oracle = natten.na2d(q, k, v, kernel_size=kernel, dilation=dilation)
    assert (out - oracle).abs().max() <= 1e-5


@pytest.mark.parametrize("H,W,kernel,dilation", [CASES[i] for i in (1, 2, 6, 8, 10)])
def test_natten_backend_matches_reference(H, W, kernel, dilation):
    pytest.importorskip("natten")
    q, k, v, _ = _inputs(H, W, kernel)
    kernel, dilation = _pair(kernel), _pair(dilation)
    out = neighborhood_attention_2d(q, k, v, kernel, dilation, backend="natten")
    assert (out - reference(q, k, v, kernel, dilation)).abs().max() <= 1e-5


@pytest.mark.parametrize("H,W,kernel,dilation",
                         [CASES[i] for i in (1, 3, 8, 11)] + [(5, 9, 7, 1)])
def test_flex_eager_matches_reference(H, W, kernel, dilation):
    """The flex mask_mod / score_mod / block sparsity, run uncompiled (fast to test)."""
    q, k, v, rpb = _inputs(H, W, kernel)
    kernel, dilation = _pair(kernel), _pair(dilation)
    for bias in (rpb, None):
        out = na2d_flex(q, k, v, kernel, dilation, bias, 8 ** -0.5, compile=False)
        assert (out - reference(q, k, v, kernel, dilation, bias)).abs().max() <= 1e-5


def test_flex_compiled_on_cpu():
    """backend='flex' compiles FlexAttention (C++ inductor on CPU): one tiny shape."""
    q, k, v, rpb = _inputs(9, 11, 5, batch=1)
    out = neighborhood_attention_2d(q, k, v, 5, (1, 2), rpb, backend="flex")
    assert (out - reference(q, k, v, (5, 5), (1, 2), rpb)).abs().max() <= 1e-5


@pytest.mark.parametrize("H,W,kernel,dilation", [(4, 5, 3, (1, 2)), (3, 4, 4, 1)])
def test_torch_backend_gradcheck(H, W, kernel, dilation):
    """float64 gradcheck of q, k, v and rpb (the second case pads the 3-row axis)."""
    q, k, v, rpb = (t.requires_grad_() for t in
                    _inputs(H, W, kernel, heads=2, dim=2, batch=1, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda *a: neighborhood_attention_2d(*a[:3], kernel, dilation, a[3], backend="torch"),
        (q, k, v, rpb))


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return [out] + list(torch.autograd.grad(out, inputs, grad_out))


def _assert_grads_close(got, want, tol):
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("H,W,kernel,dilation", [(15, 13, 5, 2), (9, 12, 4, (1, 2))])
def test_torch_backend_grads_match_reference(H, W, kernel, dilation):
    q, k, v, rpb = _inputs(H, W, kernel)
    kernel, dilation = _pair(kernel), _pair(dilation)
    grad_out = torch.randn_like(q)
    got = _grads(lambda *a: neighborhood_attention_2d(*a[:3], kernel, dilation, a[3],
                                                      backend="torch"), (q, k, v, rpb), grad_out)
    want = _grads(lambda *a: reference(*a[:3], kernel, dilation, a[3]), (q, k, v, rpb), grad_out)
    _assert_grads_close(got, want, 1e-5)


@pytest.mark.parametrize("H,W,kernel,dilation", [(3, 20, 3, (4, 1)), (2, 9, 3, (2, 4)), (4, 5, 3, (1, 2))])
def test_torch_backend_training_path_on_small_maps(H, W, kernel, dilation):
    """The CPU training path (explicit softmax, finite out-of-window bias) where the small-input policy
    applies: outputs and all four gradients equal the independent gather backend in float64."""
    q, k, v, rpb = (t.double() for t in _inputs(H, W, kernel))
    grad_out = torch.randn_like(q)
    got, want = (_grads(lambda *a: neighborhood_attention_2d(*a[:3], kernel, dilation, a[3], backend=name),
                        (q, k, v, rpb), grad_out) for name in ("torch", "gather"))
    assert all(torch.isfinite(t).all() for t in got)
    _assert_grads_close(got, want, 1e-12)


# groups longer than 14 are tiled (4-row tiles, 7- or 8-column tiles), some with padding query slots (25, 30,
# 17, 22); dilation groups; per-axis kernels; the small-input policy (3 rows, k = 3, d = 4 -> 1)
QKV_CASES = [(25, 30, 7, 1), (28, 16, 7, 1), (40, 33, 5, 2), (17, 22, (5, 3), (1, 2)), (3, 20, 3, (4, 1))]


@pytest.mark.parametrize("with_rpb", [True, False])
@pytest.mark.parametrize("H,W,kernel,dilation", QKV_CASES)
def test_fused_qkv_training_path_equals_reference(H, W, kernel, dilation, with_rpb):
    """The CPU training path from the fused qkv (hand-written backward, one qkv gradient): output and the
    gradients of qkv and rpb equal the dense reference in float64, and the path is the one taken."""
    q, k, v, rpb = (t.double() for t in _inputs(H, W, kernel, seed=1))
    rpb = rpb if with_rpb else None
    kernel, dilation = _pair(kernel), _pair(dilation)
    dil = tuple(effective_dilation(n, kk, d) for n, kk, d in zip((H, W), kernel, dilation))
    grad_out = torch.randn_like(q)
    qkv = torch.stack([q, k, v], 3).requires_grad_()
    leaves = [qkv] + ([rpb.clone().requires_grad_()] if with_rpb else [])
    out = neighborhood_attention_2d_qkv(qkv, kernel, dilation, leaves[1] if with_rpb else None)
    assert type(out.grad_fn).__name__ == "_TorchTrainNABackward"
    got = [out] + list(torch.autograd.grad(out, leaves, grad_out))
    want = _grads(lambda *a: reference(*torch.stack(a[:3], 3).unbind(3), kernel, dil, *a[3:]),
                  [q, k, v] + ([rpb] if with_rpb else []), grad_out)
    want = [want[0], torch.stack(want[1:4], 3)] + want[4:]
    _assert_grads_close(got, want, 1e-12)


def test_fused_qkv_path_only_where_the_torch_backend_trains_on_cpu():
    """Without autograd, with another backend, or under autocast, the fused entry point is the plain one."""
    q, k, v, rpb = _inputs(9, 16, 3)
    qkv = torch.stack([q, k, v], 3)
    with torch.no_grad():
        want = neighborhood_attention_2d(q, k, v, 3, 1, rpb)
        assert torch.equal(neighborhood_attention_2d_qkv(qkv, 3, 1, rpb), want)
    out = neighborhood_attention_2d_qkv(qkv.requires_grad_(), 3, 1, rpb, backend="gather")
    assert type(out.grad_fn).__name__ != "_TorchTrainNABackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = neighborhood_attention_2d_qkv(qkv, 3, 1, rpb)
    assert type(out.grad_fn).__name__ != "_TorchTrainNABackward"
    with pytest.raises(ValueError, match=r"qkv must be \[B, H, W, 3, heads, head_dim\]"):
        neighborhood_attention_2d_qkv(q, 3, 1, rpb)
    with pytest.raises(ValueError, match="rpb must be"):
        neighborhood_attention_2d_qkv(qkv, 3, 1, rpb[:, :2])


def test_module_trains_through_the_fused_path(monkeypatch):
    """NeighborhoodAttention2d in training on CPU: the fused path, with the gradients of the gather backend."""
    fused = []
    monkeypatch.setattr(na_mod, "na2d_torch_train",
                        lambda *a, _fn=na_mod.na2d_torch_train: fused.append(a[0].shape) or _fn(*a))
    torch.manual_seed(0)
    m = NeighborhoodAttention2d(16, 2, 5, dilation=(1, 2)).double()
    with torch.no_grad():
        m.rpb.normal_()
    x = torch.randn(2, 17, 19, 16, dtype=torch.double)
    grads = []
    for backend in ("torch", "gather"):
        with na_backend(backend):
            m.zero_grad()
            out = m(x)
            out.square().sum().backward()
        grads.append([out.detach()] + [p.grad.clone() for p in m.parameters()])
    assert fused == [(2, 17, 19, 3, 2, 8)]  # the torch call only
    _assert_grads_close(grads[0], grads[1], 1e-12)


@pytest.mark.parametrize("dilation", [1, 2])
def test_tables_cached_in_inference_mode_serve_autograd(fresh_caches, dilation):
    """An inference-mode call fills the index caches; a training call of the same geometry reuses them,
    so they must not be inference tensors ("Inference tensors cannot be saved for backward")."""
    q, k, v, rpb = _inputs(11, 9, 3)
    with torch.inference_mode():
        first = neighborhood_attention_2d(q, k, v, 3, dilation, rpb, backend="torch")
    q, k, v, rpb = (t.clone().requires_grad_() for t in (q, k, v, rpb))
    out = neighborhood_attention_2d(q, k, v, 3, dilation, rpb, backend="torch")
    out.sum().backward()
    assert all(t.grad is not None for t in (q, k, v, rpb))
    torch.testing.assert_close(out.detach(), first)  # SDPA may take another kernel with autograd
    # flex (forward only on CPU): the tables it cached in inference mode are normal tensors too
    with torch.inference_mode():
        na2d_flex(q, k, v, (3, 3), (dilation, dilation), rpb, 8 ** -0.5, compile=False)
    geometry = ((11, 9), (3, 3), (dilation, dilation), q.device)
    tables = _na_backends._flex_tables(*geometry)[:6] + _na_backends.rpb_classes(*geometry) + (
        _na_backends._group_src(11, dilation, q.device), _na_backends._group_dst(9, dilation, q.device))
    assert not any(t.is_inference() for t in tables)


@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_empty_batch(backend):
    q, k, v, rpb = _inputs(9, 11, 5, batch=0)
    kwargs = dict(compile=False) if backend == "flex" else {}
    fn = na2d_flex if backend == "flex" else na_mod.na2d_torch
    out = fn(q, k, v, (5, 5), (1, 2), rpb, 8 ** -0.5, **kwargs)
    assert out.shape == q.shape


def test_small_input_policy():
    assert effective_dilation(56, 7, 8) == 8  # k·d ≤ size: unchanged (natten semantics)
    assert effective_dilation(30, 7, 8) == 4  # largest dilation that fits
    assert effective_dilation(10, 7, 8) == 1
    assert effective_dilation(5, 7, 2) == 1  # size < k: padded axis, masked keys
    # DiNAT detection shape: dilation 28 on a 5×40 map. Columns: dilation 40 // 7 = 5 with
    # natten's window; rows (5 < k = 7): every query sees all 5 rows, RPB index i' - i + 6.
    q, k, v, rpb = _inputs(5, 40, 7, batch=1)
    i = torch.arange(5)
    rows = (torch.ones(5, 5, dtype=torch.bool), i[None] - i[:, None] + 6)
    want = _dense(q, k, v, rows, _axis(40, 7, 5), rpb)
    out = neighborhood_attention_2d(q, k, v, 7, 28, rpb, backend="torch")
    assert (out - want).abs().max() <= 1e-5
    flex = na2d_flex(q, k, v, (7, 7), (1, 5), rpb, 8 ** -0.5, compile=False)
    assert (flex - want).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="'natten'.*smaller than the kernel"):
        neighborhood_attention_2d(q, k, v, 7, 28, None, backend="natten")


def test_small_input_module_does_not_crash():
    m = NeighborhoodAttention2d(32, 2, 7, dilation=8).eval()
    for H, W in ((6, 9), (20, 13), (56, 60)):
        x = torch.randn(1, H, W, 32)
        assert m(x).shape == x.shape


def test_module_layout_and_parameters():
    torch.manual_seed(0)
    m = NeighborhoodAttention2d(16, 2, 5, dilation=(1, 2))
    assert {n: tuple(p.shape) for n, p in m.state_dict().items()} == {
        "rpb": (2, 9, 9), "qkv.weight": (48, 16), "qkv.bias": (48,),
        "proj.weight": (16, 16), "proj.bias": (16,)}
    assert m.rpb.abs().max() <= 2 and 0.01 < m.rpb.std() < 0.03
    with torch.no_grad():
        m.rpb.normal_()
    x = torch.randn(2, 9, 11, 16)
    qkv = m.qkv(x).reshape(2, 9, 11, 3, 2, 8)  # [q | k | v], each head-major
    attn = reference(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], (5, 5), (1, 2),
                     m.rpb, 8 ** -0.5)
    assert (m(x) - m.proj(attn.reshape(2, 9, 11, 16))).abs().max() <= 1e-5
    plain = NeighborhoodAttention2d(16, 2, 5, rel_pos_bias=False, qk_scale=0.5)
    assert plain.rpb is None and "rpb" not in plain.state_dict() and plain.scale == 0.5
    dropping = NeighborhoodAttention2d(16, 2, 5, attn_drop=0.1)
    with pytest.raises(NotImplementedError, match="attn_drop=0"):
        dropping(x)
    assert dropping.eval()(x).shape == x.shape


@pytest.fixture
def spies(monkeypatch):
    """Record which backend function the selector calls (without running it)."""
    called = []
    for name in ("na2d_torch", "na2d_flex", "na2d_natten"):
        monkeypatch.setattr(na_mod, name, lambda q, *a, _n=name[5:]: called.append(_n) or q)
    monkeypatch.delenv(ENV_VAR, raising=False)
    return called


def test_backend_selection(spies, monkeypatch):
    q, k, v, rpb = _inputs(9, 9, 3, batch=1)
    call = lambda **kw: neighborhood_attention_2d(q, k, v, 3, 1, rpb, **kw)
    call()  # auto on CPU
    call(backend="auto")
    monkeypatch.setenv(ENV_VAR, "natten")
    call()
    with na_backend("flex"):
        call()  # context manager beats the env var
        call(backend="torch")  # explicit argument beats both
        with na_backend("auto"):
            call()
        call()
    call()
    assert spies == ["torch", "torch", "natten", "flex", "torch", "torch", "flex", "natten"]
    monkeypatch.setenv(ENV_VAR, "nope")
    with pytest.raises(ValueError, match="unknown neighbourhood-attention backend 'nope'"):
        call()
    with pytest.raises(ValueError, match="unknown"):
        call(backend="cuda")
    with pytest.raises(ValueError, match="unknown"):
        na_backend("fast").__enter__()


def test_unsupported_backend_combinations():
    q, k, v, rpb = _inputs(9, 9, 3, batch=1)
    with pytest.raises(ValueError, match="'natten'.*relative position bias"):
        neighborhood_attention_2d(q, k, v, 3, 1, rpb, backend="natten")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="'triton'"):
            neighborhood_attention_2d(q, k, v, 3, 1, rpb, backend="triton")
    with pytest.raises(RuntimeError, match="'flex'.*backward on CPU"):
        neighborhood_attention_2d(q.requires_grad_(), k, v, 3, 1, rpb, backend="flex")


def test_argument_validation():
    q, k, v, rpb = _inputs(9, 9, 3, batch=1)
    with pytest.raises(ValueError, match="rpb must be"):
        neighborhood_attention_2d(q, k, v, 5, 1, rpb)
    with pytest.raises(ValueError, match="kernel_size"):
        neighborhood_attention_2d(q, k, v, 0)
    with pytest.raises(ValueError, match="q, k, v"):
        neighborhood_attention_2d(q, k[:, 1:], v, 3)


TRITON_SCRIPT = textwrap.dedent("""
    import sys, warnings
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_neighborhood_attention import reference, _inputs, _pair, _grads
    from visionattn.layers.neighborhood_attention import (
        NeighborhoodAttention2d, na_backend, neighborhood_attention_2d)
    warnings.filterwarnings("ignore")
    for H, W, kernel, dilation, bias in [(9, 11, 3, 1, True), (14, 13, 5, 2, True),
                                         (10, 10, 7, 1, False), (7, 9, 4, (1, 2), True),
                                         (12, 10, (5, 3), (2, 3), False), (5, 12, 7, 1, True)]:
        q, k, v, rpb = _inputs(H, W, kernel)
        kernel, dilation = _pair(kernel), _pair(dilation)
        inputs = (q, k, v, rpb if bias else None)[:4 if bias else 3]
        grad_out = torch.randn_like(q)
        got = _grads(lambda *a: neighborhood_attention_2d(
            *a[:3], kernel, dilation, a[3] if bias else None, backend="triton"), inputs, grad_out)
        want = _grads(lambda *a: reference(*a[:3], kernel, dilation, a[3] if bias else None),
                      [t.double() for t in inputs], grad_out.double())
        for name, a, b in zip(["out", "dq", "dk", "dv", "drpb"], got, want):
            err = (a.double() - b).abs().max().item() / max(1.0, b.abs().max().item())
            assert err <= 1e-5, (H, W, kernel, dilation, bias, name, err)
    # module path: q/k/v are strided views of one qkv tensor, read in place by the kernel
    torch.manual_seed(0)
    m = NeighborhoodAttention2d(16, 2, 5, dilation=(2, 1))
    x = torch.randn(2, 11, 9, 16)
    want = m(x)
    with na_backend("triton"):
        assert (m(x) - want).abs().max() <= 1e-5
    print("ok")
""")


def test_triton_backend_interpreted():
    """Triton kernels under TRITON_INTERPRET=1 on CPU (set before triton is imported, hence a
    subprocess): forward and grads vs the reference."""
    pytest.importorskip("triton", reason="triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, str(Path(__file__).parent)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
