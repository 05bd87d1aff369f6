# Embedded detection job (no download): RetinaNet with a visionattn DaViT backbone, trained from scratch on CPU
# on the generated shapes dataset (tools/make_shapes_dataset.py: circles / squares / triangles on textured
# backgrounds, COCO format with boxes and masks), then COCO bbox mAP on its val split.
#   python tools/det_train.py configs/det/retinanet_davit_shapes.py
# The dataset is generated on first use (shapes_dataset below). Training runs for time_budget_minutes (or
# max_iters, whichever comes first) with a learning rate that warms up over 100 iterations and then follows a
# cosine over that time budget (tools/det_train.py, time_schedule), so a busy machine still ends annealed; then
# it evaluates COCO bbox mAP on the val split. Measured on the shared 2-core dev machine (load ~6, 0.6 s/iteration):
# bbox mAP 0.607 (mAP50 0.785) after 1067 iterations; 700 s end to end including the dataset generation.
#
# Differences from the COCO recipe (configs/det/retinanet_davit_tiny_fpn_1x_coco.py), all for a 2-core CPU
# budget: a narrow DaViT (visionattn_davit_tiny's architecture with dims 32-256 and one dual block per stage,
# ~1M parameters, random init since nothing is downloaded), FPN/head width 64 with 2 head convs, anchors
# scaled to 20-72 px objects on 160 px images, and AdamW lr 1e-3 (from scratch, not the 1e-4 fine-tuning
# rate) with warm-up and cosine decay over an iteration schedule.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['visionattn.det'], allow_failed_imports=False)

data_root = 'output/shapes/'
shapes_dataset = dict(root='output/shapes', num_train=1500, num_val=200, size=160, seed=0)
metainfo = dict(classes=('circle', 'square', 'triangle'), palette=[(220, 20, 60), (0, 128, 255), (255, 180, 0)])
time_budget_minutes = 11
time_schedule = dict(warmup_iters=100, min_lr_ratio=0.01)
max_iters = 4000  # upper bound; the time budget normally ends training first

model = dict(
    data_preprocessor=dict(pad_size_divisor=32),
    backbone=dict(
        _delete_=True,
        type='visionattn.Backbone',
        model_name='visionattn_davit_tiny',
        embed_dims=(32, 64, 128, 256),
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 4, 8),
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.0,
        out_norms=True,
        init_cfg=None),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=64),
    bbox_head=dict(
        num_classes=3, in_channels=64, feat_channels=64, stacked_convs=2,
        anchor_generator=dict(octave_base_scale=3)),
    test_cfg=dict(nms_pre=300, score_thr=0.05, max_per_img=50))

backend_args = None
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(160, 160), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(160, 160), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(
        _delete_=True, type='CocoDataset', data_root=data_root, metainfo=metainfo,
        ann_file='annotations/train.json', data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4), pipeline=train_pipeline, backend_args=backend_args))
val_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(
        _delete_=True, type='CocoDataset', data_root=data_root, metainfo=metainfo,
        ann_file='annotations/val.json', data_prefix=dict(img='val/'), test_mode=True,
        pipeline=test_pipeline, backend_args=backend_args))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric', ann_file=data_root + 'annotations/val.json', metric='bbox',
                     format_only=False, backend_args=backend_args)
test_evaluator = val_evaluator

train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
param_scheduler = None  # the time-based warm-up + cosine of tools/det_train.py (time_schedule)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.),
    clip_grad=dict(max_norm=10., norm_type=2))
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=500, max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
