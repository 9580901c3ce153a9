"""Batches of prompts with deterministic epoch shuffling and a resumable position.

Epoch ``e`` visits the dataset in the order ``numpy.random.default_rng([seed, e]).permutation(n)``
(or in file order without shuffling), in batches of ``batch_size``. ``state_dict()`` is
``(epoch, position)`` (batches already taken in that epoch), so a run resumed from it gets exactly
the batch it would have got next.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from megatron_opd.data.dataset import DataError, PromptDataset, PromptSample


class PromptLoader:
    """``next_batch()`` steps through epochs forever; ``for batch in loader`` runs the rest of one epoch."""

    def __init__(
        self, dataset: PromptDataset, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True
    ) -> None:
        if batch_size <= 0:
            raise DataError(f"batch_size={batch_size} must be > 0. Fix: set data.train_batch_size >= 1.")
        if drop_last and batch_size > len(dataset):
            raise DataError(
                f"batch_size={batch_size} is larger than the dataset ({len(dataset)} prompts), so no full batch "
                "exists. Fix: lower data.train_batch_size or add data."
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch = 0
        self.position = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        """Dataset indices in the order epoch ``epoch`` visits them."""
        if self._order_epoch != epoch:
            n = len(self.dataset)
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def next_batch(self) -> list[PromptSample]:
        """The next batch, moving to the next epoch when this one is used up."""
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        idx = self.order(self.epoch)[self.position * self.batch_size : (self.position + 1) * self.batch_size]
        self.position += 1
        return [self.dataset[int(i)] for i in idx]

    def __iter__(self) -> Iterator[list[PromptSample]]:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        epoch = self.epoch
        while self.epoch == epoch and self.position < len(self):
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "num_samples": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the data, batch size, seed and shuffling must be those it was saved with."""
        for key, mine in (
            ("num_samples", len(self.dataset)),
            ("batch_size", self.batch_size),
            ("seed", self.seed),
            ("shuffle", self.shuffle),
        ):
            if state.get(key) != mine:
                raise DataError(
                    f"cannot resume the prompt loader: {key} was {state.get(key)!r} when saved, now {mine!r}; "
                    "the resumed run would see different batches. Fix: resume with the saved run's data config."
                )
        if not 0 <= int(state["position"]) <= len(self):
            raise DataError(f"cannot resume the prompt loader: position {state['position']} is outside the epoch.")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
