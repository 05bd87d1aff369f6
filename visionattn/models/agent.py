"""Agent attention in DeiT, PVT, Swin and CSwin hosts (Han et al., "Agent Attention: On the Integration of Softmax
and Linear Attention", ECCV 2024, arXiv:2312.08874; https://github.com/LeapLabTHU/Agent-Attention).

The hosts are shared (:class:`~visionattn.models._plain.PlainBackbone` for DeiT, ``_pvt`` / ``_swin`` / ``_cswin``);
this file picks the mixer per block from the official ``ATTN_TYPE`` (``A`` =
:class:`visionattn.layers.AgentAttention` / :class:`~visionattn.layers.AgentBranch`, ``B`` = the host's own
attention, ``M<k>`` = the first k blocks of that stage ``A``), declares the 18 official variants and maps the
official checkpoints.

Every model runs at any input size: ``img_size=`` sets the training map (row / column biases and learned
encodings are resized on load), ``dynamic_img_size=True`` resizes them per input, and ``agent_shapes=`` pools
another agent grid per stage (DeiT: ``agent_shape=``), all biases resized bilinearly to it as the official
detection / segmentation backbones do (``downstream_agent_shapes``).
"""
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, DropPath, resample_abs_pos_embed
from timm.models import generate_default_cfgs, register_model

from ..layers.agent_attention import AgentAttention, AgentBranch
from ..layers.fused_linear import ONEDNN_CARD_NOTE
from ..layers.mlp import GeluMlp
from ._builder import (
    add_residual, build_visionattn_model, check_state_dict, parse_attn_types, resample_checkpoint_encodings,
    unwrap_state_dict)
from ._cswin import CSwin
from ._plain import PlainBackbone
from ._pvt import Pvt
from ._swin import Swin

__all__ = ['AgentDeiT', 'AgentDeiTBlock']

FAMILY_CARD = dict(
    name='Agent attention',
    paper='Agent Attention: On the Integration of Softmax and Linear Attention, ECCV 2024, arXiv:2312.08874',
    repo='https://github.com/LeapLabTHU/Agent-Attention',
    license='MIT (official code)',
    accuracy={
        'visionattn_agent_deit_tiny': '74.9 (README)',
        'visionattn_agent_deit_small': '80.5 (README)',
        'visionattn_agent_deit_small_448': '83.1 (README)',
        'visionattn_agent_deit_base': '82.0 (README)',
        'visionattn_agent_pvt_tiny': '78.4 (README)',
        'visionattn_agent_pvt_small': '82.2 (README)',
        'visionattn_agent_pvt_medium': '83.4 (README)',
        'visionattn_agent_pvt_medium_256': '83.8 (README)',
        'visionattn_agent_pvt_large': '83.7 (README, cfg agent_pvt_b)',
        'visionattn_agent_swin_tiny': '82.6 (README)',
        'visionattn_agent_swin_small': '83.7 (README)',
        'visionattn_agent_swin_small_288': '84.1 (README)',
        'visionattn_agent_swin_base': '84.0 (README)',
        'visionattn_agent_swin_base_384': '84.9 (README, fine-tuned at 384)',
        'visionattn_agent_cswin_tiny': '83.1 (README)',
        'visionattn_agent_cswin_small': '83.9 (README)',
        'visionattn_agent_cswin_base': '84.7 (README)',
        'visionattn_agent_cswin_base_384': '85.8 (README, fine-tuned at 384)',
    },
    load_official=(
        "timm.create_model('visionattn_agent_swin_tiny', pretrained=True, "
        "pretrained_cfg_overlay=dict(file='agent_swin_t.pth')) -- official checkpoints (raw, under 'model', or "
        "with 'module.' prefixes) are remapped by checkpoint_filter_fn, which drops the official "
        "relative_position_index buffers (rebuilt per size). A main_ema.py checkpoint holding 'state_dict_ema' "
        "beside 'model' loads the EMA weights, as timm's file loader prefers them. Built with img_size= another "
        "size, the row / column biases and learned encodings are resampled bilinearly on load. The README's "
        "weight links are cloud-drive pages without a direct download, so no pretrained=True tag exists"),
    differences=[
        ONEDNN_CARD_NOTE,
        'Any input size: img_size= at creation (row / column biases and position embeddings resampled bilinearly on '
        'load) and dynamic_img_size=True (resampled bilinearly on the fly), instead of the fixed size of the official '
        'classification models (official issue #38). At the training size the computation is the official one.',
        'agent_shapes= (DeiT: agent_shape=) pools another agent grid and resizes every bias along the agent axes, '
        'the official downstream_agent_shapes of the detection / segmentation backbones, here for every host.',
        'Agent-DeiT takes its patch grid from the patch embedding, so non-square inputs work (the official code '
        'floors sqrt(N) and only runs square grids, issue #39).',
        'Stages whose agent window covers the training map (every released A stage) stay one global window at '
        'any size; Swin B blocks keep their window (zero-padded, shifted and masked as Swin\'s detection backbone), '
        'and on maps smaller than the window clamp it as the classification block does (the official detection '
        'backbone pads such maps to one window and shifts; the two agree at COCO sizes).',
        'Agents are computed as the q projection of the pooled tokens (the same numbers as pooling the queries: '
        'the bins average with weights summing to one), pooled by averaging matmuls with AdaptiveAvgPool2d\'s bins; '
        'without autograd both softmaxes run through scaled_dot_product_attention with the biases as masks.',
        'Agent-PVT supports the released sr = 1 agent blocks only (no released config uses agent sr > 1).',
        'State-dict layout follows the visionattn builder for PVT / Swin / CSwin (stem / stages.S.downsample / '
        'stages.S.blocks.J / norm / head.fc; official keys are remapped on load); Agent-DeiT keeps the official '
        '(timm ViT) keys.',
    ],
)

AgentShapes = Optional[Sequence[Optional[Union[int, Tuple[int, int]]]]]


def _cfg(**kwargs):
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'crop_mode': 'squash', 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'license': 'mit',
        'paper_ids': 'arXiv:2312.08874',
        'paper_name': 'Agent Attention: On the Integration of Softmax and Linear Attention',
        'origin_url': 'https://github.com/LeapLabTHU/Agent-Attention',
        **kwargs,
    }


def _agent_shape(shape, where: str) -> Optional[Tuple[int, int]]:
    if shape is None:
        return None
    if isinstance(shape, int):
        shape = (shape, shape)
    if len(shape) != 2 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f'{where}={shape!r}: expected None, a positive int or (rows, cols) of positive ints')
    return int(shape[0]), int(shape[1])


def _mixers(attn_types: str, depths: Sequence[int], agent_nums: Sequence[int], agent_shapes: AgentShapes,
            mixer: Callable[..., nn.Module]) -> List[List[Optional[Callable]]]:
    """The hosts' per-block ``mixers`` for an official ``ATTN_TYPE``: ``mixer`` with the stage's agent count and
    agent grid for ``A`` blocks, ``None`` (the host's own attention) for ``B``."""
    if agent_shapes is None:
        agent_shapes = [None] * len(depths)
    if isinstance(agent_shapes, (str, bytes)) or len(agent_shapes) != len(depths):
        raise ValueError(f'agent_shapes={agent_shapes!r}: expected one entry per stage ({len(depths)}), each None '
                         f'(the trained sqrt(n) x sqrt(n) grid) or (rows, cols)')
    shapes = [_agent_shape(s, f'agent_shapes[{i}]') for i, s in enumerate(agent_shapes)]
    return [[partial(mixer, agent_num=agent_nums[s], agent_shape=shapes[s]) if is_agent else None
             for is_agent in stage] for s, stage in enumerate(parse_attn_types(attn_types, depths))]


_AGENT_NUMS = (9, 16, 49, 49)


def _create_hierarchical(host, mixer, variant: str, pretrained: bool, attn_types: str, agent_shapes: AgentShapes,
                         **kwargs):
    kwargs.setdefault('mixers', _mixers(attn_types, kwargs['depths'], _AGENT_NUMS, agent_shapes, mixer))
    return build_visionattn_model(host, variant, pretrained, checkpoint_filter_fn, **kwargs)


def _create_agent_pvt(variant: str, pretrained: bool = False, attn_types: str = 'AAAA',
                      agent_shapes: AgentShapes = None, **kwargs) -> Pvt:
    """Agent-PVT: the PVT host without its final norm; ``A`` blocks are ``AgentAttention(separate_q_kv=True)``
    over the whole stage map (official agent sr 1)."""
    mixer = partial(AgentAttention, separate_q_kv=True, proj_drop=kwargs.get('proj_drop_rate', 0.),
                    attn_drop=kwargs.get('attn_drop_rate', 0.))
    kwargs.setdefault('unused_final_norm', False)
    return _create_hierarchical(Pvt, mixer, variant, pretrained, attn_types, agent_shapes, **kwargs)


def _create_agent_swin(variant: str, pretrained: bool = False, attn_types: str = 'AAAB',
                       agent_shapes: AgentShapes = None, **kwargs) -> Swin:
    """Agent-Swin: ``A`` blocks are :class:`AgentAttention` (fused ``qkv``) over one window covering the map (the
    official agent window, 56 / 72 / 96, equals the stage-1 map), ``B`` blocks Swin's window attention."""
    mixer = partial(AgentAttention, proj_drop=kwargs.get('proj_drop_rate', 0.),
                    attn_drop=kwargs.get('attn_drop_rate', 0.))
    kwargs.setdefault('mixer_window_size', None)
    return _create_hierarchical(Swin, mixer, variant, pretrained, attn_types, agent_shapes, **kwargs)


def _create_agent_cswin(variant: str, pretrained: bool = False, attn_types: str = 'AABB',
                        agent_shapes: AgentShapes = None, **kwargs) -> CSwin:
    """Agent-CSwin: ``A`` blocks are one global :class:`AgentBranch` (LePE, no dwc; the official agent split
    56-28-14-7 / 96-48-24-12 equals the stage maps), ``B`` blocks CSwin's own stripe attention."""
    mixer = partial(AgentBranch, attn_drop=kwargs.get('attn_drop_rate', 0.))
    kwargs.setdefault('mixer_split_sizes', (None,) * len(kwargs['depths']))
    return _create_hierarchical(CSwin, mixer, variant, pretrained, attn_types, agent_shapes, **kwargs)


# ---- DeiT ----

class AgentDeiTBlock(nn.Module):
    """Pre-norm DeiT block on ``(B, 1 + H * W, C)`` tokens (class token first): ``x + attn(norm1(x))``,
    ``x + mlp(norm2(x))``, LayerNorm eps 1e-6; ``attn`` is :class:`AgentAttention` with class-token biases or,
    with ``agent_num=None``, timm's softmax :class:`~timm.layers.Attention` (the official plain DeiT block).
    Called as ``block(x, H, W)``."""
    is_agent: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            agent_num: Optional[int] = 49,
            agent_shape: Optional[Tuple[int, int]] = None,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.is_agent = agent_num is not None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        if agent_num is not None:
            self.attn = AgentAttention(
                dim, num_heads, grid_size, agent_num=agent_num, agent_shape=agent_shape, qkv_bias=qkv_bias,
                num_prefix_tokens=1, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        else:
            self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = GeluMlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)  # fc1 -> GELU -> fc2, as DeiT's Mlp
        self.has_drop_path = drop_path > 0.

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        if self.is_agent:
            y = self.attn(self.norm1(x), H, W)
        else:
            y = self.attn(self.norm1(x))
        x = add_residual(self.drop_path(y), x)
        if self.training and self.has_drop_path:
            return x + self.drop_path(self.mlp(self.norm2(x)))
        return self.mlp(self.norm2(x), shortcut=x)  # the residual add in fc2's epilogue at inference


class AgentDeiT(PlainBackbone):
    """Agent-DeiT: DeiT (class token, ``pos_embed`` with a class-token row, token-pooled head) whose first
    ``agent_layer`` blocks use agent attention (all blocks when ``agent_layer`` is None).

    Args:
        img_size, patch_size, in_chans, num_classes, global_pool, drop_rate, drop_path_rate, dynamic_img_size,
            device, dtype: as timm's ViT (``drop_rate``: classifier dropout).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: DeiT settings.
        agent_num: agents of the agent blocks (a square; 49, DeiT-B 81), pooled from the patch grid.
        agent_shape: pool another ``(rows, cols)`` agent grid, the biases resized to it (default
            ``sqrt(agent_num)`` squared).
        agent_layer: number of leading agent blocks (official ``agent_layer``; DeiT-B 4).
        pos_drop_rate, proj_drop_rate, attn_drop_rate: dropout after the position embedding, after the
            attention / MLP projections, on the attention weights (official ``drop_rate`` is the first two).
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 384,
            depth: int = 12,
            num_heads: int = 6,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            agent_num: int = 49,
            agent_shape: Optional[Union[int, Tuple[int, int]]] = None,
            agent_layer: Optional[int] = None,
            dynamic_img_size: bool = False,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        if agent_layer is not None and not 0 <= agent_layer <= depth:
            raise ValueError(f'agent_layer={agent_layer}: expected None or 0..depth ({depth})')
        agent_shape = _agent_shape(agent_shape, 'agent_shape')
        img_hw = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
        grid = (img_hw[0] // patch_size, img_hw[1] // patch_size)
        num_agent_blocks = depth if agent_layer is None else agent_layer

        def block(i, drop_path=0., **dd):
            return AgentDeiTBlock(
                embed_dim, num_heads, grid, agent_num=agent_num if i < num_agent_blocks else None,
                agent_shape=agent_shape, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=drop_path, **dd)

        super().__init__(
            block, embed_dim, depth=depth, img_size=img_hw, patch_size=patch_size, in_chans=in_chans,
            num_classes=num_classes, global_pool=global_pool, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
            pos_drop_rate=pos_drop_rate, cls_token_at=0, pos_embed_cls=True, pos_embed_interpolation='bilinear',
            grid_blocks=True,
            dynamic_img_size=dynamic_img_size, device=device, dtype=dtype)

    @torch.jit.ignore
    def filter_checkpoint(self, state_dict: Dict) -> Dict[str, torch.Tensor]:
        """An official Agent-DeiT checkpoint (any container; keys as timm's ViT) -> this model, strictly; the
        ``pos_embed`` and row / column biases of another training size are resampled bilinearly."""
        sd = unwrap_state_dict(state_dict)
        pos_embed = sd.get('pos_embed')
        if isinstance(pos_embed, torch.Tensor) and self.pos_embed is not None \
                and pos_embed.shape != self.pos_embed.shape and pos_embed.ndim == 3:
            # bilinear without antialiasing, as the official resize_pos_embed
            sd['pos_embed'] = resample_abs_pos_embed(
                pos_embed, new_size=list(self.patch_embed.grid_size), num_prefix_tokens=1,
                interpolation=self.pos_embed_interpolation, antialias=False)
        sd = resample_checkpoint_encodings(sd, self, names=())
        return check_state_dict(sd, self, source='AgentDeiT checkpoint')


def _create_agent_deit(variant: str, pretrained: bool = False, **kwargs) -> AgentDeiT:
    return build_visionattn_model(AgentDeiT, variant, pretrained, checkpoint_filter_fn, plain=True, **kwargs)


def checkpoint_filter_fn(state_dict: Dict, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an official Agent-attention checkpoint (any container) onto ``model``, whichever host it uses."""
    return model.filter_checkpoint(state_dict)


_DEIT_CFG = dict(first_conv='patch_embed.proj', classifier='head', pool_size=None)
_HIER_CFG = dict(classifier='head.fc')
_SWIN_CFG = dict(first_conv='stem.proj', **_HIER_CFG)
_CSWIN_CFG = dict(first_conv='stem.conv', **_HIER_CFG)
default_cfgs = generate_default_cfgs({
    'visionattn_agent_deit_tiny': _cfg(**_DEIT_CFG),
    'visionattn_agent_deit_small': _cfg(**_DEIT_CFG),
    'visionattn_agent_deit_small_448': _cfg(input_size=(3, 448, 448), **_DEIT_CFG),
    'visionattn_agent_deit_base': _cfg(**_DEIT_CFG),
    'visionattn_agent_pvt_tiny': _cfg(first_conv='stem.proj', **_HIER_CFG),
    'visionattn_agent_pvt_small': _cfg(first_conv='stem.proj', **_HIER_CFG),
    'visionattn_agent_pvt_medium': _cfg(first_conv='stem.proj', **_HIER_CFG),
    'visionattn_agent_pvt_medium_256': _cfg(input_size=(3, 256, 256), pool_size=(8, 8), first_conv='stem.proj',
                                            **_HIER_CFG),
    'visionattn_agent_pvt_large': _cfg(first_conv='stem.proj', **_HIER_CFG),
    'visionattn_agent_swin_tiny': _cfg(**_SWIN_CFG),
    'visionattn_agent_swin_small': _cfg(**_SWIN_CFG),
    'visionattn_agent_swin_small_288': _cfg(input_size=(3, 288, 288), pool_size=(9, 9), **_SWIN_CFG),
    'visionattn_agent_swin_base': _cfg(**_SWIN_CFG),
    # the official 384 fine-tune evaluates with TEST.CROP False: Resize((384, 384)) only
    'visionattn_agent_swin_base_384': _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0,
                                           **_SWIN_CFG),
    'visionattn_agent_cswin_tiny': _cfg(**_CSWIN_CFG),
    'visionattn_agent_cswin_small': _cfg(**_CSWIN_CFG),
    'visionattn_agent_cswin_base': _cfg(**_CSWIN_CFG),
    'visionattn_agent_cswin_base_384': _cfg(input_size=(3, 384, 384), pool_size=(12, 12), **_CSWIN_CFG),
})

_DEIT = dict(patch_size=16, mlp_ratio=4., qkv_bias=True)
_PVT = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4))
_SWIN_96 = dict(embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), window_size=7)
_SWIN_128 = dict(embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), window_size=7)
_CSWIN_64 = dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), split_sizes=(1, 2, 7, None))
_CSWIN_96 = dict(embed_dims=(96, 192, 384, 768), num_heads=(4, 8, 16, 32), split_sizes=(1, 2, 7, None))


@register_model
def visionattn_agent_deit_tiny(pretrained=False, **kwargs) -> AgentDeiT:
    """Agent-DeiT-T (official ``agent_deit_tiny``, every block agent, n = 49), 6.0M params."""
    model_args = dict(_DEIT, embed_dim=192, depth=12, num_heads=3)
    return _create_agent_deit('visionattn_agent_deit_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_agent_deit_small(pretrained=False, **kwargs) -> AgentDeiT:
    """Agent-DeiT-S (official ``agent_deit_small``, every block agent, n = 49), 22.6M params."""
    model_args = dict(_DEIT, embed_dim=384, depth=12, num_heads=6)
    return _create_agent_deit('visionattn_agent_deit_small', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_agent_deit_small_448(pretrained=False, **kwargs) -> AgentDeiT:
    """Agent-DeiT-S @448 (cfg ``agent_deit_s_448``: 28x28 tokens, n = 49), 23.1M params."""
    model_args = dict(_DEIT, embed_dim=384, depth=12, num_heads=6, img_size=448)
    return _create_agent_deit('visionattn_agent_deit_small_448', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_agent_deit_base(pretrained=False, **kwargs) -> AgentDeiT:
    """Agent-DeiT-B (official ``agent_deit_base``, ``agent_layer=4``: blocks 0-3 agent with n = 81), 87.2M
    params."""
    model_args = dict(_DEIT, embed_dim=768, depth=12, num_heads=12, agent_num=81, agent_layer=4)
    return _create_agent_deit('visionattn_agent_deit_base', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_agent_pvt_tiny(pretrained=False, **kwargs) -> Pvt:
    """Agent-PVT-T (official ``agent_pvt_tiny``, ``AAAA``), 11.6M params."""
    model_args = dict(_PVT, depths=(2, 2, 2, 2))
    return _create_agent_pvt('visionattn_agent_pvt_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_agent_pvt_small(pretrained=False, **kwargs) -> Pvt:
    """Agent-PVT-S (official ``agent_pvt_small``, ``AAAA``), 20.6M params."""
    model_args = dict(_PVT, depths=(3, 4, 6, 3))
    return _create_agent_pvt('visionattn_agent_pvt_small', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_agent_pvt_medium(pretrained=False, **kwargs) -> Pvt:
    """Agent-PVT-M (official ``agent_pvt_medium``, ``AAAA``), 35.9M params."""
    model_args = dict(_PVT, depths=(3, 4, 18, 3))
    return _create_agent_pvt('visionattn_agent_pvt_medium', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_agent_pvt_medium_256(pretrained=False, **kwargs) -> Pvt:
    """Agent-PVT-M @256 (cfg ``agent_pvt_m_256``), 36.1M params."""
    model_args = dict(_PVT, depths=(3, 4, 18, 3), img_size=256)
    return _create_agent_pvt('visionattn_agent_pvt_medium_256', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_agent_pvt_large(pretrained=False, **kwargs) -> Pvt:
    """Agent-PVT-L (official ``agent_pvt_large``, cfg ``agent_pvt_b``), 48.7M params."""
    model_args = dict(_PVT, depths=(3, 8, 27, 3))
    return _create_agent_pvt('visionattn_agent_pvt_large', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_agent_swin_tiny(pretrained=False, **kwargs) -> Swin:
    """Agent-Swin-T (official ``agent_swin_t``, ``AAAB``), 28.9M params."""
    model_args = dict(_SWIN_96, depths=(2, 2, 6, 2), attn_types='AAAB')
    return _create_agent_swin('visionattn_agent_swin_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_agent_swin_small(pretrained=False, **kwargs) -> Swin:
    """Agent-Swin-S (official ``agent_swin_s``, ``AABB``), 49.7M params."""
    model_args = dict(_SWIN_96, depths=(2, 2, 18, 2), attn_types='AABB')
    return _create_agent_swin('visionattn_agent_swin_small', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_agent_swin_small_288(pretrained=False, **kwargs) -> Swin:
    """Agent-Swin-S @288 (cfg ``agent_swin_s_288``: agent window 72, ``B`` windows 9, ``AABB``), 49.7M params."""
    model_args = dict(_SWIN_96, depths=(2, 2, 18, 2), attn_types='AABB', img_size=288, window_size=9)
    return _create_agent_swin('visionattn_agent_swin_small_288', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_agent_swin_base(pretrained=False, **kwargs) -> Swin:
    """Agent-Swin-B (official ``agent_swin_b``, ``AAMB2``: stage 3 blocks 0-1 agent), 88.1M params."""
    model_args = dict(_SWIN_128, depths=(2, 2, 18, 2), attn_types='AAMB2')
    return _create_agent_swin('visionattn_agent_swin_base', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_agent_swin_base_384(pretrained=False, **kwargs) -> Swin:
    """Agent-Swin-B @384 (cfg ``agent_swin_b_384``: agent window 96, ``B`` windows 12, ``AAMB2``), 88.3M params."""
    model_args = dict(_SWIN_128, depths=(2, 2, 18, 2), attn_types='AAMB2', img_size=384, window_size=12)
    return _create_agent_swin('visionattn_agent_swin_base_384', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_agent_cswin_tiny(pretrained=False, **kwargs) -> CSwin:
    """Agent-CSwin-T (official ``Agent_CSWin_64_24181_tiny_224``, ``AABB``), 20.5M params."""
    model_args = dict(_CSWIN_64, depths=(2, 4, 18, 1))
    return _create_agent_cswin('visionattn_agent_cswin_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_agent_cswin_small(pretrained=False, **kwargs) -> CSwin:
    """Agent-CSwin-S (official ``Agent_CSWin_64_36292_small_224``: 64-d, depths 3-6-29-2, ``AABB``), 32.8M
    params."""
    model_args = dict(_CSWIN_64, depths=(3, 6, 29, 2))
    return _create_agent_cswin('visionattn_agent_cswin_small', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_agent_cswin_base(pretrained=False, **kwargs) -> CSwin:
    """Agent-CSwin-B (official ``Agent_CSWin_96_36292_base_224``, ``AABB``), 73.2M params."""
    model_args = dict(_CSWIN_96, depths=(3, 6, 29, 2))
    return _create_agent_cswin('visionattn_agent_cswin_base', pretrained, **dict(model_args, **kwargs))


@register_model
def visionattn_agent_cswin_base_384(pretrained=False, **kwargs) -> CSwin:
    """Agent-CSwin-B @384 (official ``Agent_CSWin_96_36292_base_384``: splits 1-2-12, ``AABB``), 73.3M params."""
    model_args = dict(_CSWIN_96, depths=(3, 6, 29, 2), split_sizes=(1, 2, 12, None), img_size=384)
    return _create_agent_cswin('visionattn_agent_cswin_base_384', pretrained, **dict(model_args, **kwargs))
