# Mask R-CNN 1x (mmdet mask-rcnn_r50_fpn_1x_coco: 12 epochs, steps at 8 and 11)
# Backbone: DaViT-T; the official DaViT detection configs use drop_path 0.1 for 1x, AdamW 1e-4, wd 0.05.
# Train: python tools/det_train.py configs/det/mask-rcnn_davit_tiny_fpn_1x_coco.py --pretrained CKPT
#   (CKPT: a classification checkpoint, an official one, or tools/export.py output). Needs COCO under data/coco/.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', './_base_/visionattn_1x.py']

model = dict(
    backbone=dict(_base_.visionattn_backbone, model_name='visionattn_davit_tiny', drop_path_rate=0.1),
    neck=dict(in_channels=[96, 192, 384, 768]))
optim_wrapper = _base_.visionattn_optim_wrapper
