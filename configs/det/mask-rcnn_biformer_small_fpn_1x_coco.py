# Mask R-CNN 1x (mmdet mask-rcnn_r50_fpn_1x_coco: 12 epochs, steps at 8 and 11)
# Backbone: BiFormer-S with the official recipe (rayleizhu/BiFormer, object_detection/configs/coco/
# maskrcnn.1x.biformer_small.py, 47.8 box / 43.2 mask AP): drop path 0.2, AdamW lr 1e-4, wd 0.05, batch 2 per GPU,
# BatchNorms in eval mode (BiFormer_mm's default norm_eval=True), native AMP (official fp16=dict(): mmcv's
# Fp16OptimizerHook, static loss scale 512; mmengine's AmpOptimWrapper, which needs a GPU).
# No decay where the official custom key 'norm' (decay_mult 0) matches: the LayerNorms norm1 / norm2 and the output
# norms extra_norms (here norm_decay_mult=0). The BatchNorms of the stem and the downsamplers are officially named
# downsample_layers.i.j, which 'norm' does not match: they keep weight decay (the two custom keys below).
# ('absolute_pos_embed' / 'relative_position_bias_table', also listed there, do not exist in BiFormer.)
# The biformer line of visionattn/det/families.py adds the rest of the official backbone: n_win=16, auto_pad=True
# and a LayerNorm2d (eps 1e-6) per stage output (official extra_norms.{i}).
# Train: python tools/det_train.py configs/det/mask-rcnn_biformer_small_fpn_1x_coco.py --pretrained CKPT
#   (CKPT: a classification checkpoint, the official biformer_small_in1k.pth, or tools/export.py output). Needs COCO
#   under data/coco/.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', './_base_/visionattn_1x.py']

model = dict(
    backbone=dict(_base_.visionattn_backbone, model_name='visionattn_biformer_small', drop_path_rate=0.2,
                  norm_eval=True),
    neck=dict(in_channels=[64, 128, 256, 512]))
optim_wrapper = dict(
    _base_.visionattn_optim_wrapper, type='AmpOptimWrapper', loss_scale=512.,
    paramwise_cfg=dict(_base_.visionattn_optim_wrapper.paramwise_cfg, custom_keys={
        'backbone.model.stem.': dict(decay_mult=1.), '.downsample.norm.': dict(decay_mult=1.)}))
