# RetinaNet R50-FPN 1x with Triplet Attention (k=7) in every bottleneck: the official repo's mmdetection result
# (37.6 box AP) used mmdet's standard RetinaNet 1x recipe (retinanet_r50_fpn_1x_coco: SGD lr 0.01, 12 epochs).
# Backbone: mmdet's own ResNet-50 with the visionattn.TripletAttention plugin after conv3 + BN, before the shortcut
# add (the official placement); keys layerN.M.triplet_attention.* as in the released checkpoints:
#   python tools/det_train.py configs/det/retinanet_r50-triplet_fpn_1x_coco.py --pretrained TRIPLET_R50.pth
# or a visionattn_resnet50_triplet checkpoint after `python tools/export.py CKPT --format mmdet-resnet`.
# Needs COCO under data/coco/.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['visionattn.det'], allow_failed_imports=False)

model = dict(backbone=dict(
    plugins=[dict(cfg=dict(type='visionattn.TripletAttention'), stages=(True, True, True, True),
                  position='after_conv3')],
    init_cfg=None))  # no torchvision download: --pretrained sets the Triplet checkpoint
