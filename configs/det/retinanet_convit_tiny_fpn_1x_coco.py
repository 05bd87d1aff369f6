# RetinaNet 1x (mmdet retinanet_r50_fpn_1x_coco: 12 epochs, steps at 8 and 11, FPN start_level=1)
# Backbone: ConViT-Ti: a plain ViT (stride 16); the wrapper adds the simple-pyramid adaptor (strides 4/8/16/32, 192 channels each). No official ConViT detection recipe exists.
# Train: python tools/det_train.py configs/det/retinanet_convit_tiny_fpn_1x_coco.py --pretrained CKPT
#   (CKPT: a classification checkpoint, an official one, or tools/export.py output). Needs COCO under data/coco/.
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', './_base_/visionattn_1x.py']

model = dict(
    backbone=dict(_base_.visionattn_backbone, model_name='visionattn_convit_tiny', drop_path_rate=0.1),
    neck=dict(in_channels=[192, 192, 192, 192]))
# no decay on the pos_embed/cls_token parameters either
optim_wrapper = dict(_base_.visionattn_optim_wrapper, paramwise_cfg=dict(
    _base_.visionattn_optim_wrapper.paramwise_cfg, custom_keys={'pos_embed': _base_.no_decay, 'cls_token': _base_.no_decay}))
