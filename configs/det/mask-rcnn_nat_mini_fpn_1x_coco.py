# Mask R-CNN 1x (mmdet mask-rcnn_r50_fpn_1x_coco: 12 epochs, steps at 8 and 11)
# Backbone: NAT-Mini (official detection configs: drop_path 0.2, no decay on rpb and norms).
# Train: python tools/det_train.py configs/det/mask-rcnn_nat_mini_fpn_1x_coco.py --pretrained CKPT
#   (CKPT: a classification checkpoint, an official one, or tools/export.py output). Needs COCO under data/coco/.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['visionattn.det'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='visionattn.Backbone',
        model_name='visionattn_nat_mini',
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False,
        out_norms=True,
        drop_path_rate=0.2,
        init_cfg=None),  # dict(type='Pretrained', checkpoint='...')
    neck=dict(in_channels=[64, 128, 256, 512]))

# AdamW as the transformer-backbone detection papers (Swin / PVT / Twins / NAT / DaViT): lr 1e-4, wd 0.05,
# no decay on normalisation layers and position tables / biases
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0., custom_keys={'rpb': dict(decay_mult=0.)}))
