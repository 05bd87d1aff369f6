"""Plain (isotropic, ViT-style) backbone shared by ConViT, Agent-DeiT and the isotropic NAT/DiNAT/ViT-rpb models.

:class:`PlainBackbone` implements timm's model API once, following timm's ``VisionTransformer`` conventions:

* ``patch_embed`` (timm ``PatchEmbed``, NHWC output) -> learned ``pos_embed`` -> ``blocks`` -> ``norm`` -> ``head``.
* ``forward_features`` returns tokens ``[B, num_prefix_tokens + N, C]`` (after the final norm), like timm's ViTs.
* The class token is inserted before block ``cls_token_at`` (0 for DeiT, 10 for ConViT, ``None`` for no class
  token). ``pos_embed`` either has a row for the class token (``pos_embed_cls=True``, DeiT: concat then add; needs
  ``cls_token_at=0``) or covers the patch tokens only (``pos_embed_cls=False``: add then concat).
* ``block_fmt`` is the token layout the blocks receive *before* the class token is inserted: ``'NLC'``
  ``[B, N, C]`` or ``'NHWC'`` ``[B, H, W, C]`` (convenient for local / neighbourhood attention and for GPSA on
  non-square grids). Blocks at and after the insertion always receive ``[B, 1 + N, C]``. A block must return
  its input's shape.
* ``grid_blocks=True``: every block is called as ``blk(x, H, W)`` with the patch grid (for mixers that need the
  map of a token sequence that holds a class token, Agent-DeiT); otherwise ``blk(x)``.
* ``img_size`` fixes the model's input (``pos_embed`` has the grid of ``img_size``); ``dynamic_img_size=True``
  accepts any size (multiples of the patch size, or any size with ``dynamic_img_pad=True``) and resamples
  ``pos_embed`` with timm's ``resample_abs_pos_embed`` on the fly (``pos_embed_interpolation``: bicubic with
  antialiasing as timm's ViTs, or bilinear without, as the official Agent-DeiT resize).

Blocks are given either built (a sequence of modules) or as a factory
``block_fn(index, drop_path=rate, device=..., dtype=...)`` called ``depth`` times with the stochastic-depth rate
of timm's linear decay rule up to ``drop_path_rate``.

Weight init (``weight_init='trunc_normal'``): ``pos_embed``/``cls_token`` trunc_normal(0.02); every ``nn.Linear``
trunc_normal(0.02) with zero bias; every LayerNorm ones/zeros; then every sub-module's own ``init_weights()``
hook (e.g. ConViT's locality init) runs. ``weight_init='skip'`` leaves the init to the family class.
"""
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, calculate_drop_path_rates, get_device_dtype, resample_abs_pos_embed
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

from ..layers.weight_init import init_trunc_normal_
from ._builder import _is_fx_tracing, check_input

__all__ = ['PlainBackbone']

_GLOBAL_POOLS = ('', 'avg', 'token')


def _init_linear_norm(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        init_trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class PlainBackbone(nn.Module):
    """Patch embedding -> (class token) -> isotropic blocks -> norm -> linear head, with timm's model API."""
    grid_blocks: torch.jit.Final[bool]

    def __init__(
            self,
            blocks: Union[Sequence[nn.Module], Callable[..., nn.Module]],
            embed_dim: int,
            depth: Optional[int] = None,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            pos_drop_rate: float = 0.,
            cls_token_at: Optional[int] = 0,
            use_pos_embed: bool = True,
            pos_embed_cls: bool = True,
            pos_embed_interpolation: str = 'bicubic',
            block_fmt: str = 'NLC',
            grid_blocks: bool = False,
            norm_layer: Optional[Callable[..., nn.Module]] = None,
            embed_layer: Callable[..., nn.Module] = PatchEmbed,
            patch_bias: bool = True,
            dynamic_img_size: bool = False,
            dynamic_img_pad: bool = False,
            strict_img_size: bool = True,
            weight_init: str = 'trunc_normal',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if global_pool not in _GLOBAL_POOLS:
            raise ValueError(f'global_pool={global_pool!r}: expected one of {_GLOBAL_POOLS}')
        if block_fmt not in ('NLC', 'NHWC'):
            raise ValueError(f"block_fmt={block_fmt!r}: expected 'NLC' or 'NHWC'")
        if weight_init not in ('trunc_normal', 'skip'):
            raise ValueError(f"weight_init={weight_init!r}: expected 'trunc_normal' or 'skip'")
        if callable(blocks) and not isinstance(blocks, nn.Module):
            if depth is None:
                raise ValueError('PlainBackbone: depth is required when blocks is a block factory')
            dpr = calculate_drop_path_rates(drop_path_rate, depth)
            blocks = [blocks(i, drop_path=dpr[i], **dd) for i in range(depth)]
        blocks = list(blocks)
        depth = len(blocks)
        if depth == 0:
            raise ValueError('PlainBackbone: at least one block is required')
        if cls_token_at is not None and not 0 <= cls_token_at < depth:
            raise ValueError(f'cls_token_at={cls_token_at} is outside the {depth} blocks (0..{depth - 1}) or None')
        if global_pool == 'token' and cls_token_at is None:
            raise ValueError("global_pool='token' needs a class token (cls_token_at is None)")
        if pos_embed_cls and use_pos_embed and cls_token_at != 0:
            raise ValueError('pos_embed_cls=True (a pos_embed row for the class token) needs cls_token_at=0')

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.drop_path_rate = drop_path_rate
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.dynamic_img_size = dynamic_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.grad_checkpointing = False
        # -1 encodes "no class token" (TorchScript-friendly int attribute)
        self.cls_token_at = -1 if cls_token_at is None else cls_token_at
        self.num_prefix_tokens = 0 if cls_token_at is None else 1
        self.pos_embed_cls = bool(pos_embed_cls and use_pos_embed)
        # blocks before the class token (or all blocks without one) see NHWC when block_fmt='NHWC'
        self.spatial_blocks = block_fmt == 'NHWC' and self.cls_token_at != 0
        self.grid_blocks = grid_blocks
        if pos_embed_interpolation not in ('bicubic', 'bilinear'):
            raise ValueError(f"pos_embed_interpolation={pos_embed_interpolation!r}: expected 'bicubic' or 'bilinear'")
        self.pos_embed_interpolation = pos_embed_interpolation

        self.patch_embed = embed_layer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            bias=patch_bias,
            output_fmt='NHWC',
            strict_img_size=strict_img_size and not dynamic_img_size,
            dynamic_img_pad=dynamic_img_pad,
            **dd,
        )
        self.patch_size = self.patch_embed.feat_ratio()
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if cls_token_at is not None else None
        if use_pos_embed:
            num_pos = num_patches + (self.num_prefix_tokens if self.pos_embed_cls else 0)
            self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, embed_dim, **dd))
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # a ModuleList when blocks take the grid: TorchScript compiles Sequential.forward, which calls blk(x)
        self.blocks = nn.ModuleList(blocks) if grid_blocks else nn.Sequential(*blocks)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.norm = norm_layer(embed_dim, **dd)
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=self.patch_size, module=f'blocks.{i}') for i in range(depth)]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        if weight_init != 'skip':
            self.init_weights()

    # ----------------------------------------------------------------------------------------------- init / API

    def init_weights(self) -> None:
        """Generic ViT init, then each sub-module's own ``init_weights()`` hook (see the module docstring)."""
        if self.pos_embed is not None:
            init_trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            init_trunc_normal_(self.cls_token, std=.02)
        self.apply(_init_linear_norm)
        for module in self.modules():
            if module is not self and hasattr(module, 'init_weights'):
                module.init_weights()

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {k for k in ('pos_embed', 'cls_token') if getattr(self, k, None) is not None}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^cls_token|pos_embed|patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in _GLOBAL_POOLS:
                raise ValueError(f'global_pool={global_pool!r}: expected one of {_GLOBAL_POOLS}')
            if global_pool == 'token' and self.cls_token is None:
                raise ValueError("global_pool='token' needs the class token, which this model does not have")
            self.global_pool = global_pool
        self.num_classes = num_classes
        # the new head goes on the model's device, in its dtype (get_device_dtype returns a dict)
        dd = get_device_dtype(self)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    @torch.jit.ignore
    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Change the fixed input size; ``pos_embed`` is resampled to the new patch grid."""
        prev_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size)
        if self.pos_embed is not None and self.patch_embed.grid_size != prev_grid:
            self.pos_embed = nn.Parameter(resample_abs_pos_embed(
                self.pos_embed.detach(), new_size=self.patch_embed.grid_size, old_size=prev_grid,
                num_prefix_tokens=self.num_prefix_tokens if self.pos_embed_cls else 0, verbose=True,
                interpolation=self.pos_embed_interpolation, antialias=self.pos_embed_interpolation == 'bicubic',
            ), requires_grad=self.pos_embed.requires_grad)
        try:
            from timm.models._input import update_model_input_size
            update_model_input_size(self, self.patch_embed.img_size)
        except ImportError:  # pragma: no cover - older timm
            pass

    # ----------------------------------------------------------------------------------------------- forward parts

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        """Clear errors for a wrong rank / channel count / image size (skipped while tracing)."""
        if torch.jit.is_tracing() or _is_fx_tracing():
            return
        min_size = 1 if self.dynamic_img_pad else self.patch_size
        check_input(x, self.in_chans, min_size)
        H, W = x.shape[-2:]
        ph, pw = self.patch_embed.patch_size
        if not self.dynamic_img_size:
            expected = tuple(self.patch_embed.img_size)
            grid = self.patch_embed.dynamic_feat_size((H, W))
            if (self.patch_embed.strict_img_size and (H, W) != expected) or (
                    self.pos_embed is not None and tuple(grid) != tuple(self.patch_embed.grid_size)):
                raise ValueError(
                    f'x: input image of {H}x{W} does not match this model\'s fixed input size '
                    f'{expected[0]}x{expected[1]} (its position embedding covers a '
                    f'{self.patch_embed.grid_size[0]}x{self.patch_embed.grid_size[1]} patch grid); resize the image, '
                    f'or create the model with img_size=({H}, {W}) (pretrained weights are resampled) or '
                    f'dynamic_img_size=True')
        if not self.dynamic_img_pad and (H % ph or W % pw):
            raise ValueError(
                f'x: input image of {H}x{W} is not a multiple of the patch size {ph}x{pw}; '
                f'resize it, or create the model with dynamic_img_pad=True')

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """NHWC patch tokens -> tokens with position embedding (and the class token when ``cls_token_at == 0``).

        Returns NHWC when the first blocks are spatial, else ``[B, (1 +) N, C]``.
        """
        B, H, W, C = x.shape
        pos_embed = self.pos_embed
        if pos_embed is not None and self.dynamic_img_size:
            pos_embed = resample_abs_pos_embed(
                pos_embed, new_size=[H, W], old_size=self.patch_embed.grid_size,
                num_prefix_tokens=self.num_prefix_tokens if self.pos_embed_cls else 0,
                interpolation=self.pos_embed_interpolation, antialias=self.pos_embed_interpolation == 'bicubic')
        if self.spatial_blocks:
            if pos_embed is not None:
                x = x + pos_embed.reshape(1, H, W, C)
            return self.pos_drop(x)
        x = x.reshape(B, H * W, C)
        cls_token = self.cls_token
        if self.cls_token_at == 0 and cls_token is not None:
            if pos_embed is not None and self.pos_embed_cls:
                x = torch.cat([cls_token.expand(B, -1, -1), x], dim=1) + pos_embed
            else:
                if pos_embed is not None:
                    x = x + pos_embed
                x = torch.cat([cls_token.expand(B, -1, -1), x], dim=1)
        elif pos_embed is not None:
            x = x + pos_embed
        return self.pos_drop(x)

    def _insert_cls(self, x: torch.Tensor, spatial: bool) -> torch.Tensor:
        """Flatten NHWC tokens if needed and prepend the class token (before block ``cls_token_at`` > 0)."""
        B = x.shape[0]
        if spatial:
            x = x.flatten(1, 2)
        cls_token = self.cls_token
        if cls_token is not None:
            x = torch.cat([cls_token.expand(B, -1, -1), x], dim=1)
        return x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward returning the outputs of the blocks selected by ``indices``.

        Intermediates are the patch tokens only (the class token is stripped; with ``return_prefix_tokens`` each
        entry is ``(spatial, prefix)``, prefix ``[B, 0, C]`` before the class token exists), as NCHW maps
        ``[B, C, H/p, W/p]`` or NLC ``[B, N, C]``. ``norm=True`` applies the final norm to every intermediate.
        The first returned value is ``forward_features(x)`` (when every block ran).
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt={output_fmt!r}: expected 'NCHW' or 'NLC'")
        if not torch.jit.is_scripting():
            self._check_input(x)
        reshape = output_fmt == 'NCHW'
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)

        x = self.patch_embed(x)
        B, H, W, C = x.shape
        x = self._pos_embed(x)
        spatial = self.spatial_blocks
        num_prefix = self.num_prefix_tokens if self.cls_token_at == 0 else 0
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]

        intermediates: List[torch.Tensor] = []
        prefixes: List[torch.Tensor] = []
        for i, blk in enumerate(blocks):
            if i == self.cls_token_at and i > 0:
                x = self._insert_cls(x, spatial)
                spatial = False
                num_prefix = self.num_prefix_tokens
            if self.grid_blocks:  # a constant: TorchScript compiles only the taken call
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, H, W)
                else:
                    x = blk(x, H, W)
            elif self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x)
            else:
                x = blk(x)
            if i in take_indices:
                y = self.norm(x) if norm else x
                if spatial:
                    prefixes.append(y.new_zeros((B, 0, C)))
                    y = y.permute(0, 3, 1, 2) if reshape else y.reshape(B, H * W, C)
                else:
                    prefixes.append(y[:, :num_prefix])
                    y = y[:, num_prefix:]
                    y = y.reshape(B, H, W, C).permute(0, 3, 1, 2) if reshape else y
                intermediates.append(y.contiguous())

        if not torch.jit.is_scripting() and return_prefix_tokens:
            intermediates = list(zip(intermediates, prefixes))  # type: ignore[assignment]
        if intermediates_only:
            return intermediates
        if spatial:
            x = x.flatten(1, 2)
        x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and optionally norm/head) not needed for ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if self.cls_token_at > max_index:
            # the class token would be inserted after the kept blocks: drop it (and a token-pooled head)
            self.cls_token = None
            self.cls_token_at = -1
            self.num_prefix_tokens = 0
            prune_head = prune_head or self.global_pool == 'token'
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, num_prefix_tokens + N, C]`` after the final norm (class token first when present)."""
        if not torch.jit.is_scripting():
            self._check_input(x)
        x = self.patch_embed(x)
        H, W = x.shape[1], x.shape[2]
        x = self._pos_embed(x)
        spatial = self.spatial_blocks
        for i, blk in enumerate(self.blocks):
            if i == self.cls_token_at and i > 0:
                x = self._insert_cls(x, spatial)
                spatial = False
            if self.grid_blocks:  # a constant: TorchScript compiles only the taken call
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, H, W)
                else:
                    x = blk(x, H, W)
            elif self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x)
            else:
                x = blk(x)
        if spatial:
            x = x.flatten(1, 2)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == 'token':
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
