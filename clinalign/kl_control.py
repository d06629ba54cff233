"""Adaptive KL coefficient for online RL (Ziegler et al. 2019, "Fine-Tuning Language Models from
Human Preferences", section 2.2), as a small trainer callback.

The coefficient beta of the KL penalty is nudged after every logged step so the measured KL per
sequence tracks a target:

    error = clip(KL / target - 1, -0.2, 0.2)
    beta <- beta * (1 + error * n / horizon)

where n is the number of sequences the step used. KL above target raises beta (pull the policy back
toward the reference); below target lowers it. With the controller off, beta stays fixed.
"""

from __future__ import annotations

import dataclasses

from transformers import TrainerCallback


@dataclasses.dataclass
class AdaptiveKLController:
    coef: float  # the current beta
    target: float  # target KL per sequence, in nats
    horizon: float  # sequences over which a full +-20% correction accrues

    def update(self, measured_kl: float, n_sequences: int) -> float:
        error = min(max(measured_kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_sequences / self.horizon
        return self.coef


class KLControlCallback(TrainerCallback):
    """Feeds the trainer's logged KL to the controller and sets the trainer's `beta` for the next step.

    TRL's RLOO trainer logs `kl` as the mean per-token log-ratio of the sampled completions and
    `completions/mean_length`; their product is the mean KL per sequence, the quantity the target
    is stated in. Each log entry gains `kl_coef` (the beta used for that step) and `kl_per_sequence`.
    """

    def __init__(self, trainer, controller: AdaptiveKLController | None, sequences_per_step: int):
        self.trainer, self.controller, self.sequences_per_step = trainer, controller, sequences_per_step
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "kl" not in logs or logs.get("completions/mean_length") is None:
            return
        measured = logs["kl"] * logs["completions/mean_length"]
        used = self.trainer.beta
        if self.controller is not None:
            self.trainer.beta = self.controller.update(measured, self.sequences_per_step)
        entry = {"step": state.global_step, "kl_per_sequence": measured, "kl_coef": used}
        self.history.append(entry)
        state.log_history[-1].update(entry)  # the Trainer appended a copy of `logs` just before this call
