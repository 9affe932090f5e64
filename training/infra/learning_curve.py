"""Held-out learning curves during training: evaluate every N steps, stop once the curve has flattened, plot it.

Convergence rule (`converged`): at least `min_points` evaluations, and every evaluation in the last quarter of the
run's steps lies within ±`band` points of their mean; with `require_itm_gain`, ITM re-ranking must also score above
ITC alone at the last evaluation (an ITM head that has not learned lowers r_mean when it re-ranks).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

from transformers import TrainerCallback

ITM_PRIOR = 0.6365  # entropy of the ITM labels (1 positive : 2 negatives): a head that has learned nothing
CURVE_FILE = "learning_curve.json"
CURVE_PLOT = "learning_curve.png"

logger = logging.getLogger(__name__)


def converged(curve: list[dict], metric: str, band: float = 1.5, min_points: int = 8,
              require_itm_gain: bool = False) -> bool:
    """Whether the last quarter of `curve` ({"step", metric, ...} entries) stays within ±band of its mean."""
    if len(curve) < min_points:
        return False
    last_step = curve[-1]["step"]
    tail = [point[metric] for point in curve if point["step"] >= 0.75 * last_step]
    mean = sum(tail) / len(tail)
    flat = len(tail) >= 2 and max(tail) - mean <= band and mean - min(tail) <= band
    if require_itm_gain and f"{metric}_itc" in curve[-1]:
        flat = flat and curve[-1][metric] > curve[-1][f"{metric}_itc"]
    return flat


class HeldOutCurveCallback(TrainerCallback):
    """Evaluates the trained model on a held-out set every `every` optimizer steps (and at the end).

    Args:
        evaluate: fn(model) -> metrics dict (the task's evaluation on its held-out set).
        metric: the metric the curve (and the stopping rule) follows.
        every: evaluation interval in optimizer steps.
        stop_when_converged: stop training once `converged(...)` holds.
        band / min_points / require_itm_gain: the rule's parameters (see `converged`).
    """

    def __init__(self, evaluate: Callable, metric: str, every: int, stop_when_converged: bool = False,
                 band: float = 1.5, min_points: int = 8, require_itm_gain: bool = False):
        if every < 1:
            raise ValueError(f"evaluation interval must be >= 1 step, got {every}")
        self.evaluate, self.metric, self.every = evaluate, metric, every
        self.stop, self.band, self.min_points, self.require_itm_gain = (
            stop_when_converged, band, min_points, require_itm_gain)
        self.curve: list[dict] = []
        self.train_log: list[dict] = []  # the training loss terms at every logging step (e.g. when ITM leaves its prior)
        self.converged_at: int | None = None

    def _point(self, state, model) -> None:
        student = getattr(model, "student", model)
        was_training = student.training
        student.eval()
        try:
            metrics = self.evaluate(student)
        finally:
            student.train(was_training)
        # every number the evaluation gives (e.g. VQA's per-template accuracies), the curve's metric among them
        point = {"step": state.global_step, **{k: round(float(v), 4) for k, v in metrics.items()
                                               if isinstance(v, (int, float)) and not isinstance(v, bool)}}
        self.curve.append(point)
        logger.info("held-out %s at step %d: %s", self.metric, state.global_step, point)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:
            return
        self._point(state, model)
        if self.stop and converged(self.curve, self.metric, self.band, self.min_points, self.require_itm_gain):
            self.converged_at = state.global_step
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        terms = {k: float(v) for k, v in (logs or {}).items() if k == "loss" or k.startswith("loss_")}
        if terms:
            self.train_log.append({"step": state.global_step, **terms})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.curve or self.curve[-1]["step"] != state.global_step:
            self._point(state, model)

    def _itm_gain_applies(self) -> bool:
        """Whether the ITM condition is part of the rule: asked for, and the evaluation reports an ITC-only value
        (`converged` checks it only then)."""
        return self.require_itm_gain and bool(self.curve) and f"{self.metric}_itc" in self.curve[-1]

    def summary(self) -> dict:
        """The curve, the rule and whether (and where) it held."""
        return {
            "metric": self.metric, "every": self.every, "curve": self.curve, "train_log": self.train_log,
            "rule": f"last quarter of the steps within ±{self.band} of its mean, at least {self.min_points} points"
                    + (", ITM re-ranking above ITC alone" if self._itm_gain_applies() else ""),
            "converged": converged(self.curve, self.metric, self.band, self.min_points, self.require_itm_gain),
            "converged_at_step": self.converged_at,
        }


def write_curve(summary: dict, output_dir: str) -> None:
    """Writes learning_curve.json and learning_curve.png (metric and, when present, its ITC-only value by step)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, CURVE_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, curve = summary["metric"], summary["curve"]
    train_log = [entry for entry in summary.get("train_log", []) if "loss_itm" in entry]
    fig, axes = plt.subplots(1, 2 if train_log else 1, figsize=(11 if train_log else 6, 3.5), squeeze=False)
    ax = axes[0][0]
    steps = [p["step"] for p in curve]
    with_itc = bool(curve) and f"{metric}_itc" in curve[0]  # retrieval: the metric re-ranked by ITM, and ITC alone
    ax.plot(steps, [p[metric] for p in curve], marker="o", label=f"{metric} (ITM re-ranked)" if with_itc else metric)
    if with_itc:
        ax.plot(steps, [p[f"{metric}_itc"] for p in curve], marker=".", linestyle="--", label=f"{metric} (ITC only)")
    if summary.get("converged_at_step"):
        ax.axvline(summary["converged_at_step"], color="grey", linestyle=":", label="converged (rule)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"held-out {metric}")
    ax.set_title("Held-out learning curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if train_log:  # the ITM loss against its prior: when does the matching head start to learn?
        loss_ax = axes[0][1]
        loss_ax.plot([e["step"] for e in train_log], [e["loss_itm"] for e in train_log], label="ITM loss (train)")
        loss_ax.axhline(ITM_PRIOR, color="grey", linestyle=":", label=f"prior {ITM_PRIOR:.4f} (1 : 2 labels)")
        loss_ax.set_xlabel("optimizer step")
        loss_ax.set_ylabel("loss")
        loss_ax.set_title("ITM loss")
        loss_ax.grid(alpha=0.3)
        loss_ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, CURVE_PLOT), dpi=100)
    plt.close(fig)
