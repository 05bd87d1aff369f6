"""Attention and token-mixing layers shared by the visionattn families."""
from .conv_pos_enc import ConvPosEnc, DepthwiseConvNHWC, depthwise_conv2d
from .padding import crop_to, pad_to_multiple
from .window_attention import WindowAttention
from .window_attention import SwinWindowAttention, shift_window_mask, window_partition, window_reverse
from .cbam import CBAM
from .ela import ELA
from .triplet_attention import TripletAttention
from .polyline_attention import PolylinePathAttention, PolylineRoPE
from .focused_linear_attention import FocusedLinearAttention, FocusedLinearBranch
from .cswin_attention import CSwinAttention
from .agent_attention import AgentAttention, AgentBranch
from .neighborhood_attention import NeighborhoodAttention2d, na_backend, neighborhood_attention_2d
from .bilevel_routing_attention import BiLevelRoutingAttention, GlobalAttentionLePE, bra_backend, routed_attention
