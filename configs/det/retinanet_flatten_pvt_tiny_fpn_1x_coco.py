# RetinaNet 1x (mmdet retinanet_r50_fpn_1x_coco: 12 epochs, steps at 8 and 11, FPN start_level=1)
# Backbone: FLatten-PVT-T. FLatten releases no detection code; the settings are those of the PVT detection papers
# (AdamW lr 1e-4, wd 0.05, batch 2 per GPU x 8, drop path 0.1), no decay on norms, the learned encodings
# (pos_embed / positional_encoding) and the focusing scale; encodings are interpolated to each input (dynamic_img_size).
# Train: python tools/det_train.py configs/det/retinanet_flatten_pvt_tiny_fpn_1x_coco.py --pretrained CKPT
#   (CKPT: a classification checkpoint, an official one, or tools/export.py output). Needs COCO under data/coco/.
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', './_base_/visionattn_1x.py']

model = dict(
    backbone=dict(_base_.visionattn_backbone, model_name='visionattn_flatten_pvt_tiny', drop_path_rate=0.1),
    neck=dict(in_channels=[64, 128, 320, 512]))
optim_wrapper = dict(_base_.visionattn_optim_wrapper, paramwise_cfg=dict(
    _base_.visionattn_optim_wrapper.paramwise_cfg,
    custom_keys={'pos_embed': _base_.no_decay, 'positional_encoding': _base_.no_decay, '.scale': _base_.no_decay}))
