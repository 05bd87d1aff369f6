# Mask R-CNN 1x (mmdet mask-rcnn_r50_fpn_1x_coco: 12 epochs, steps at 8 and 11)
# Backbone: PPMA-T (official detection/configs/mask_rcnn_ppma_tiny_fpn_1x_coco.py: AdamW lr 1e-4, wd 0.05, batch 2
# per GPU; the official backbone hard-codes drop_path 0.1). No decay on norms and on the path parameters dt_bias / A_log.
# Train: python tools/det_train.py configs/det/mask-rcnn_ppma_tiny_fpn_1x_coco.py --pretrained CKPT
#   (CKPT: a classification checkpoint, an official one, or tools/export.py output). Needs COCO under data/coco/.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', './_base_/visionattn_1x.py']

model = dict(
    backbone=dict(_base_.visionattn_backbone, model_name='visionattn_ppma_tiny', drop_path_rate=0.1),
    neck=dict(in_channels=[64, 128, 256, 512]))
optim_wrapper = dict(_base_.visionattn_optim_wrapper, paramwise_cfg=dict(
    _base_.visionattn_optim_wrapper.paramwise_cfg,
    custom_keys={'dt_bias': _base_.no_decay, 'A_log': _base_.no_decay}))
