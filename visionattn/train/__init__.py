"""Fine-tuning, evaluation and weight export behind ``tools/train.py``, ``tools/validate.py`` and ``tools/export.py``
(console scripts ``visionattn-train``, ``visionattn-validate``, ``visionattn-export``).

``trainer``: the training run (:class:`~visionattn.train.trainer.Trainer`, ``main``); ``validate``: evaluation of a
checkpoint; ``export``: backbone weights for detection; ``data``, ``checkpoint``, ``model``: datasets and loaders,
atomic resumable checkpoints, model creation and the evaluation loop. Importing this package registers the models
but loads no training dependency; the submodules need the ``train`` extra.
"""
