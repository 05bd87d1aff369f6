"""Model creation (unknown-name and pretrained-fit checks) and the evaluation loop of training and validation."""
import contextlib
import difflib
import logging
import re

import timm
import torch
import torch.nn.functional as F
from timm.utils import AverageMeter, accuracy, reduce_tensor

from .. import models  # noqa: F401  (registers the visionattn_* models in timm)
from .checkpoint import read_weights
from .errors import UserInputError
from .progress import DEFAULT_INTERVAL, Progress

_logger = logging.getLogger('train')


def check_model_name(name):
    """Raise a clear error (with close matches) for a name neither timm nor visionattn registers."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models('visionattn_*'))"
        raise UserInputError(f"unknown model '{name}'{hint}")


@contextlib.contextmanager
def _capture_timm_load_log():
    """Collect the messages timm's weight loader logs (missing/unexpected keys)."""
    logger = logging.getLogger('timm.models._builder')
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def create_model(name, num_classes, pretrained_path=None, **kwargs):
    """timm.create_model; with ``pretrained_path`` the file goes through the model's own checkpoint filter and the
    classifier is re-initialised for ``num_classes``. Weights that leave any non-classifier tensor unloaded are an
    error (e.g. a checkpoint of another architecture)."""
    check_model_name(name)
    if not pretrained_path:
        return build_model(name, num_classes=num_classes, **kwargs)
    read_weights(pretrained_path, '--pretrained-path')  # unreadable / empty / pickled objects: a clear error first
    with _capture_timm_load_log() as messages:
        model = load_weights_file(name, pretrained_path, num_classes=num_classes, classifier_classes=-1, **kwargs)
    classifier = model.pretrained_cfg.get('classifier') or ()
    classifiers = [classifier] if isinstance(classifier, str) else classifier
    heads = {f'{c}.{p}' for c in classifiers for p in ('weight', 'bias')}
    missing = [k for m in messages for group in re.findall(r'Missing keys \((.*?)\) discovered', m)
               for k in group.split(', ') if k not in heads]
    if missing:
        raise UserInputError(f"pretrained weights {pretrained_path} do not fit model {name}: {len(missing)} tensor(s) "
                             f"missing from the file, e.g. {missing[:5]} (checkpoint of another architecture?)")
    return model


def build_model(name, **kwargs):
    """timm.create_model; keyword arguments the model does not take are a UserInputError naming them."""
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        raise UserInputError(f"model {name} does not accept these arguments {kwargs}: {e}") from None


# what timm's strict load and the checkpoint filters raise for weights that do not fit a model
LOAD_ERRORS = (RuntimeError, KeyError, ValueError, IndexError, AssertionError)


def _brief(error, limit=400):
    """An exception's message on one line, at most ``limit`` characters."""
    return ' '.join(str(error).split())[:limit]


def load_weights_file(name, path, num_classes, classifier_classes=None, **kwargs):
    """``name`` with the weights of ``path`` (any container its checkpoint filter accepts), loaded strictly by timm
    through ``pretrained_cfg_overlay``; a file that does not fit is a UserInputError naming it.
    ``classifier_classes``: the file's classifier size (-1: drop the file's classifier, re-initialise it)."""
    overlay = dict(file=str(path), num_classes=num_classes if classifier_classes is None else classifier_classes)
    try:
        return build_model(name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay, **kwargs)
    except LOAD_ERRORS as e:
        raise UserInputError(f"weights {path} do not fit model {name}: {_brief(e)}") from None


def weights_source(cfg: dict) -> str:
    """Where ``pretrained=True`` fetches the weights of a pretrained cfg (a dict) from ('' when it has none)."""
    if cfg.get('hf_hub_id'):
        filename = cfg.get('hf_hub_filename')
        return f"Hugging Face hub {cfg['hf_hub_id']}" + (f" ({filename})" if filename else '')
    return cfg.get('url') or ''


def create_pretrained(name, **kwargs):
    """``timm.create_model(name, pretrained=True)``: ``name`` (or ``name.tag``) with its released weights, downloaded
    once into timm's cache. A model or tag without downloadable weights, a failed download or a file that does not
    fit is a UserInputError naming the model and the source."""
    check_model_name(name)
    try:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
    except RuntimeError as e:  # an unknown tag
        raise UserInputError(f"model {name!r}: {e} Tags with weights: "
                             f"{', '.join(timm.list_pretrained(name.split('.')[0] + '.*')) or 'none'}") from None
    source = weights_source(cfg)
    if not source:
        notes = ' '.join(cfg.get('notes') or ())
        raise UserInputError(f"model {name!r} has no downloadable pretrained weights"
                             + (f" ({notes})" if notes else '') + '; give a weights file instead')
    try:
        return build_model(name, pretrained=True, **kwargs)
    except OSError as e:  # no network, HTTP errors, missing hub file
        raise UserInputError(f"could not download the weights of {name} from {source}: {_brief(e, 300)}") from None
    except LOAD_ERRORS as e:
        raise UserInputError(f"the weights of {name} from {source} do not fit the model: {_brief(e)}") from None


def load_model_state(model, state_dict, source, arch):
    """load_state_dict(strict) with a clear error naming the checkpoint and its architecture."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        detail = _brief(e)
        raise UserInputError(f"checkpoint {source} (model {arch}) does not fit this model: {detail}") from None


@torch.no_grad()
def evaluate(model, loader, device, autocast, channels_last=False, distributed=False, collect=False, progress=True,
             interval=DEFAULT_INTERVAL):
    """Top-1/top-k accuracy (%, k = min(5, classes), reported as ``top5`` with ``k``) and mean cross-entropy over
    the loader, summed over all ranks; a progress bar (or lines, off a terminal) when ``progress``.

    With ``collect`` also returns this rank's predictions and targets (for a confusion matrix).
    """
    model.eval()
    loss_m, top1_m, top5_m = AverageMeter(), AverageMeter(), AverageMeter()
    predictions, targets = [], []
    k = 5
    bar = Progress(len(loader), 'eval', enabled=progress, interval=interval)
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            output = model(images)
        output = output.float()
        k = min(5, output.shape[1])
        acc1, acc5 = accuracy(output, target, topk=(1, k))
        n = images.shape[0]
        loss_m.update(F.cross_entropy(output, target).item(), n)
        top1_m.update(acc1.item(), n)
        top5_m.update(acc5.item(), n)
        if collect:
            predictions.append(output.argmax(1).cpu())
            targets.append(target.cpu())
        bar.update(top1=f'{top1_m.avg:.2f}')
    bar.close()
    sums = torch.tensor([loss_m.sum, top1_m.sum, top5_m.sum, loss_m.count], dtype=torch.float64)
    if distributed:
        sums = reduce_tensor(sums, 1)
    count = max(sums[3].item(), 1)
    metrics = {'loss': sums[0].item() / count, 'top1': sums[1].item() / count, 'top5': sums[2].item() / count,
               'count': int(sums[3].item()), 'k': k}
    if collect:
        return metrics, torch.cat(predictions) if predictions else torch.empty(0), \
            torch.cat(targets) if targets else torch.empty(0)
    return metrics
