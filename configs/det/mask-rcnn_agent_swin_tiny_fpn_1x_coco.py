# Mask R-CNN 1x (mmdet mask-rcnn_r50_fpn_1x_coco: 12 epochs, steps at 8 and 11)
# Backbone: Agent-Swin-T with the official recipe (LeapLabTHU/Agent-Attention, downstream/detection/configs/agent_swin/
# agent_swin_t_mrcnn_1x_9-12-14-7.py, 44.6 box / 40.7 mask AP), which is Swin's: drop path 0.1, AdamW lr 1e-4,
# wd 0.05, batch 2 per GPU, no decay on norms (official custom key 'norm'; here norm_decay_mult=0, the same
# parameters), relative_position_bias_table and the agent biases an/na/ah/aw/ha/wa_bias (absolute_pos_embed, also
# listed there, does not exist: ape=False); the DETR / Sparse R-CNN multi-scale + crop training augmentation below
# (mmdet 3.x form of the official AutoAugment policies, as mmdet's swin ms-crop configs).
# The agent_swin line of visionattn/det/families.py adds the rest of the official backbone: a new LayerNorm per
# (pre-downsample) output, the downstream agent grids 9-12-14-7 (agent_shapes; stage 4 is Swin window attention,
# zero-padded, shifted and masked) and dynamic_img_size=True (agent biases resampled bilinearly to each input).
# Train: python tools/det_train.py configs/det/mask-rcnn_agent_swin_tiny_fpn_1x_coco.py --pretrained CKPT
#   (CKPT: a classification checkpoint, an official one, or tools/export.py output). Needs COCO under data/coco/.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', './_base_/visionattn_1x.py']

model = dict(
    backbone=dict(_base_.visionattn_backbone, model_name='visionattn_agent_swin_tiny', drop_path_rate=0.1),
    neck=dict(in_channels=[96, 192, 384, 768]))

_scales = [(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333), (672, 1333), (704, 1333),
           (736, 1333), (768, 1333), (800, 1333)]
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=_base_.backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomChoice', transforms=[
        [dict(type='RandomChoiceResize', scales=_scales, keep_ratio=True)],
        [dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True),
         dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
         dict(type='RandomChoiceResize', scales=_scales, keep_ratio=True)]]),
    dict(type='PackDetInputs')]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

optim_wrapper = dict(_base_.visionattn_optim_wrapper, paramwise_cfg=dict(
    _base_.visionattn_optim_wrapper.paramwise_cfg,
    custom_keys={k: _base_.no_decay for k in (
        'relative_position_bias_table', 'an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias')}))
