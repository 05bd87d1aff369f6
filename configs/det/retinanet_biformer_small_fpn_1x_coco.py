# RetinaNet 1x (mmdet retinanet_r50_fpn_1x_coco: 12 epochs, steps at 8 and 11, FPN start_level=1)
# Backbone: BiFormer-S with the official recipe (rayleizhu/BiFormer, object_detection/configs/coco/
# retinanet.1x.biformer_small.py, 45.9 box AP): drop path 0.2, AdamW lr 1e-4, wd 1e-4 on every parameter (the
# official optimizer has no paramwise_cfg: norms are decayed too), batch 2 per GPU, BatchNorms in eval mode
# (BiFormer_mm's default norm_eval=True), native AMP with a static loss scale of 512 (official fp16=dict(
# loss_scale=512.); mmengine's AmpOptimWrapper, which needs a GPU), find_unused_parameters=True (the stride-4 output
# and its norm do not reach the loss: FPN start_level=1).
# The biformer line of visionattn/det/families.py adds the rest of the official backbone: n_win=16, auto_pad=True
# and a LayerNorm2d (eps 1e-6) per stage output (official extra_norms.{i}).
# Train: python tools/det_train.py configs/det/retinanet_biformer_small_fpn_1x_coco.py --pretrained CKPT
#   (CKPT: a classification checkpoint, the official biformer_small_in1k.pth, or tools/export.py output). Needs COCO
#   under data/coco/.
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', './_base_/visionattn_1x.py']

model = dict(
    backbone=dict(_base_.visionattn_backbone, model_name='visionattn_biformer_small', drop_path_rate=0.2,
                  norm_eval=True),
    neck=dict(in_channels=[64, 128, 256, 512]))
optim_wrapper = dict(
    _delete_=True, type='AmpOptimWrapper', loss_scale=512.,
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4))
find_unused_parameters = True
