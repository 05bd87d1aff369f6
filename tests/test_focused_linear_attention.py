"""FocusedLinearAttention / FocusedLinearBranch (FLatten) against a transcription of the official module.

Spec: ../shared/specs/flatten_agent_convit_davit_twins.md §2.4-2.5 and §7 (3.). The hosts and the 18
variants are tested in tests/test_flatten_*.py.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from visionattn.layers import FocusedLinearAttention, FocusedLinearBranch
from visionattn.layers.focused_linear_attention import focused_linear_attention, resample_grid_tokens


def official_focused(q, k, v, scale, dwc, num_heads, H, W, per_head_focus=False):
    """The official steps (post-2024-05 normalisation), written out; ``per_head_focus`` is the classic mistake."""
    B, N, C = q.shape
    s = nn.Softplus()(scale)
    q = (torch.relu(q) + 1e-6) / s
    k = (torch.relu(k) + 1e-6) / s
    if per_head_focus:
        q = q.reshape(B, N, num_heads, -1)
        k = k.reshape(B, N, num_heads, -1)
    qn, kn = q.norm(dim=-1, keepdim=True), k.norm(dim=-1, keepdim=True)
    q, k = q ** 3, k ** 3
    q = q / q.norm(dim=-1, keepdim=True) * qn
    k = k / k.norm(dim=-1, keepdim=True) * kn
    q = q.reshape(B, N, num_heads, -1).permute(0, 2, 1, 3)
    k = k.reshape(B, N, num_heads, -1).permute(0, 2, 1, 3)
    v = v.reshape(B, N, num_heads, -1).permute(0, 2, 1, 3)
    z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
    kv = (k.transpose(-2, -1) * (N ** -0.5)) @ (v * (N ** -0.5))
    x = (q @ kv * z).transpose(1, 2).reshape(B, N, C)
    v = v.reshape(B * num_heads, H, W, -1).permute(0, 3, 1, 2)
    return x + dwc(v).reshape(B, C, N).permute(0, 2, 1)


def _perturb(module, std=0.3):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


def _official_module(m, x, H, W):
    B, N, C = x.shape
    if m.qkv is not None:
        q, k, v = m.qkv(x).reshape(B, N, 3, C).permute(2, 0, 1, 3)
    else:
        q = m.q(x)
        k, v = m.kv(x).reshape(B, N, 2, C).permute(2, 0, 1, 3)
    k = k + m.positional_encoding
    return m.proj(official_focused(q, k, v, m.scale, m.dwc, m.num_heads, H, W))


@pytest.mark.parametrize('separate', [False, True], ids=['qkv', 'q_kv'])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_module_matches_official(separate, dtype):
    m = _perturb(FocusedLinearAttention(48, 3, (5, 6), separate_q_kv=separate)).to(dtype).eval()
    x = torch.randn(2, 30, 48, dtype=dtype)
    with torch.no_grad():
        out, ref = m(x, 5, 6), _official_module(m, x, 5, 6)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (out - ref).abs().max() <= tol * ref.abs().max()
    keys = set(m.state_dict())
    assert ({'q.weight', 'kv.weight'} <= keys) == separate and ('qkv.weight' in keys) != separate
    assert m.dwc.weight.shape == (16, 1, 5, 5)  # head_dim channels, shared by the heads
    assert m.scale.shape == (1, 1, 48) and m.positional_encoding.shape == (1, 30, 48)


def test_focusing_is_over_all_channels_and_dwc_is_shared():
    """The per-head focusing (a plausible misreading) gives different outputs; one dwc serves every head."""
    torch.manual_seed(0)
    dwc = nn.Conv2d(8, 8, 5, padding=2, groups=8).double()
    q, k, v = (torch.randn(2, 12, 32, dtype=torch.float64) for _ in range(3))
    scale = torch.randn(1, 1, 32, dtype=torch.float64)
    ours = focused_linear_attention(q, k, v, scale, dwc.weight, dwc.bias, 4, (3, 4))
    torch.testing.assert_close(ours, official_focused(q, k, v, scale, dwc, 4, 3, 4), rtol=0, atol=1e-12)
    wrong = official_focused(q, k, v, scale, dwc, 4, 3, 4, per_head_focus=True)
    assert (ours - wrong).abs().max() > 1e-3
    # heads stay separate: changing head 1's v moves only head 1's channels
    v2 = v.clone()
    v2[..., 8:16] += 1.
    delta = focused_linear_attention(q, k, v2, scale, dwc.weight, dwc.bias, 4, (3, 4)) - ours
    assert delta[..., 8:16].abs().max() > 1e-3
    assert delta[..., :8].abs().max() == 0 and delta[..., 16:].abs().max() == 0


def test_branch_matches_official_with_lepe():
    """CSwin form: attention of given q / k / v + dwc(v) + LePE get_v(v) over the branch width."""
    m = _perturb(FocusedLinearBranch(32, 2, (4, 5))).double()
    q, k, v = (torch.randn(3, 20, 32, dtype=torch.float64) for _ in range(3))
    lepe = m.get_v(v.transpose(1, 2).reshape(3, 32, 4, 5)).reshape(3, 32, 20).transpose(1, 2)
    ref = official_focused(q, k + m.positional_encoding, v, m.scale, m.dwc, 2, 4, 5) + lepe
    torch.testing.assert_close(m(q, k, v, 4, 5), ref, rtol=0, atol=1e-12)
    assert m.get_v.weight.shape == (32, 1, 3, 3) and m.dwc.weight.shape == (16, 1, 5, 5)


def test_other_grid_resamples_the_encoding_bilinearly():
    m = _perturb(FocusedLinearAttention(16, 2, (4, 4))).eval()
    pe = m.positional_encoding
    assert resample_grid_tokens(pe, (4, 4), (4, 4)) is pe
    want = F.interpolate(pe.reshape(1, 4, 4, 16).permute(0, 3, 1, 2), size=(6, 3), mode='bilinear')
    torch.testing.assert_close(resample_grid_tokens(pe, (4, 4), (6, 3)), want.flatten(2).transpose(1, 2))
    x = torch.randn(2, 18, 16)
    with torch.no_grad():
        out = m(x, 6, 3)
        m.positional_encoding.data = want.flatten(2).transpose(1, 2)
        m.grid_size = (6, 3)
        torch.testing.assert_close(out, m(x, 6, 3))


def test_half_precision_stays_finite_and_fp32_inside():
    """bf16 autocast on inputs x50: the cube and the normaliser run in fp32, forward and backward finite."""
    m = _perturb(FocusedLinearAttention(64, 2, (7, 7), separate_q_kv=True))
    x = (torch.randn(2, 49, 64) * 50).requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = m(x, 7, 7)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())
    ref = m(x.detach(), 7, 7)
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()
    # a model cast to bf16 as a whole also stays finite
    mb = m.to(torch.bfloat16)
    assert torch.isfinite(mb(x.detach().bfloat16(), 7, 7)).all()


def test_scripts():
    m = _perturb(FocusedLinearAttention(32, 2, (4, 4), separate_q_kv=True)).eval()
    x = torch.randn(1, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(m)(x, 4, 4), m(x, 4, 4))


def test_focusing_backward_is_the_official_gradient():
    """The closed-form backward of the focusing (training path) against autograd through the official steps,
    and gradcheck, in float64; x and the scale both get their gradients."""
    from visionattn.layers.focused_linear_attention import _Focus
    torch.manual_seed(0)
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(1, 1, 12, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, s: _Focus.apply(x, s, 3), (x, s))

    def official(x, s):
        y = (torch.relu(x) + 1e-6) / s
        u = y ** 3
        return u / u.norm(dim=-1, keepdim=True) * y.norm(dim=-1, keepdim=True)
    g = torch.randn(2, 7, 12, dtype=torch.float64)
    ours = torch.autograd.grad((_Focus.apply(x, s, 3) * g).sum(), (x, s))
    ref = torch.autograd.grad((official(x, s) * g).sum(), (x, s))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
