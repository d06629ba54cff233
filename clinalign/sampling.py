"""Length-grouped batches for the small datasets of this toolkit's stages.

Padding is wasted compute: on 2 CPU cores a batch padded to its longest example costs what a full
batch of that length costs. transformers' `train_sampling_strategy: group_by_length` sorts examples
by length within random buckets, but (a) for fewer than 8 x batch examples its buckets hold a single
batch, so nothing is grouped, and (b) it reads an `input_ids` column, which preference datasets
(chosen / rejected) do not have. `BucketedLengthSampler` fixes (a); `PairLengthGrouping` (b).
At inference, where order does not matter, `length_sorted_batches` sorts everything by length.
"""

from __future__ import annotations

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from clinalign.errors import ClinalignError


def length_sorted_batches(sequences: list, batch_size: int) -> list[list[int]]:
    """Indices of `sequences` in batches of similar length, longest first (little padding); the caller
    restores the order."""
    if batch_size < 1:
        raise ClinalignError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class BucketedLengthSampler(LengthGroupedSampler):
    """transformers' length-grouped sampler, with buckets of at least `MIN_BUCKET_BATCHES` batches.

    transformers sorts by length within random "megabatches" of min(n / (4 x batch), 50) batches, so a
    stage of fewer than 8 x batch examples (the demo's ~48) gets megabatches of one batch: no grouping
    at all, and batches padded to their longest of 8 random examples. Buckets of 4 batches pad less
    (tests check it against transformers' sampler; benchmarks/sft_throughput.py reports the padding
    share). Which examples share a bucket stays random.
    """

    MIN_BUCKET_BATCHES = 4

    def __iter__(self):
        batches = max(self.MIN_BUCKET_BATCHES, min(len(self.lengths) // (4 * self.batch_size), 50))
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, batches, generator=self.generator))


def pair_lengths(dataset) -> list[int]:
    """Padded length of each tokenized preference pair: its prompt plus the longer of its two sides.

    TRL's collators pad the chosen and rejected halves of a batch to one length (the RewardTrainer's
    `chosen_ids` include the prompt; the DPOTrainer's come after a separate `prompt_ids`).
    """
    prompts = dataset["prompt_ids"] if "prompt_ids" in dataset.column_names else [[]] * len(dataset)
    return [
        len(p) + max(len(c), len(r))
        for p, c, r in zip(prompts, dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
    ]


class PairLengthGrouping:
    """Mixin for TRL's preference trainers: `train_sampling_strategy: group_by_length` groups pairs by length.

    Small preference sets otherwise pad every batch to its longest random pair (tests/test_reward.py
    checks the grouped batches pad less).
    """

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or dataset is None:
            return super()._get_train_sampler(train_dataset)
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return BucketedLengthSampler(batch, lengths=pair_lengths(dataset))

    def _get_eval_sampler(self, eval_dataset):
        # transformers groups eval batches too under this strategy, in a seeded order; so do we
        if self.args.train_sampling_strategy != "group_by_length" or eval_dataset is None:
            return super()._get_eval_sampler(eval_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        generator = torch.Generator().manual_seed(seed)
        return BucketedLengthSampler(self.args.eval_batch_size, lengths=pair_lengths(eval_dataset), generator=generator)
