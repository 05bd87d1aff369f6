# RetinaNet 1x (mmdet retinanet_r50_fpn_1x_coco: 12 epochs, steps at 8 and 11, FPN start_level=1)
# Backbone: Twins-PCPVT-S (official detection backbone: drop_path 0.2, no output norms).
# Train: python tools/det_train.py configs/det/retinanet_twins_pcpvt_small_fpn_1x_coco.py --pretrained CKPT
#   (CKPT: a classification checkpoint, an official one, or tools/export.py output). Needs COCO under data/coco/.
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', './_base_/visionattn_1x.py']

model = dict(
    backbone=dict(_base_.visionattn_backbone, model_name='visionattn_twins_pcpvt_small', drop_path_rate=0.2),
    neck=dict(in_channels=[64, 128, 320, 512]))
# no decay on the pos_block parameters either
optim_wrapper = dict(_base_.visionattn_optim_wrapper, paramwise_cfg=dict(
    _base_.visionattn_optim_wrapper.paramwise_cfg, custom_keys={'pos_block': _base_.no_decay}))
