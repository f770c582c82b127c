"""Watching heads trained by epochs (tail, mlp, linear with AdamW): eval scores per epoch,
history, patience and the progress callback."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import BaseHead


@dataclass(frozen=True)
class TrainingMonitor:
    """What a head trained by epochs reports to and is scored on, set by :func:`training_monitor`.

    ``y_eval_idx`` holds the eval labels as indices into the training classes (``np.unique(y)``),
    ``len(classes)`` for a class the training split lacks (scored as an error).
    """

    X_eval: Any = None
    y_eval_idx: np.ndarray | None = None
    select_by: str = "top1"
    callback: Callable[[dict], None] | None = None


_MONITOR: contextvars.ContextVar[TrainingMonitor | None] = contextvars.ContextVar("featcache_monitor", default=None)


@contextlib.contextmanager
def training_monitor(*, X_eval: Any = None, y_eval: Any = None, classes: Any = None, select_by: str = "top1",
                     callback: Callable[[dict], None] | None = None) -> Iterator[TrainingMonitor]:
    """Within the block, heads trained by epochs score ``X_eval`` after every epoch, keep the
    history (``history_``), stop early by their ``patience`` option, and call ``callback``.

    Parameters
    ----------
    X_eval : array-like of shape (n_eval, n_features), optional
        Eval features as the head sees them (transformed).
    y_eval : array-like of shape (n_eval,), optional
        Their labels, in the label space of the training ``y``.
    classes : array-like, optional
        The training labels' classes (``np.unique(y_train)``), to index ``y_eval``.
    select_by : str
        The metric scored (:data:`featcache.metrics.scores.SELECT_BY`).
    callback : callable, optional
        Called with ``{"epoch", "epochs", "loss", "score"}`` after every epoch (loss: mean
        training loss over the grid points; score: best eval score over them, None without eval
        data). Printing belongs to the caller (the CLI's progress bar).
    """
    y_idx = None
    if X_eval is not None:
        classes = np.asarray(classes)
        y_eval = np.asarray(y_eval)
        pos = np.clip(np.searchsorted(classes, y_eval), 0, len(classes) - 1)
        y_idx = np.where(classes[pos] == y_eval, pos, len(classes)).astype(np.int64)
    token = _MONITOR.set(TrainingMonitor(X_eval, y_idx, select_by, callback))
    try:
        yield _MONITOR.get()
    finally:
        _MONITOR.reset(token)


class EpochTracker:
    """Per-epoch bookkeeping of G grid points trained together: history, best epoch, patience.

    A head calls :meth:`end_epoch` after each epoch with the mean training loss per grid point
    and a function giving the eval probabilities per grid point; it stops when that returns
    True, and :meth:`restore` hands back, per grid point, the state saved at its best epoch.
    """

    def __init__(self, G: int, epochs: int, patience: int | None) -> None:
        self.monitor = _MONITOR.get() or TrainingMonitor()
        self.watching = self.monitor.X_eval is not None
        if patience is not None and not self.watching:
            raise ConfigError(
                f"The 'patience' option ({patience}) stops on an eval score, and there is no eval data. "
                "Fit with an eval split (eval_split=val), or drop the 'patience' option."
            )
        self.G, self.epochs, self.patience = G, epochs, patience
        self.history: list[list[dict]] = [[] for _ in range(G)]
        self.best_score = [-np.inf] * G
        self.best_epoch = [0] * G
        self.best_state: list[Any] = [None] * G

    def end_epoch(self, epoch: int, losses: Sequence[float], proba: Callable[[], Sequence[np.ndarray]],
                  snapshot: Callable[[int], Any]) -> bool:
        """Record epoch ``epoch`` (0-based); True when every grid point ran out of patience."""
        from ..metrics.scores import selection_scores

        metric = self.monitor.select_by
        values: list[float | None] = [None] * self.G
        if self.watching:
            for g, p in enumerate(proba()):
                full = np.concatenate([p, np.zeros((len(p), 1))], axis=1)  # a column for unseen classes
                values[g] = selection_scores(self.monitor.y_eval_idx, full, metric)[metric]
        # Higher is better for every metric but the log-loss.
        keys = [None if v is None else (-v if metric == "log_loss" else v) for v in values]
        for g in range(self.G):
            row = {"epoch": epoch + 1, "loss": float(losses[g])}
            if values[g] is not None:
                row[metric] = values[g]
                if self.patience is not None and keys[g] > self.best_score[g]:
                    self.best_score[g], self.best_epoch[g] = keys[g], epoch + 1
                    self.best_state[g] = snapshot(g)
            self.history[g].append(row)
        if self.monitor.callback is not None:
            shown = [g for g in range(self.G) if keys[g] is not None]
            top = max(shown, key=lambda g: keys[g]) if shown else None
            self.monitor.callback({"epoch": epoch + 1, "epochs": self.epochs, "loss": float(np.mean(losses)),
                                   "metric": metric, "score": None if top is None else values[top]})
        if self.patience is None:
            return False
        return all(epoch + 1 - b >= self.patience for b in self.best_epoch)

    def restore(self, g: int) -> Any:
        """The state saved at grid point ``g``'s best epoch (None without patience)."""
        return self.best_state[g]

    def attach(self, head: "BaseHead", g: int) -> None:
        """Give ``head`` grid point ``g``'s ``history_`` and ``best_epoch_``."""
        head.history_ = self.history[g]
        head.best_epoch_ = self.best_epoch[g] if self.patience is not None else len(self.history[g])
