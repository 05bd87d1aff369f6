"""Agent attention (Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention",
ECCV 2024, arXiv:2312.08874; https://github.com/LeapLabTHU/Agent-Attention).

For ``(B, N, C)`` tokens of one ``H x W`` map in raster order (optionally after ``P`` prefix tokens, the
DeiT class token), ``h`` heads of width ``d = C / h`` and an agent grid ``ah x aw`` (``A = ah * aw``
agents; ``sqrt(n) x sqrt(n)`` for the ``n`` agents a model was trained with):

1. agents = ``AdaptiveAvgPool2d((ah, aw))`` of the patch **queries** seen as ``(B, C, H, W)`` (uneven,
   overlapping bins where ``H`` is not a multiple of ``ah``), split into heads (computed as the ``q``
   projection of the pooled tokens: the same numbers, as the bin weights sum to one);
2. agent aggregation ``V_A = softmax(d^-1/2 agents @ k^T + B_k) @ v``, ``B_k`` of ``(h, A, P + N)``;
3. agent broadcast ``out = softmax(d^-1/2 q @ agents^T + B_q) @ V_A``, ``B_q`` of ``(h, P + N, A)``;
4. diversity term: a depthwise ``k x k`` conv of ``v`` over the map added to the patch tokens (``dwc``), or
   for CSwin branches LePE (``get_v``, depthwise 3x3) instead.

The position biases (:func:`agent_position_biases`) are functions of (agent cell, token position): a
``(h, n, 7, 7)`` block bias resized bilinearly to the map (``an_bias`` for the K side, ``na_bias``
transposed for the Q side), plus per-row and per-column biases stored at the training map
(``ah_bias`` + ``aw_bias``, ``ha_bias`` + ``wa_bias``), plus the class-token biases ``ac_bias`` /
``ca_bias`` (DeiT). At another map or agent grid every term is resized bilinearly (``align_corners=False``)
along the token axes and along the agent axes, as the official detection / segmentation backbones do;
at the training map and grid nothing but the official 7x7 -> map resize happens, so the result is the
official classification computation.

Both softmaxes add the biases to ``(B, h, A, P + N)`` / ``(B, h, P + N, A)`` logits: through the fused
``scaled_dot_product_attention`` without autograd; under autograd in one ``autograd.Function`` with a
hand-written backward (head-major buffers, no per-product copies), or written out (matmul, biased softmax,
matmul) with attention dropout or autocast.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models._features_fx import register_notrace_function, register_notrace_module

from ._na_backends import table_cache
from .fused_linear import fused_linear
from .padding import exporting
from .weight_init import init_trunc_normal_

__all__ = ['adaptive_avg_pool_tokens', 'agent_position_biases', 'agent_position_biases_backward', 'agent_attention',
           'AgentAttention', 'AgentBranch', 'resize_agent_bias']


def _resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of the last two dims of a 4-D tensor (``align_corners=False``, no antialias); the same
    tensor when the size is unchanged (bilinear at the same size is the identity)."""
    if x.shape[-2] == size[0] and x.shape[-1] == size[1] and not exporting():
        return x
    return F.interpolate(x, size=(size[0], size[1]), mode='bilinear', align_corners=False)


def _resize_agents(bias: torch.Tensor, pool: int, agent_shape: Tuple[int, int]) -> torch.Tensor:
    """``(h, T, pool * pool)`` -> ``(h, T, ah * aw)``: bilinear resize along the agent grid (the last axis)."""
    if pool == agent_shape[0] and pool == agent_shape[1] and not exporting():
        return bias
    h, T, _ = bias.shape
    return _resize(bias.reshape(h, T, pool, pool), agent_shape).reshape(h, T, agent_shape[0] * agent_shape[1])


@register_notrace_function  # resizes depend on the (symbolic) map size
def agent_position_biases(
        an_bias: torch.Tensor,
        na_bias: torch.Tensor,
        ah_bias: torch.Tensor,
        aw_bias: torch.Tensor,
        ha_bias: torch.Tensor,
        wa_bias: torch.Tensor,
        grid: Tuple[int, int],
        agent_shape: Tuple[int, int],
        ac_bias: Optional[torch.Tensor] = None,
        ca_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The K-side ``(1, h, A, P + N)`` and Q-side ``(1, h, P + N, A)`` biases for an ``H x W = grid`` map and an
    ``agent_shape`` grid, from the official parameters (shapes in :class:`AgentAttention`); both contiguous.

    Row / column biases are resized one-dimensionally: bilinear interpolation is separable with weights that
    sum to one per axis, so this equals the official resize of their broadcast sum. The K side is built
    agent-major ``(h, n, H, W)``, the Q side token-major ``(h, H, W, n)`` (the layout of ``ha_bias`` /
    ``wa_bias``, and of the logits it is added to).
    """
    h, n = an_bias.shape[0], an_bias.shape[1]
    pool = int(math.sqrt(n) + 0.5)  # n is a perfect square (checked at construction)
    H, W = grid
    # K side: (h, n, H, W) = block + rows + columns
    k_bias = (_resize(ah_bias[0], (H, 1)) + _resize(aw_bias[0], (1, W))).add_(_resize(an_bias, (H, W)))
    k_bias = k_bias.reshape(h, n, H * W)
    # Q side: (h, H, W, n) = rows (h, H, 1, n) + columns (h, 1, W, n) + the block bias moved to the last axis
    rows = _resize(ha_bias[0].permute(0, 3, 1, 2), (H, 1)).permute(0, 2, 3, 1)
    cols = _resize(wa_bias[0].permute(0, 3, 1, 2), (1, W)).permute(0, 2, 3, 1)
    q_bias = (rows + cols).add_(_resize(na_bias, (H, W)).permute(0, 2, 3, 1)).reshape(h, H * W, n)
    if ac_bias is not None and ca_bias is not None:
        k_bias = torch.cat([ac_bias.reshape(h, n, 1), k_bias], dim=-1)
        q_bias = torch.cat([ca_bias.reshape(h, 1, n), q_bias], dim=1)
    k_bias = _resize_agents(k_bias.transpose(1, 2), pool, agent_shape).transpose(1, 2)
    q_bias = _resize_agents(q_bias, pool, agent_shape)
    return k_bias.unsqueeze(0), q_bias.unsqueeze(0)


def _resize_backward(grad: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Adjoint of :func:`_resize` to a 4-D tensor whose last two dims were ``size``: ``grad`` of the resized tensor ->
    ``grad`` of its input (the kernel autograd runs for ``F.interpolate``'s backward)."""
    if grad.shape[-2] == size[0] and grad.shape[-1] == size[1]:
        return grad
    return torch.ops.aten.upsample_bilinear2d_backward(
        grad.contiguous(), [grad.shape[-2], grad.shape[-1]], [grad.shape[0], grad.shape[1], size[0], size[1]], False)


def agent_position_biases_backward(
        k_grad: torch.Tensor,
        q_grad: torch.Tensor,
        agent_num: int,
        num_prefix: int,
        train_grid: Tuple[int, int],
        grid: Tuple[int, int],
        agent_shape: Tuple[int, int],
) -> List[Optional[torch.Tensor]]:
    """Gradients of the bias parameters of :func:`agent_position_biases` (``agent_num`` agents, training map
    ``train_grid``, ``num_prefix`` class tokens) from those of its K-side ``(h, A, P + N)`` and Q-side
    ``(h, P + N, A)`` outputs (summed over the batch), in its argument order: ``an_bias``, ``na_bias``,
    ``ah_bias``, ``aw_bias``, ``ha_bias``, ``wa_bias``, ``ac_bias``, ``ca_bias`` (the last two ``None`` without a
    class token). Each resize contributes its adjoint, each broadcast a sum along the broadcast axis."""
    h, n, P = k_grad.shape[0], agent_num, num_prefix
    pool = int(math.sqrt(n) + 0.5)
    (H, W), (gh, gw), (ah, aw) = grid, train_grid, agent_shape
    T = k_grad.shape[-1]

    def agents_backward(g: torch.Tensor) -> torch.Tensor:  # (h, T, ah * aw) -> (h, T, n)
        return _resize_backward(g.reshape(h, T, ah, aw), (pool, pool)).reshape(h, T, n)

    # K side: (h, n, P + N); the patch part is (h, n, H, W) = block + rows (h, n, H, 1) + columns (h, n, 1, W)
    k_grad = agents_backward(k_grad.transpose(1, 2)).transpose(1, 2)
    k_map = k_grad[:, :, P:].reshape(h, n, H, W)
    an = _resize_backward(k_map, (7, 7))
    ah_grad = _resize_backward(k_map.sum(3, keepdim=True), (gh, 1)).unsqueeze(0)
    aw_grad = _resize_backward(k_map.sum(2, keepdim=True), (1, gw)).unsqueeze(0)
    # Q side: (h, P + N, n); the patch part is (h, H, W, n) = block + rows (h, H, 1, n) + columns (h, 1, W, n)
    q_grad = agents_backward(q_grad)
    q_map = q_grad[:, P:].reshape(h, H, W, n)
    na = _resize_backward(q_map.permute(0, 3, 1, 2), (7, 7))
    ha_grad = _resize_backward(q_map.sum(2, keepdim=True).permute(0, 3, 1, 2), (gh, 1)).permute(0, 2, 3, 1)
    wa_grad = _resize_backward(q_map.sum(1, keepdim=True).permute(0, 3, 1, 2), (1, gw)).permute(0, 2, 3, 1)
    ac_grad = k_grad[:, :, :P].reshape(1, h, n, 1) if P else None
    ca_grad = q_grad[:, :P].reshape(1, h, 1, n) if P else None
    return [an, na, ah_grad, aw_grad, ha_grad.unsqueeze(0), wa_grad.unsqueeze(0), ac_grad, ca_grad]


def _build_pool_matrix(size: int, out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """See :func:`_pool_matrix`."""
    i = torch.arange(out, device=device)
    start = torch.div(i * size, out, rounding_mode='floor')
    end = torch.div((i + 1) * size + out - 1, out, rounding_mode='floor')
    y = torch.arange(size, device=device)
    inside = (y.unsqueeze(0) >= start.unsqueeze(1)) & (y.unsqueeze(0) < end.unsqueeze(1))
    return inside.to(dtype) / (end - start).unsqueeze(1).to(dtype)


_cached_pool_matrix = table_cache(64)(_build_pool_matrix)


def _pool_matrix(size: int, out: int, x: torch.Tensor) -> torch.Tensor:
    """``(out, size)`` averaging weights of ``AdaptiveAvgPool`` along one axis, in ``x``'s dtype and device: row
    ``i`` averages the inputs ``[floor(i * size / out), ceil((i + 1) * size / out))`` (uneven, overlapping bins
    where ``size % out``). Cached per size and device (built in the graph while exporting)."""
    if torch.jit.is_scripting():
        return _build_pool_matrix(size, out, x.dtype, x.device)
    if exporting():  # symbolic sizes cannot key a cache; the ops are traced instead
        return _build_pool_matrix(size, out, x.dtype, x.device)
    return _cached_pool_matrix(size, out, x.dtype, x.device)


def adaptive_avg_pool_tokens(x: torch.Tensor, output_size: Tuple[int, int]) -> torch.Tensor:
    """``AdaptiveAvgPool2d(output_size)`` of an NHWC map ``(B, H, W, C)`` -> ``(B, oh * ow, C)`` (row-major cells).

    Averaging matmuls: equal to the pooling up to rounding, and in an exported graph the bins stay functions of
    the (symbolic) map size, where the pooling op specialises on the traced size. A map whose rows are
    contiguous is pooled by two matmuls (rows, then columns); a strided one (the ``q`` columns of a fused
    ``qkv`` output) by one matmul with the ``(oh * ow, H * W)`` product of the two bin matrices, which reads the
    strided tokens in place where the two-step form would first copy them.
    """
    B, H, W, C = x.shape
    oh, ow = output_size
    row_bins, col_bins = _pool_matrix(H, oh, x), _pool_matrix(W, ow, x)
    if x.stride(3) == 1 and x.stride(2) == C and x.stride(1) == W * C:
        rows = torch.matmul(row_bins, x.reshape(B, H, W * C))                                 # (B, oh, W * C)
        return torch.matmul(col_bins, rows.reshape(B * oh, W, C)).reshape(B, oh * ow, C)
    cells = (row_bins[:, None, :, None] * col_bins[None, :, None, :]).reshape(oh * ow, H * W)
    return torch.matmul(cells, x.reshape(B, H * W, C))


def agent_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        agents: torch.Tensor,
        num_heads: int,
        k_bias: torch.Tensor,
        q_bias: torch.Tensor,
        attn_drop: float = 0.,
) -> torch.Tensor:
    """Steps 2-3 for ``(B, L, C)`` q / k / v and ``(B, A, C)`` agents -> ``(B, L, C)`` (no diversity term, no
    projection); ``k_bias`` ``(1, h, A, L)``, ``q_bias`` ``(1, h, L, A)``."""
    B, L, C = q.shape
    A = agents.shape[1]
    d = C // num_heads
    agents = agents.reshape(B, A, num_heads, d).transpose(1, 2)                         # (B, h, A, d)
    q = q.reshape(B, L, num_heads, d).transpose(1, 2)
    k = k.reshape(B, L, num_heads, d).transpose(1, 2)
    v = v.reshape(B, L, num_heads, d).transpose(1, 2)
    k_bias, q_bias = k_bias.to(q.dtype), q_bias.to(q.dtype)
    if not torch.is_grad_enabled():
        # fused, reads the strided head views without copies, writes (B, L, h, d) memory
        agent_v = F.scaled_dot_product_attention(agents, k, v, attn_mask=k_bias, dropout_p=attn_drop)
        out = F.scaled_dot_product_attention(q, agents, agent_v, attn_mask=q_bias, dropout_p=attn_drop)
        if exporting():  # the exporter decomposes SDPA into ops with another output layout than the traced kernel
            out = out.clone(memory_format=torch.contiguous_format)
        return out.transpose(1, 2).reshape(B, L, C)
    # written out under autograd (with dropout or autocast; otherwise _AgentAttentionTrain): the biases are
    # parameters, and SDPA with a mask that needs a gradient falls back to a path about 5x slower than this
    agents = agents * d ** -0.5  # both products carry the scale; q (L rows) is left unscaled
    agent_attn = torch.softmax(agents @ k.transpose(-2, -1) + k_bias, dim=-1)                 # (B, h, A, L)
    agent_v = F.dropout(agent_attn, attn_drop) @ v                                            # (B, h, A, d)
    q_attn = torch.softmax(q @ agents.transpose(-2, -1) + q_bias, dim=-1)                     # (B, h, L, A)
    return (F.dropout(q_attn, attn_drop) @ agent_v).transpose(1, 2).reshape(B, L, C)


def _pool_tokens_backward(grad: torch.Tensor, size: Tuple[int, int], output_size: Tuple[int, int]) -> torch.Tensor:
    """Gradient of :func:`adaptive_avg_pool_tokens`: ``(B, oh * ow, C)`` -> ``(B, H, W, C)``."""
    B, _, C = grad.shape
    (H, W), (oh, ow) = size, output_size
    cols = torch.matmul(_pool_matrix(W, ow, grad).t(), grad.reshape(B * oh, ow, C))          # (B * oh, W, C)
    return torch.matmul(_pool_matrix(H, oh, grad).t(), cols.reshape(B, oh, W * C)).reshape(B, H, W, C)


def _bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a @ b`` for ``(B, h, m, k)`` / ``(B, h, k, n)`` operands into a contiguous ``(B, h, m, n)`` ``out``
    (operands may be transposed views: one batched GEMM, no copies)."""
    torch.bmm(a.flatten(0, 1), b.flatten(0, 1), out=out.view(-1, out.shape[-2], out.shape[-1]))


class _AgentAttentionTrain(torch.autograd.Function):
    """Steps 1-4 under autograd with a hand-written backward: ``(dwc, bias parameters, parts) -> (B, P + N, C)``.

    ``parts`` are ``(B, L, k * C)`` tensors whose channels in order are ``[q | k | v]`` (the fused ``qkv``
    output, or ``q`` and ``kv``, or ``q``, ``k`` and ``v``). They are copied once into a head-major
    ``(3, B, h, L, d)`` buffer that every product reads; the backward's GEMMs write the three gradients into
    one such buffer, and each part's rows go to its layout with one copy. Autograd through the written-out ops
    instead copies the strided head views at each product and its backward, and zero-fills the full-size
    buffers behind every slice (a DeiT-S layer, forward + backward at batch 8: 46 -> 39 ms on 2 threads). The
    agents are pooled from the head-major queries, and the depthwise conv reads a contiguous channels-last copy
    of the values. The position biases are built from their parameters inside (:func:`agent_position_biases`)
    and get their gradients from :func:`agent_position_biases_backward`, without an autograd graph of a dozen
    small nodes. The Q side is computed agent-major (see the forward).
    """

    @staticmethod
    def forward(ctx, conv_weight, conv_bias, num_heads: int, grid: Tuple[int, int], agent_shape: Tuple[int, int],
                num_prefix: int, an_bias, na_bias, ah_bias, aw_bias, ha_bias, wa_bias, ac_bias, ca_bias, *parts):
        k_bias, q_bias = agent_position_biases(an_bias, na_bias, ah_bias, aw_bias, ha_bias, wa_bias, grid,
                                               agent_shape, ac_bias, ca_bias)
        B, L = parts[0].shape[:2]
        C = sum(p.shape[-1] for p in parts) // 3
        h, d = num_heads, C // num_heads
        H, W = grid
        P = num_prefix
        qkv = parts[0].new_empty(3, B, h, L, d)
        i = 0
        for p in parts:
            n = p.shape[-1] // C
            qkv[i:i + n].copy_(p.unflatten(-1, (n, h, d)).permute(2, 0, 3, 1, 4))
            i += n
        q, k, v = qkv.unbind(0)
        scale = d ** -0.5
        agents = adaptive_avg_pool_tokens(q[:, :, P:].reshape(B * h, H, W, d), agent_shape)
        agents = agents.reshape(B, h, agent_shape[0] * agent_shape[1], d).mul_(scale)         # (B, h, A, d)
        agent_attn = torch.softmax(torch.matmul(agents, k.transpose(-2, -1)).add_(k_bias), dim=-1)
        agent_v = torch.matmul(agent_attn, v)                                                  # (B, h, A, d)
        # the Q side agent-major, (B, h, A, L), its softmax over the agent axis: over a last axis of a few agents
        # (9 in Agent-Swin's first stage) the softmax and its backward run 10-20x slower
        q_attn = torch.softmax(torch.matmul(agents, q.transpose(-2, -1)).add_(q_bias.transpose(-2, -1)), dim=-2)
        out = torch.matmul(q_attn.transpose(-2, -1), agent_v).transpose(1, 2).reshape(B, L, C)
        # contiguous channels-last values: oneDNN's depthwise conv and its backward take 2x longer on strided input
        v_img = parts[-1][..., -C:][:, P:].reshape(B, H, W, C).contiguous().permute(0, 3, 1, 2)
        pad = conv_weight.shape[-1] // 2
        diversity = F.conv2d(v_img, conv_weight, conv_bias, padding=pad, groups=C)
        out[:, P:].add_(diversity.permute(0, 2, 3, 1).reshape(B, H * W, C))
        ctx.save_for_backward(qkv, agents, agent_attn, agent_v, q_attn, v_img, conv_weight)
        train_grid = (ah_bias.shape[-2], aw_bias.shape[-1])  # the map the row / column biases were trained at
        ctx.meta = (h, grid, train_grid, agent_shape, P, an_bias.shape[1], [p.shape[-1] // C for p in parts],
                    conv_bias is not None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        qkv, agents, agent_attn, agent_v, q_attn, v_img, conv_weight = ctx.saved_tensors
        h, (H, W), train_grid, agent_shape, P, agent_num, widths, has_conv_bias = ctx.meta
        _, B, _, L, d = qkv.shape
        C = h * d
        q, k, v = qkv.unbind(0)
        grad_out = grad_out.contiguous()
        g = grad_out.unflatten(-1, (h, d)).transpose(1, 2).contiguous()                      # (B, h, L, d)
        # agent broadcast: out = q_attn^T @ agent_v
        dqkv = torch.empty_like(qkv)                     # dq, dk, dv written in place, head-major (3, B, h, L, d)
        dq, dk, dv = dqkv.unbind(0)
        d_agent_v = torch.matmul(q_attn, g)
        d_q_logits = torch._softmax_backward_data(torch.matmul(agent_v, g.transpose(-2, -1)), q_attn, -2, q_attn.dtype)
        _bmm(d_q_logits.transpose(-2, -1), agents, dq)
        d_agents = torch.matmul(d_q_logits, q)
        # agent aggregation: agent_v = agent_attn @ v
        _bmm(agent_attn.transpose(-2, -1), d_agent_v, dv)
        d_k_logits = torch._softmax_backward_data(torch.matmul(d_agent_v, v.transpose(-2, -1)), agent_attn, -1,
                                                  agent_attn.dtype)
        _bmm(d_k_logits.transpose(-2, -1), agents, dk)
        d_agents.add_(torch.matmul(d_k_logits, k)).mul_(d ** -0.5)
        # agents = pooled patch queries
        d_patches = _pool_tokens_backward(d_agents.flatten(0, 1), (H, W), agent_shape)
        dq[:, :, P:].add_(d_patches.reshape(B, h, H * W, d))
        # diversity conv of the patch values
        pad = conv_weight.shape[-1] // 2
        g_img = grad_out[:, P:].reshape(B, H, W, C).permute(0, 3, 1, 2)
        d_img, d_weight, d_bias = torch.ops.aten.convolution_backward(
            g_img, v_img, conv_weight, [C] if has_conv_bias else None, [1, 1], [pad, pad], [1, 1], False, [0, 0], C,
            [True, ctx.needs_input_grad[0], has_conv_bias and ctx.needs_input_grad[1]])
        # each part's gradient in its (B, L, n * C) layout: one permuting copy of its rows of dqkv
        grads, i = [], 0
        for n in widths:
            grads.append(dqkv[i:i + n].permute(1, 3, 0, 2, 4).reshape(B, L, n * C))
            i += n
        grads[-1][:, P:, -C:].add_(d_img.permute(0, 2, 3, 1).reshape(B, H * W, C))
        bias_grads = agent_position_biases_backward(d_k_logits.sum(0), d_q_logits.sum(0).transpose(1, 2), agent_num, P,
                                                    train_grid, (H, W), agent_shape)
        return (d_weight, d_bias if has_conv_bias else None, None, None, None, None, *bias_grads, *grads)


def _use_train_path(x: torch.Tensor, attn_drop: float) -> bool:
    """Whether :class:`_AgentAttentionTrain` computes the layer: under autograd on CPU / CUDA, eager or compiled,
    fp32 or fp64, without attention dropout (no autocast: its backward would not see the forward's casts)."""
    if torch.jit.is_scripting() or not torch.is_grad_enabled() or exporting():
        return False
    return (attn_drop == 0. and x.dtype in (torch.float32, torch.float64) and x.device.type in ('cpu', 'cuda')
            and not torch.is_autocast_enabled(x.device.type))


@torch.jit.unused
def _agent_attention_train(parts: List[torch.Tensor], biases: List[Optional[torch.Tensor]], num_heads: int,
                           grid: Tuple[int, int], agent_shape: Tuple[int, int], num_prefix: int,
                           conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _AgentAttentionTrain.apply(conv_weight, conv_bias, num_heads, grid, agent_shape, num_prefix, *biases,
                                      *parts)


def resize_agent_bias(name: str, value: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """A checkpoint's row / column bias (``ah_bias``, ``aw_bias``, ``ha_bias``, ``wa_bias``) of another training
    map resized bilinearly to ``shape`` along its token axis (the other biases have no map-sized axis)."""
    if tuple(value.shape) == tuple(shape) or value.ndim != 5:
        return value
    if name in ('ah_bias', 'aw_bias'):      # (1, h, n, H, 1) / (1, h, n, 1, W)
        return _resize(value[0], tuple(shape[-2:])).unsqueeze(0)
    if name in ('ha_bias', 'wa_bias'):      # (1, h, H, 1, n) / (1, h, 1, W, n)
        return _resize(value[0].permute(0, 3, 1, 2), tuple(shape[2:4])).permute(0, 2, 3, 1).unsqueeze(0)
    return value


class _AgentBiases(nn.Module):
    """The six (eight with a class token) official bias parameters for ``num_heads`` heads, ``agent_num`` agents
    and the training map ``grid_size``, trunc_normal(0.02)-initialised as the official modules."""

    def __init__(self, num_heads: int, agent_num: int, grid_size: Tuple[int, int], agent_shape, cls_bias: bool,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        pool = math.isqrt(agent_num)
        if pool * pool != agent_num:
            raise ValueError(f'agent_num={agent_num}: expected a perfect square (the agents are a pooled square grid)')
        gh, gw = int(grid_size[0]), int(grid_size[1])
        self.grid_size = (gh, gw)
        self.agent_num = agent_num
        self.agent_shape = (pool, pool) if agent_shape is None else (int(agent_shape[0]), int(agent_shape[1]))
        if min(self.agent_shape) < 1:
            raise ValueError(f'agent_shape={agent_shape}: expected two positive ints (agent rows, columns)')
        self.an_bias = nn.Parameter(torch.empty(num_heads, agent_num, 7, 7, **dd))
        self.na_bias = nn.Parameter(torch.empty(num_heads, agent_num, 7, 7, **dd))
        self.ah_bias = nn.Parameter(torch.empty(1, num_heads, agent_num, gh, 1, **dd))
        self.aw_bias = nn.Parameter(torch.empty(1, num_heads, agent_num, 1, gw, **dd))
        self.ha_bias = nn.Parameter(torch.empty(1, num_heads, gh, 1, agent_num, **dd))
        self.wa_bias = nn.Parameter(torch.empty(1, num_heads, 1, gw, agent_num, **dd))
        self.ac_bias = nn.Parameter(torch.empty(1, num_heads, agent_num, 1, **dd)) if cls_bias else None
        self.ca_bias = nn.Parameter(torch.empty(1, num_heads, 1, agent_num, **dd)) if cls_bias else None
        self.init_weights()

    def extra_repr(self) -> str:
        return f'agent_num={self.agent_num}, agent_shape={self.agent_shape}, grid_size={self.grid_size}'

    def init_weights(self) -> None:
        """trunc_normal(0.02) biases; also the hook :class:`PlainBackbone`'s init calls after its generic pass."""
        for name in ('an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias', 'ac_bias', 'ca_bias'):
            p = getattr(self, name)
            if p is not None and not p.is_meta:
                init_trunc_normal_(p, std=.02)

    def resize_checkpoint_tensor(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Hook of the checkpoint filters: row / column biases of another training map resized to this one."""
        want = getattr(self, name, None)
        return resize_agent_bias(name, value, tuple(want.shape)) if isinstance(want, torch.Tensor) else value

    def bias_parameters(self) -> List[Optional[torch.Tensor]]:
        """The bias parameters in :func:`agent_position_biases`' order (``ac_bias`` / ``ca_bias`` may be None)."""
        return [self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias, self.ac_bias,
                self.ca_bias]

    def biases(self, H: int, W: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return agent_position_biases(
            self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias, (H, W),
            self.agent_shape, self.ac_bias, self.ca_bias)


@register_notrace_module  # FX leaf: biases resized to the (symbolic) map
class AgentAttention(_AgentBiases):
    """Agent attention token mixer for ``(B, P + N, C)`` tokens: ``forward(x, H, W)`` with ``N = H * W``.

    Parameters keep the official names: ``qkv`` (or ``q`` + ``kv`` with ``separate_q_kv=True``, the PVT
    form), ``proj``, ``dwc`` (depthwise ``kernel_size``, full ``C``), the biases ``an_bias``, ``na_bias``
    ``(h, n, 7, 7)``, ``ah_bias`` ``(1, h, n, gh, 1)``, ``aw_bias`` ``(1, h, n, 1, gw)``, ``ha_bias``
    ``(1, h, gh, 1, n)``, ``wa_bias`` ``(1, h, 1, gw, n)`` for the training map ``grid_size = (gh, gw)`` and,
    with ``num_prefix_tokens=1`` (DeiT), ``ac_bias`` ``(1, h, n, 1)`` / ``ca_bias`` ``(1, h, 1, n)``; the
    prefix token gets no diversity term. ``agent_shape`` (default ``sqrt(n) x sqrt(n)``) pools another agent
    grid, the biases resized to it (the official ``downstream_agent_shape``).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            agent_num: int = 49,
            agent_shape: Optional[Tuple[int, int]] = None,
            qkv_bias: bool = True,
            separate_q_kv: bool = False,
            num_prefix_tokens: int = 0,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            kernel_size: int = 3,
            device=None,
            dtype=None,
    ):
        if dim % num_heads:
            raise ValueError(f'dim={dim} must be divisible by num_heads={num_heads}')
        if num_prefix_tokens not in (0, 1):
            raise ValueError(f'num_prefix_tokens={num_prefix_tokens}: expected 0 or 1 (a class token)')
        super().__init__(num_heads, agent_num, grid_size, agent_shape, cls_bias=num_prefix_tokens == 1,
                         device=device, dtype=dtype)
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_drop = attn_drop
        # exactly one of the two forms exists; the other attribute is None (TorchScript prunes that branch)
        self.qkv = None if separate_q_kv else nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd) if separate_q_kv else None
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd) if separate_q_kv else None
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, **dd)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, L, C = x.shape
        P = self.num_prefix_tokens
        attn_drop = self.attn_drop if self.training else 0.
        if _use_train_path(x, attn_drop):
            if self.qkv is not None:
                parts = [fused_linear(x, self.qkv.weight, self.qkv.bias)]
            else:
                assert self.q is not None and self.kv is not None
                parts = [fused_linear(x, self.q.weight, self.q.bias), fused_linear(x, self.kv.weight, self.kv.bias)]
            out = _agent_attention_train(parts, self.bias_parameters(), self.num_heads, (H, W), self.agent_shape, P,
                                         self.dwc.weight, self.dwc.bias)
            return self.proj_drop(fused_linear(out, self.proj.weight, self.proj.bias))
        k_bias, q_bias = self.biases(H, W)
        if self.qkv is not None:
            q, k, v = fused_linear(x, self.qkv.weight, self.qkv.bias).reshape(B, L, 3, C).unbind(2)
        else:
            assert self.q is not None and self.kv is not None
            q = fused_linear(x, self.q.weight, self.q.bias)
            k, v = fused_linear(x, self.kv.weight, self.kv.bias).reshape(B, L, 2, C).unbind(2)
        agents = adaptive_avg_pool_tokens((q[:, P:] if P else q).reshape(B, H, W, C), self.agent_shape)
        out = agent_attention(q, k, v, agents, self.num_heads, k_bias, q_bias, attn_drop)
        v_img = (v[:, P:] if P else v).reshape(B, H, W, C).permute(0, 3, 1, 2)   # channels-last view
        diversity = self.dwc(v_img).permute(0, 2, 3, 1).reshape(B, H * W, C)
        # out is a fresh tensor (the attention's reshaped output): add in place, also under autograd
        (out[:, P:] if P else out).add_(diversity)
        return self.proj_drop(fused_linear(out, self.proj.weight, self.proj.bias))


@register_notrace_module  # FX leaf, as AgentAttention
class AgentBranch(_AgentBiases):
    """Agent-CSwin branch: agent attention of given q / k / v plus LePE, no projections.

    ``forward(q, k, v, H, W)`` takes ``(B', N, C)`` tokens of ``B'`` windows of ``H x W`` (CSwin stripes or
    the whole map) and returns ``(B', N, C)`` = agent attention + ``get_v(v)`` (LePE: depthwise 3x3 over
    all ``C``). Biases as in :class:`AgentAttention`, sized to the window ``grid_size``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            agent_num: int = 49,
            agent_shape: Optional[Tuple[int, int]] = None,
            attn_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        if dim % num_heads:
            raise ValueError(f'dim={dim} must be divisible by num_heads={num_heads}')
        super().__init__(num_heads, agent_num, grid_size, agent_shape, cls_bias=False, device=device, dtype=dtype)
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, device=device, dtype=dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = q.shape
        attn_drop = self.attn_drop if self.training else 0.
        if _use_train_path(q, attn_drop):
            return _agent_attention_train([q, k, v], self.bias_parameters(), self.num_heads, (H, W), self.agent_shape,
                                          0, self.get_v.weight, self.get_v.bias)
        k_bias, q_bias = self.biases(H, W)
        agents = adaptive_avg_pool_tokens(q.reshape(B, H, W, C), self.agent_shape)
        out = agent_attention(q, k, v, agents, self.num_heads, k_bias, q_bias, attn_drop)
        lepe = self.get_v(v.reshape(B, H, W, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, N, C)
        return out + lepe
