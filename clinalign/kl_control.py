"""Adaptive KL coefficient for online RL (Ziegler et al. 2019, "Fine-Tuning Language Models from
Human Preferences", section 2.2), as a small trainer callback.

The coefficient beta of the KL penalty is nudged after every generated batch so the measured KL
per sequence tracks a target:

    error = clip(KL / target - 1, -0.2, 0.2)
    beta <- beta * (1 + error * n / horizon)

where n is the number of sequences in the batch. KL above target raises beta (pull the policy back
toward the reference); below target lowers it. With the controller off, beta stays fixed.
"""

from __future__ import annotations

import dataclasses

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from clinalign.compat import trl_metrics


@dataclasses.dataclass
class AdaptiveKLController:
    coef: float  # the current beta
    target: float  # target KL per sequence, in nats
    horizon: float  # sequences over which a full +-20% correction accrues

    def update(self, measured_kl: float, n_sequences: int) -> float:
        error = min(max(measured_kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_sequences / self.horizon
        return self.coef


class KLControlCallback(TrainerCallback, ExportableState):
    """Feeds each generated batch's KL to the controller and sets the trainer's `beta` for the next one.

    TRL's RLOO trainer appends, per generated batch, `kl` (the mean per-token log-ratio of the sampled
    completions) and `completions/mean_length` to its metric buffer, and averages that buffer over
    the logging window when it logs. Acting on the logged average would move beta once per window,
    `logging_steps` times slower than `horizon` says; so the controller reads the buffer at every
    step end (before the Trainer logs) and updates once per new batch. KL per token times mean length
    is the mean KL per sequence, the quantity the target is stated in. Each batch also adds
    `kl_per_sequence` and `kl_coef` (the beta its rewards were penalised with) to that buffer, so they
    are averaged and reach the log history and every tracker beside TRL's own metrics.

    The coefficient (and the update history) is saved in every checkpoint's trainer_state.json as a
    stateful callback and restored when training resumes, so a resumed run continues with the beta
    it had reached, not the configured start value.
    """

    def __init__(self, trainer, controller: AdaptiveKLController | None, sequences_per_batch: int):
        self.trainer, self.controller, self.sequences_per_batch = trainer, controller, sequences_per_batch
        self.history: list[dict] = []
        self._seen = 0  # entries of the current logging window already fed to the controller

    def state(self) -> dict:
        return {"args": {}, "attributes": {"kl_coef": self.trainer.beta, "history": self.history}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[-1]
        attributes = (saved or {}).get("attributes", {})
        if "kl_coef" in attributes:  # a resumed run: the checkpoint's beta (a fresh run: the start value)
            self.trainer.beta = attributes["kl_coef"]
            if self.controller is not None:
                self.controller.coef = attributes["kl_coef"]
            self.history = list(attributes.get("history", []))

    def on_step_end(self, args, state, control, **kwargs):
        metrics = trl_metrics(self.trainer)
        batches = list(zip(metrics.get("kl", []), metrics.get("completions/mean_length", [])))
        for kl, mean_length in batches[self._seen :]:
            measured, used = kl * mean_length, self.trainer.beta
            if self.controller is not None:
                self.trainer.beta = self.controller.update(measured, self.sequences_per_batch)
            self.history.append({"step": state.global_step, "kl_per_sequence": measured, "kl_coef": used,
                                 "next_kl_coef": self.trainer.beta})
            metrics["kl_per_sequence"].append(measured)
            metrics["kl_coef"].append(used)
        self._seen = len(batches)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # TRL clears the buffer of the mode it logs right after this call (train while the model trains).
        if self.trainer.model.training:
            self._seen = 0
