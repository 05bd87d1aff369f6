# Faster R-CNN R50-FPN 1x with CBAM in every bottleneck (the CBAM paper's COCO experiment, on mmdet's FPN recipe:
# mmdet faster-rcnn_r50_fpn_1x_coco -- SGD lr 0.02, 12 epochs, frozen stem + stage 1, norm_eval).
# Backbone: mmdet's own ResNet-50 with the visionattn.CBAM plugin after conv3 + BN, before the shortcut add (the
# official placement). Its keys are the official ones (layerN.M.cbam.*), so the released ResNet-50 + CBAM file loads
# as it is (mmengine strips its module. prefix):
#   python tools/det_train.py configs/det/faster-rcnn_r50-cbam_fpn_1x_coco.py --pretrained RESNET50_CBAM.pth
# or a visionattn_resnet50_cbam checkpoint after `python tools/export.py CKPT --format mmdet-resnet`.
# Needs COCO under data/coco/.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['visionattn.det'], allow_failed_imports=False)

model = dict(backbone=dict(
    plugins=[dict(cfg=dict(type='visionattn.CBAM'), stages=(True, True, True, True), position='after_conv3')],
    init_cfg=None))  # no torchvision download: --pretrained sets the CBAM checkpoint
