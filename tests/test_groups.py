"""K-repeat group batches: GroupBatchSampler, group_ids/group_noise and the data modules' ``group_size``."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch

from rdm_lightning.data.digits import DigitsDataModule
from rdm_lightning.data.groups import GroupBatchSampler, group_ids, group_noise
from rdm_lightning.data.prompts import PromptDataModule

PROMPTS = [f"prompt number {index}" for index in range(10)]




def epoch_batches(sampler: GroupBatchSampler, epoch: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def assert_whole_groups(batch: list, batch_size: int, group_size: int) -> None:
    """``batch_size // group_size`` distinct values, each ``group_size`` times in a row."""
    assert len(batch) == batch_size
    groups = [batch[start : start + group_size] for start in range(0, batch_size, group_size)]
    assert all(len(set(group)) == 1 for group in groups)
    assert len({group[0] for group in groups}) == batch_size // group_size


# --- GroupBatchSampler ------------------------------------------------------------------------


@pytest.mark.parametrize(("batch_size", "group_size"), [(8, 4), (6, 2), (5, 5), (3, 1)])
def test_batches_are_whole_groups_of_distinct_items(batch_size, group_size):
    sampler = GroupBatchSampler(23, batch_size, group_size, seed=1)
    batches = epoch_batches(sampler)
    assert len(batches) == len(sampler) == 23 // (batch_size // group_size)
    for batch in batches:
        assert_whole_groups(batch, batch_size, group_size)
    items = [item for batch in batches for item in batch[::group_size]]
    assert len(items) == len(set(items))  # no item twice in an epoch


def test_order_depends_on_seed_and_epoch_only():
    def make(seed: int) -> GroupBatchSampler:
        return GroupBatchSampler(40, 8, 4, seed=seed)

    assert epoch_batches(make(3), 2) == epoch_batches(make(3), 2)
    assert epoch_batches(make(3), 2) != epoch_batches(make(3), 3)
    assert epoch_batches(make(3), 2) != epoch_batches(make(4), 2)
    # Epoch e is seed + e, as for EpochShuffleSampler.
    assert epoch_batches(make(3), 1) == epoch_batches(make(4), 0)


def test_lightning_set_epoch_reaches_the_order():
    sampler = GroupBatchSampler(40, 8, 4)
    loader = torch.utils.data.DataLoader(range(40), batch_sampler=sampler)
    expected = epoch_batches(GroupBatchSampler(40, 8, 4), 5)
    _set_sampler_epoch(loader, 5)  # what Lightning's fit loop calls before each epoch
    assert [batch.tolist() for batch in loader] == expected


def test_ranks_get_disjoint_groups_and_equal_batch_counts():
    # 22 items, 2 groups per batch on each of 2 ranks: 5 steps, the last 2 items dropped.
    ranks = [GroupBatchSampler(22, 4, 2, seed=7, num_replicas=2, rank=rank) for rank in range(2)]
    batches = [epoch_batches(sampler, 1) for sampler in ranks]
    assert len(ranks[0]) == len(ranks[1]) == len(batches[0]) == len(batches[1]) == 5
    items = [{item for batch in rank_batches for item in batch} for rank_batches in batches]
    assert items[0].isdisjoint(items[1]) and len(items[0]) == len(items[1]) == 10
    # A step's global batch is what one rank with the whole batch would see.
    single = epoch_batches(GroupBatchSampler(22, 8, 2, seed=7), 1)
    assert [first + second for first, second in zip(*batches)] == single[:5]


def test_defaults_to_one_replica_without_torch_distributed():
    sampler = GroupBatchSampler(10, 4, 2)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)


def test_group_size_not_dividing_the_batch_names_both():
    with pytest.raises(ValueError, match="batch_size=6.*group_size=4"):
        GroupBatchSampler(10, 6, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_items": 3, "batch_size": 4, "group_size": 1}, "3 items.*4 groups"),
        ({"num_items": 5, "batch_size": 4, "group_size": 2, "num_replicas": 3}, "5 items.*3 ranks"),
        ({"num_items": 9, "batch_size": 4, "group_size": 2, "num_replicas": 2, "rank": 2}, "rank=2"),
        ({"num_items": 9, "batch_size": 4, "group_size": 0}, "group_size must be >= 1, got 0"),
        ({"num_items": 9, "batch_size": 0, "group_size": 1}, "batch_size must be >= 1, got 0"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GroupBatchSampler(**kwargs)


# --- group_ids, group_noise -------------------------------------------------------------------


def test_group_ids():
    assert group_ids(6, 3).tolist() == [0, 0, 0, 1, 1, 1]
    assert group_ids(6, 3).dtype == torch.long
    with pytest.raises(ValueError, match="batch_size=6.*group_size=4"):
        group_ids(6, 4)


def test_shared_noise_is_identical_within_a_group_and_distinct_across():
    noise = group_noise(3, 4, (2, 5), torch.Generator().manual_seed(0), shared=True)
    assert noise.shape == (12, 2, 5) and noise.dtype == torch.float32
    groups = noise.view(3, 4, 2, 5)
    assert torch.equal(groups, groups[:, :1].expand_as(groups))
    firsts = groups[:, 0].flatten(1)
    assert torch.cdist(firsts, firsts).add(torch.eye(3)).min() > 0


def test_unshared_noise_is_distinct_everywhere_and_reproducible():
    noise = group_noise(3, 4, (6,), torch.Generator().manual_seed(0), shared=False)
    assert noise.shape == (12, 6)
    assert torch.cdist(noise, noise).add(torch.eye(12)).min() > 0
    assert torch.equal(noise, group_noise(3, 4, (6,), torch.Generator().manual_seed(0), shared=False))


# --- data modules -----------------------------------------------------------------------------


def write_prompts(tmp_path: Path) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return str(path)


def test_prompt_datamodule_groups_prompts(tmp_path):
    module = PromptDataModule(write_prompts(tmp_path), batch_size=6, group_size=3)
    batches = [batch["prompts"] for batch in module.train_dataloader()]
    assert len(batches) == 5  # 10 prompts // 2 per batch
    for batch in batches:
        assert_whole_groups(batch, 6, 3)
    assert sorted(prompt for batch in batches for prompt in batch[::3]) == sorted(PROMPTS)


def test_prompt_datamodule_needs_only_a_batch_of_groups(tmp_path):
    # 10 prompts fill a batch of 16 as 2 groups of 8, but not a batch of 11 single prompts.
    assert len(PromptDataModule(write_prompts(tmp_path), batch_size=16, group_size=8).train_dataloader()) == 5
    with pytest.raises(ValueError, match="10 prompts.*batch_size=11"):
        PromptDataModule(write_prompts(tmp_path), batch_size=11).setup("fit")


def test_digits_datamodule_groups_images():
    batch = next(iter(DigitsDataModule(batch_size=8, group_size=4).train_dataloader()))
    assert_whole_groups(batch["labels"].tolist()[:4], 4, 4)
    assert torch.equal(batch["images"][:4], batch["images"][:1].expand(4, -1, -1, -1))
    assert batch["prompts"][:4] == batch["prompts"][:1] * 4
    assert not torch.equal(batch["images"][0], batch["images"][4])


@pytest.mark.parametrize("module_class", [PromptDataModule, DigitsDataModule])
def test_datamodules_reject_a_group_size_not_dividing_the_batch(tmp_path, module_class):
    args = (write_prompts(tmp_path),) if module_class is PromptDataModule else ()
    with pytest.raises(ValueError, match="batch_size=6.*group_size=4"):
        module_class(*args, batch_size=6, group_size=4)


def make_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )


class RecordBatches(L.LightningModule):
    """A one-parameter module that records the prompts of every training batch, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[int, list[list[str]]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).append(batch["prompts"])
        return self.weight**2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:You passed in a `val_dataloader` but have no `validation_step`",
    "ignore:.*LeafSpec",
)
def test_fit_keeps_the_group_batches_and_reshuffles_each_epoch(tmp_path):
    model = RecordBatches()
    module = PromptDataModule(write_prompts(tmp_path), batch_size=4, group_size=2, shuffle_seed=3)
    make_trainer(max_epochs=2, limit_val_batches=0).fit(model, module)
    expected = PromptDataModule(write_prompts(tmp_path), batch_size=4, group_size=2, shuffle_seed=3)
    sampler = expected.train_dataloader().batch_sampler
    for epoch in range(2):
        sampler.set_epoch(epoch)
        assert model.seen[epoch] == [[PROMPTS[index] for index in batch] for batch in sampler]
    assert model.seen[0] != model.seen[1]


def test_multi_process_trainer_needs_use_distributed_sampler_off(tmp_path):
    module = PromptDataModule(write_prompts(tmp_path), batch_size=4, group_size=2)
    module.trainer = make_trainer(devices=2, strategy="ddp_notebook")
    with pytest.raises(ValueError, match="group_size=2.*use_distributed_sampler: false"):
        module.train_dataloader()
    module.trainer = make_trainer(devices=2, strategy="ddp_notebook", use_distributed_sampler=False)
    sampler = module.train_dataloader().batch_sampler
    assert (sampler.num_replicas, sampler.rank, len(sampler)) == (2, 0, 2)
