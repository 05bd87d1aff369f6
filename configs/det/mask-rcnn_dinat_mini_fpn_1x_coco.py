# Mask R-CNN 1x (mmdet mask-rcnn_r50_fpn_1x_coco: 12 epochs, steps at 8 and 11)
# Backbone: DiNAT-Mini with the official detection dilations [[1,28,1],[1,7,1,14],[1,3,1,5,1,7],[1,3,1,3,1]] (set by visionattn.det).
# Train: python tools/det_train.py configs/det/mask-rcnn_dinat_mini_fpn_1x_coco.py --pretrained CKPT
#   (CKPT: a classification checkpoint, an official one, or tools/export.py output). Needs COCO under data/coco/.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', './_base_/visionattn_1x.py']

model = dict(
    backbone=dict(_base_.visionattn_backbone, model_name='visionattn_dinat_mini', drop_path_rate=0.2),
    neck=dict(in_channels=[64, 128, 256, 512]))
# no decay on the rpb parameters either
optim_wrapper = dict(_base_.visionattn_optim_wrapper, paramwise_cfg=dict(
    _base_.visionattn_optim_wrapper.paramwise_cfg, custom_keys={'rpb': _base_.no_decay}))
