"""Resuming the reward model, DPO and PPO from a Trainer checkpoint, and refusing another run's.

`resume_from_checkpoint` (TrainingArguments) is a checkpoint folder, or `true` / `last`: the newest
complete `checkpoint-N` in output_dir (a half-written one a kill left behind is removed first, as
SFT does). Every checkpoint these scripts write carries a `RunIdentity` in its trainer_state.json
(transformers' stateful-callback record): the stage and the base model. Resuming from a checkpoint
of another stage or base, or from one with no identity, is refused with a one-line error: loading
a DPO adapter into a reward model's optimizer state would fail deep inside the Trainer, or worse,
train on.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from clinalign.errors import ClinalignError
from clinalign.sft import last_complete_checkpoint

LAST = {"true", "last"}


class RunIdentity(TrainerCallback, ExportableState):
    """Stores which stage and base model wrote a checkpoint (in trainer_state.json's stateful_callbacks)."""

    def __init__(self, stage: str, base_model: str):
        self.stage, self.base_model = stage, base_model

    def state(self) -> dict:
        return {"args": {"stage": self.stage, "base_model": self.base_model}, "attributes": {}}


def _check_identity(checkpoint: Path, stage: str, base_model: str) -> None:
    try:
        saved = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        raise ClinalignError(f"resume_from_checkpoint: {checkpoint} has no readable trainer_state.json") from None
    identity = (saved.get("stateful_callbacks") or {}).get(RunIdentity.__name__)
    if isinstance(identity, list):
        identity = identity[-1]
    args = (identity or {}).get("args", {})
    if not args:
        raise ClinalignError(f"resume_from_checkpoint: {checkpoint} was not written by a clinalign {stage} run")
    if args.get("stage") != stage or args.get("base_model") != base_model:
        raise ClinalignError(
            f"resume_from_checkpoint: {checkpoint} is from a {args.get('stage')} run on "
            f"'{args.get('base_model')}', not this {stage} run on '{base_model}'"
        )


def resume_checkpoint(training_args, stage: str, base_model: str) -> str | None:
    """The checkpoint to resume from (None: a fresh start), checked against this run; the same on every process."""
    wanted = training_args.resume_from_checkpoint
    if wanted is None or str(wanted).lower() in {"false", "none", ""}:
        return None
    found, error = None, None
    if PartialState().is_main_process:
        try:
            if str(wanted).lower() in LAST:
                found = last_complete_checkpoint(Path(training_args.output_dir))
                if found is None:
                    raise ClinalignError(
                        f"resume_from_checkpoint: {wanted} but output_dir {training_args.output_dir} "
                        "holds no complete checkpoint"
                    )
            elif not Path(wanted).is_dir():
                raise ClinalignError(f"resume_from_checkpoint: no checkpoint folder {wanted}")
            else:
                found = str(wanted)
            _check_identity(Path(found), stage, base_model)
        except ClinalignError as exc:
            error = str(exc)
    found, error = broadcast_object_list([found, error])
    if error:
        raise ClinalignError(error)
    return found
