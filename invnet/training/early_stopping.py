"""Early stopping on the validation loss: the best loss seen, at which step, and how long ago.

A flow trained by maximum likelihood on a fixed set of pairs keeps lowering its training loss long
after it stopped generalising: it memorises the pairs, and its posteriors come out too narrow.
The validation loss (the same loss on held-out pairs) turns up when that starts; the weights at
its minimum are the ones to keep, and training past it only costs time. This is how neural
posterior estimation reaches its published accuracy ("Benchmarking simulation-based inference",
Lueckmann et al., AISTATS 2021, arXiv:2101.04653: stop after 20 epochs without a better
validation loss, keep the best weights).
"""
from __future__ import annotations

import math
from typing import Optional

__all__ = ["EarlyStopping"]


class EarlyStopping:
    r"""Track the best validation loss and count the validations since it improved.

    A validation at step :math:`s` with loss :math:`v` improves when
    :math:`v < v_\mathrm{best} - \delta` (``min_delta``, in the loss's units; the first finite
    value always improves; a NaN or infinite loss never does). Training should stop once
    ``patience`` validations in a row did not improve (``patience=None``: never; the best is still
    tracked). The state is a few numbers (:meth:`state_dict`), stored in every checkpoint, so a
    resumed run stops at the same step as one never interrupted.

    Args:
        patience: validations without improvement before stopping (``None``: never stop).
        min_delta: how much lower than the best a loss must be to count as better (>= 0).

    >>> stop = EarlyStopping(patience=2)
    >>> [stop.update(step, v) for step, v in [(10, 3.0), (20, 2.0), (30, 2.5), (40, 2.1)]]
    [True, True, False, False]
    >>> stop.should_stop, stop.best_step, stop.best_loss
    (True, 20, 2.0)
    """

    def __init__(self, patience: Optional[int] = None, min_delta: float = 0.0) -> None:
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise ValueError(f"patience must be a positive integer (validations) or None, got {patience!r}")
        if not (isinstance(min_delta, (int, float)) and math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        self.patience, self.min_delta = patience, float(min_delta)
        self.best_loss: Optional[float] = None
        self.best_step: Optional[int] = None
        self.bad = 0  # validations since the best one

    def update(self, step: int, loss: Optional[float]) -> bool:
        """Record the validation loss at ``step``; returns whether it is the new best."""
        if loss is not None and math.isfinite(loss) and (self.best_loss is None
                                                         or loss < self.best_loss - self.min_delta):
            self.best_loss, self.best_step, self.bad = float(loss), int(step), 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        """Whether ``patience`` validations in a row brought no better loss."""
        return self.patience is not None and self.bad >= self.patience

    def message(self, step: int) -> str:
        """The line that says why training stopped at ``step``."""
        best = "none finite" if self.best_loss is None else f"best {self.best_loss:.6g} at step {self.best_step}"
        return (f"stopped early at step {step}: no better validation loss for {self.bad} validations "
                f"({best})")

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (``patience`` and ``min_delta`` stay this object's: a resumed
        run may be given more patience)."""
        self.best_loss = None if state.get("best_loss") is None else float(state["best_loss"])
        self.best_step = None if state.get("best_step") is None else int(state["best_step"])
        self.bad = int(state.get("bad", 0))
