# Mask R-CNN 1x (mmdet mask-rcnn_r50_fpn_1x_coco: 12 epochs, steps at 8 and 11)
# Backbone: DaViT-T; the official DaViT detection configs use drop_path 0.1 for 1x, AdamW 1e-4, wd 0.05.
# Train: python tools/det_train.py configs/det/mask-rcnn_davit_tiny_fpn_1x_coco.py --pretrained CKPT
#   (CKPT: a classification checkpoint, an official one, or tools/export.py output). Needs COCO under data/coco/.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['visionattn.det'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='visionattn.Backbone',
        model_name='visionattn_davit_tiny',
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False,
        out_norms=True,
        drop_path_rate=0.1,
        init_cfg=None),  # dict(type='Pretrained', checkpoint='...')
    neck=dict(in_channels=[96, 192, 384, 768]))

# AdamW as the transformer-backbone detection papers (Swin / PVT / Twins / NAT / DaViT): lr 1e-4, wd 0.05,
# no decay on normalisation layers and position tables / biases
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0., custom_keys={}))
