# RetinaNet 1x (mmdet retinanet_r50_fpn_1x_coco: 12 epochs, steps at 8 and 11, FPN start_level=1)
# Backbone: Agent-Swin-T. Agent attention releases no RetinaNet config for Agent-Swin; this one is derived: the
# backbone and optimizer of the official Mask R-CNN 1x (downstream/detection/configs/agent_swin/
# agent_swin_t_mrcnn_1x_9-12-14-7.py: drop path 0.1, AdamW lr 1e-4, wd 0.05, batch 2 per GPU, no decay on norms,
# relative_position_bias_table and the agent biases an/na/ah/aw/ha/wa_bias) on mmdet's standard RetinaNet 1x
# (single-scale 1333x800 training, not the Mask R-CNN's multi-scale crop augmentation).
# The agent_swin line of visionattn/det/families.py adds the rest of the official backbone: a new LayerNorm per
# (pre-downsample) output, the downstream agent grids 9-12-14-7 (agent_shapes; stage 4 is Swin window attention,
# zero-padded, shifted and masked) and dynamic_img_size=True (agent biases resampled bilinearly to each input).
# Train: python tools/det_train.py configs/det/retinanet_agent_swin_tiny_fpn_1x_coco.py --pretrained CKPT
#   (CKPT: a classification checkpoint, an official one, or tools/export.py output). Needs COCO under data/coco/.
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', './_base_/visionattn_1x.py']

model = dict(
    backbone=dict(_base_.visionattn_backbone, model_name='visionattn_agent_swin_tiny', drop_path_rate=0.1),
    neck=dict(in_channels=[96, 192, 384, 768]))
optim_wrapper = dict(_base_.visionattn_optim_wrapper, paramwise_cfg=dict(
    _base_.visionattn_optim_wrapper.paramwise_cfg,
    custom_keys={k: _base_.no_decay for k in (
        'relative_position_bias_table', 'an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias')}))
