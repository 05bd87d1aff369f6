# Shared blocks of the visionattn COCO 1x detection configs (configs/det/*_fpn_1x_coco.py).
# A config lists mmdet's R50 1x config and this file as its bases, then fills in the family's values:
#   _base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', './_base_/visionattn_1x.py']
#   model = dict(backbone=dict(_base_.visionattn_backbone, model_name='visionattn_nat_mini', drop_path_rate=0.2),
#                neck=dict(in_channels=[64, 128, 256, 512]))
#   optim_wrapper = dict(_base_.visionattn_optim_wrapper, paramwise_cfg=dict(
#       _base_.visionattn_optim_wrapper.paramwise_cfg, custom_keys={'rpb': _base_.no_decay}))
custom_imports = dict(imports=['visionattn.det'], allow_failed_imports=False)

# replaces mmdet's ResNet-50 (_delete_); model_name and drop_path_rate are set per config
visionattn_backbone = dict(
    _delete_=True,
    type='visionattn.Backbone',
    model_name=None,
    out_indices=(0, 1, 2, 3),
    frozen_stages=-1,
    norm_eval=False,
    with_cp=False,
    out_norms=True,
    drop_path_rate=0.1,
    init_cfg=None)  # dict(type='Pretrained', checkpoint='...'), or tools/det_train.py --pretrained CKPT

# AdamW as the transformer-backbone detection papers (Swin / PVT / Twins / NAT / DaViT): lr 1e-4, wd 0.05,
# no decay on normalisation layers; each config adds its family's position tables / biases as custom_keys
visionattn_optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0., custom_keys={}))
no_decay = dict(decay_mult=0.)
