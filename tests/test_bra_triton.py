"""Fused Triton routed (bi-level routing) attention against a naive gather-then-attend
reference: forward and dq, dk, dv, on tiny shapes under TRITON_INTERPRET=1 on CPU."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def reference(q, k, v, index, scale):
    """Gather the topk key regions of each query region, then softmax(scale·q kᵀ) v per head."""
    batch = torch.arange(q.shape[0])[:, None, None]
    keys = k[batch, index].flatten(2, 3)  # [N, R, topk·T, heads, D]
    values = v[batch, index].flatten(2, 3)
    attn = (torch.einsum("nrtmd,nrsmd->nrmts", q, keys) * scale).softmax(-1)
    return torch.einsum("nrmts,nrsmd->nrtmd", attn, values)


def routed_inputs(T, topk, d_qk=8, d_v=8, N=2, R=6, heads=2, strided=False, shared=False):
    """q, k, v ``[N, R, T, heads, D]`` and distinct routed regions per query region (the same
    regions for all query regions when ``shared``); ``strided`` slices q, k, v out of one qkv."""
    width = heads * (2 * d_qk + d_v)
    qkv = torch.randn(N, R, T, width + 3 if strided else width)
    q, k, v = qkv[..., :width].split([heads * d_qk, heads * d_qk, heads * d_v], -1)
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
    if not strided:
        q, k, v = (t.contiguous() for t in (q, k, v))
    rows = 1 if shared else R
    index = torch.rand(N, rows, R).argsort(-1)[..., :topk].expand(N, R, topk)
    return q, k, v, index


def test_reference_matches_dense_attention_with_all_regions():
    """Routing to every region, in any order, is plain full attention over all R·T tokens."""
    q, k, v, _ = routed_inputs(T=3, topk=6)
    index = torch.arange(6).flip(0).expand(2, 6, 6)
    flat = [t.flatten(1, 2) for t in (q, k, v)]
    dense = torch.nn.functional.scaled_dot_product_attention(
        *[t.transpose(1, 2) for t in flat], scale=0.3).transpose(1, 2)
    torch.testing.assert_close(reference(q, k, v, index, 0.3), dense.unflatten(1, (6, 3)))


TRITON_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_bra_triton import reference, routed_inputs
    from visionattn.layers._bra_triton import routed_attention_triton

    def out_and_grads(fn, inputs, grad_out):
        inputs = [t.detach().requires_grad_() for t in inputs]
        out = fn(*inputs)
        return [out, *torch.autograd.grad(out, inputs, grad_out)]

    torch.manual_seed(0)
    cases = [dict(T=4, topk=1), dict(T=5, topk=3), dict(T=16, topk=3, d_qk=8, d_v=12),
             dict(T=5, topk=3, d_qk=6, d_v=10, strided=True), dict(T=4, topk=3, shared=True),
             dict(T=49, topk=2, N=1, R=3, heads=1, strided=True),
             dict(T=70, topk=1, N=1, R=2, heads=1)]
    worst = 0.0
    for case in cases:
        q, k, v, index = routed_inputs(**case)
        scale = q.shape[-1] ** -0.5
        grad_out = torch.randn(*v.shape)
        got = out_and_grads(lambda q, k, v: routed_attention_triton(q, k, v, index, scale),
                            (q, k, v), grad_out)
        want = out_and_grads(lambda q, k, v: reference(q, k, v, index, scale),
                             (q.double(), k.double(), v.double()), grad_out.double())
        for name, a, b in zip(["out", "dq", "dk", "dv"], got, want):
            assert a.dtype == torch.float32 and a.shape == b.shape, (case, name)
            err = (a.double() - b).abs().max().item() / max(1.0, b.abs().max().item())
            assert err <= 1e-5, (case, name, err)
            worst = max(worst, err)
    # int32 index, fp16 inputs: fp16 output within fp16 rounding
    q, k, v, index = routed_inputs(T=5, topk=2)
    out = routed_attention_triton(q.half(), k.half(), v.half(), index.int(), 0.4)
    assert out.dtype == torch.float16 and out.is_contiguous()
    err = (out.double() - reference(q.double(), k.double(), v.double(), index, 0.4)).abs().max()
    assert err <= 5e-3, err
    # the layer's backend choice reaches the kernel: a BRA module with backend 'triton' equals 'torch'
    from visionattn.layers import BiLevelRoutingAttention, bra_backend
    attn = BiLevelRoutingAttention(32, 2, n_win=3, topk=2)
    x = torch.randn(1, 7, 8, 32)
    with bra_backend("torch"):
        want = attn(x)
    with bra_backend("triton"):
        got = attn(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    print("ok", worst)
""")


def test_triton_routed_attention_interpreted():
    """Triton kernels under TRITON_INTERPRET=1 on CPU (set before triton is imported, hence a
    subprocess): forward and grads vs the reference."""
    pytest.importorskip("triton", reason="triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, str(Path(__file__).parent)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
