"""clinalign's own measurements into the trainer's log, so every `report_to` tracker shows them.

The Trainer's log reaches the log history (metrics.json) and every tracker callback (TensorBoard,
W&B, ...) at the current global step, beside the loss. Held-out measurements are logged under the
`eval_` prefix, which the trackers file under "eval/" (TensorBoard: eval/<stage>/<measurement>).
"""

from __future__ import annotations

# Per-item values (evaluate_policy's "items": one number per held-out record) stay in metrics.json: a
# tracker gets the aggregates, not hundreds of series.
UNLOGGED = frozenset({"items"})


def flat_measurements(measurements: dict, prefix: str) -> dict[str, float]:
    """The numeric leaves of a nested dict as {"eval_<prefix>/<key>/<key>": value} (text, lists and UNLOGGED keys are left out)."""
    flat: dict[str, float] = {}

    def walk(value, path: str) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                if key not in UNLOGGED:
                    walk(inner, f"{path}/{key}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[path] = float(value)

    walk(measurements, f"eval_{prefix}")
    return flat


def log_measurements(trainer, measurements: dict, prefix: str) -> dict[str, float]:
    """Logs the numeric leaves of `measurements` through `trainer.log`; returns what was logged."""
    flat = flat_measurements(measurements, prefix)
    if flat:
        trainer.log(dict(flat))
    return flat


def open_trackers(trainer) -> None:
    """Starts the trainer's tracker callbacks for a run that skips `Trainer.train` (a restored finished
    checkpoint). Trackers pick their folder or run in on_train_begin; without it TensorBoard's writer
    falls back to ./runs/<date>_<host> in the working directory, outside the run's output folder."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    trackers = tuple(INTEGRATION_TO_CALLBACK.values())
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, trackers):
            callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)
