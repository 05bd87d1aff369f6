"""Progress of a loop over batches: a tqdm bar on a terminal, a log line at a fixed interval elsewhere."""
import logging
import sys
import time

from tqdm import tqdm

_logger = logging.getLogger('train')

#: seconds between progress lines when stderr is not a terminal (nohup, slurm, CI logs)
DEFAULT_INTERVAL = 30.0


class Progress:
    """``update(**values)`` once per batch. On a terminal: a tqdm bar. Otherwise: one ``logger`` line
    ``<desc>: <done>/<total> batches (<percent>), <elapsed>, k=v ...`` every ``interval`` seconds and at the end.
    ``enabled=False`` (non-primary ranks) shows nothing."""

    def __init__(self, total, desc, initial=0, enabled=True, interval=DEFAULT_INTERVAL, logger=_logger):
        self.total, self.desc, self.done, self.interval, self.logger = total, desc, initial, interval, logger
        self.lines = enabled and not sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False,
                        disable=not enabled or self.lines)
        self.start = self.last = time.monotonic()
        self.values = {}

    def update(self, **values):
        self.done += 1
        self.values = values
        self.bar.update()
        if values:
            self.bar.set_postfix(**values)
        now = time.monotonic()
        if self.lines and (now - self.last >= self.interval or self.done == self.total):
            self.last = now
            extra = ''.join(f', {k} {v}' for k, v in values.items())
            self.logger.info(f"{self.desc}: {self.done}/{self.total} batches ({100 * self.done / max(self.total, 1):.0f}%), "
                             f"{now - self.start:.0f} s{extra}")

    def close(self):
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
