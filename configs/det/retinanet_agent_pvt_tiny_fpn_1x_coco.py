# RetinaNet 1x (mmdet retinanet_r50_fpn_1x_coco: 12 epochs, steps at 8 and 11, FPN start_level=1)
# Backbone: Agent-PVT-T with the official recipe (LeapLabTHU/Agent-Attention, downstream/detection/configs/agent_pvt/
# agent_pvt_t_rtn_1x_12-16-28-28.py, 40.3 box AP): drop path 0.1, AdamW lr 1e-4, wd 1e-4 on every parameter (the
# official optimizer has no paramwise_cfg: norms, pos_embed and the agent biases are decayed too), batch 2 per GPU.
# The agent_pvt line of visionattn/det/families.py adds the rest of the official backbone: the four raw stage maps
# (no output norms), the downstream agent grids 12-16-28-28 (agent_shapes) and dynamic_img_size=True (agent biases
# and pos_embed resampled bilinearly to each input).
# Train: python tools/det_train.py configs/det/retinanet_agent_pvt_tiny_fpn_1x_coco.py --pretrained CKPT
#   (CKPT: a classification checkpoint, an official one, or tools/export.py output). Needs COCO under data/coco/.
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', './_base_/visionattn_1x.py']

model = dict(
    backbone=dict(_base_.visionattn_backbone, model_name='visionattn_agent_pvt_tiny', drop_path_rate=0.1),
    neck=dict(in_channels=[64, 128, 320, 512]))
optim_wrapper = dict(
    _delete_=True, type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4))
