"""PromptLoader: deterministic epochs, resume gives the exact next batch."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from megatron_opd.data import DataConfig, DataError, PromptDataset, PromptLoader, load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def ds(char_tokenizer_dir: Path) -> PromptDataset:
    files = [str(FIXTURES / "math.parquet"), str(FIXTURES / "code.parquet")]  # 12 prompts
    return PromptDataset(files, load_tokenizer(char_tokenizer_dir), DataConfig(max_prompt_length=512))


def indices(batch) -> list[int]:
    return [s.index for s in batch]


def test_epochs_cover_the_data_in_seeded_order(ds: PromptDataset) -> None:
    loader = PromptLoader(ds, batch_size=5, seed=3)
    assert len(loader) == 2  # 12 // 5, the last 2 prompts of each epoch are dropped
    epoch0 = [indices(b) for b in loader]
    epoch1 = [indices(b) for b in loader]
    expected0 = np.random.default_rng([3, 0]).permutation(12)[:10].tolist()
    assert list(itertools.chain(*epoch0)) == expected0
    assert list(itertools.chain(*epoch1)) == np.random.default_rng([3, 1]).permutation(12)[:10].tolist()
    assert epoch0 != epoch1
    assert all(len(b) == 5 for b in epoch0 + epoch1)
    again = PromptLoader(ds, batch_size=5, seed=3)
    assert [indices(again.next_batch()) for _ in range(4)] == epoch0 + epoch1  # next_batch crosses epochs


def test_no_shuffle_and_keep_last(ds: PromptDataset) -> None:
    loader = PromptLoader(ds, batch_size=5, seed=0, shuffle=False, drop_last=False)
    assert [indices(b) for b in loader] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]


@pytest.mark.parametrize("taken", [0, 1, 2, 3, 5])
def test_resume_gives_the_same_next_batches(ds: PromptDataset, taken: int) -> None:
    run = PromptLoader(ds, batch_size=4, seed=7)
    for _ in range(taken):
        run.next_batch()
    state = run.state_dict()
    expected = [indices(run.next_batch()) for _ in range(4)]
    resumed = PromptLoader(ds, batch_size=4, seed=7)
    resumed.load_state_dict(dict(state))
    assert [indices(resumed.next_batch()) for _ in range(4)] == expected
    # 3 batches per epoch; an epoch rolls over when the next batch is taken
    assert (state["epoch"], state["position"]) == ((0, 0) if taken == 0 else ((taken - 1) // 3, (taken - 1) % 3 + 1))


def test_resume_with_other_settings_is_an_error(ds: PromptDataset) -> None:
    state = PromptLoader(ds, batch_size=4, seed=7).state_dict()
    with pytest.raises(DataError, match="seed was 7 when saved, now 8"):
        PromptLoader(ds, batch_size=4, seed=8).load_state_dict(state)
    with pytest.raises(DataError, match="batch_size was 4 when saved, now 3"):
        PromptLoader(ds, batch_size=3, seed=7).load_state_dict(state)


def test_batch_larger_than_the_data(ds: PromptDataset) -> None:
    with pytest.raises(DataError, match="batch_size=13 is larger than the dataset"):
        PromptLoader(ds, batch_size=13, seed=0)
