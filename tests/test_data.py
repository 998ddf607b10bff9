"""Prompt files, the prompt datamodule, and the digits domain data."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from rdm_lightning.data.digits import (
    DIGIT_PROMPT,
    DigitsDataModule,
    digit_from_prompt,
    digit_prompt,
    digits_split,
)
from rdm_lightning.data.prompts import PromptDataModule, load_prompts

PROMPTS = [f"prompt number {index}" for index in range(10)]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_txt(tmp_path: Path, prompts: list[str], name: str = "prompts.txt") -> str:
    return str(write(tmp_path / name, "\n".join(prompts) + "\n"))


# --- load_prompts -----------------------------------------------------------------------------


def test_txt_strips_whitespace_and_skips_blank_lines(tmp_path):
    path = write(tmp_path / "p.txt", "  a cat  \n\n\t\na dog\n   \n")
    assert load_prompts(path) == ["a cat", "a dog"]


def test_jsonl_reads_the_field_and_skips_blank_lines(tmp_path):
    lines = [json.dumps({"prompt": "a cat", "id": 1}), "", json.dumps({"prompt": " a dog ", "id": 2})]
    path = write(tmp_path / "p.jsonl", "\n".join(lines) + "\n")
    assert load_prompts(path) == ["a cat", "a dog"]


def test_jsonl_custom_field(tmp_path):
    path = write(tmp_path / "p.jsonl", json.dumps({"caption": "a cat", "prompt": "not this"}) + "\n")
    assert load_prompts(path, field="caption") == ["a cat"]


def test_csv_reads_the_column_with_quoted_commas(tmp_path):
    path = write(tmp_path / "p.csv", 'id,text\n1,"a cat, sleeping"\n2,a dog\n')
    assert load_prompts(path, field="text") == ["a cat, sleeping", "a dog"]


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "absent.txt"
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        load_prompts(path)


def test_unknown_suffix_names_it_and_the_accepted_ones(tmp_path):
    path = write(tmp_path / "p.yaml", "a cat\n")
    with pytest.raises(ValueError, match=r"'\.yaml'.*\.txt.*\.jsonl.*\.csv"):
        load_prompts(path)


@pytest.mark.parametrize(("name", "text"), [("e.txt", "\n  \n"), ("e.jsonl", ""), ("e.csv", "prompt\n")])
def test_file_without_prompts_names_the_path(tmp_path, name, text):
    path = write(tmp_path / name, text)
    with pytest.raises(ValueError, match=f"{name}.*no prompts"):
        load_prompts(path)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        (json.dumps({"caption": "a cat"}), "line 2 has no field 'prompt'"),
        (json.dumps(["a cat"]), "line 2 has no field 'prompt'"),
        (json.dumps({"prompt": 123}), "line 2: 'prompt' must be a non-empty string, got 123"),
        (json.dumps({"prompt": "   "}), "line 2: 'prompt' must be a non-empty string"),
        ("{not json", "line 2 is not valid JSON"),
    ],
)
def test_bad_jsonl_line_names_path_line_and_field(tmp_path, bad_line, message):
    path = write(tmp_path / "bad.jsonl", json.dumps({"prompt": "fine"}) + "\n" + bad_line + "\n")
    with pytest.raises(ValueError, match="bad.jsonl") as error:
        load_prompts(path)
    assert message in str(error.value)


def test_csv_without_the_column_names_the_columns_it_has(tmp_path):
    path = write(tmp_path / "p.csv", "id,caption\n1,a cat\n")
    with pytest.raises(ValueError, match=r"no column 'prompt'.*\['id', 'caption'\]"):
        load_prompts(path)


def test_csv_empty_cell_is_an_error_not_skipped(tmp_path):
    path = write(tmp_path / "p.csv", "prompt,id\na cat,1\n,2\n")
    with pytest.raises(ValueError, match="p.csv.*line 3.*'prompt'"):
        load_prompts(path)


# --- PromptDataModule -------------------------------------------------------------------------


def train_order(module: PromptDataModule) -> list[str]:
    return [prompt for batch in module.train_dataloader() for prompt in batch["prompts"]]


def test_prompt_batches_are_dicts_of_strings_with_last_batch_dropped(tmp_path):
    module = PromptDataModule(write_txt(tmp_path, PROMPTS), batch_size=4)
    batches = list(module.train_dataloader())
    assert len(batches) == 2  # 10 prompts // 4
    assert all(set(batch) == {"prompts"} and len(batch["prompts"]) == 4 for batch in batches)
    seen = [prompt for batch in batches for prompt in batch["prompts"]]
    assert len(set(seen)) == 8 and set(seen) <= set(PROMPTS)


def test_same_seed_same_order_other_seed_other_order(tmp_path):
    path = write_txt(tmp_path, PROMPTS)
    first = train_order(PromptDataModule(path, batch_size=1, shuffle_seed=3))
    again = train_order(PromptDataModule(path, batch_size=1, shuffle_seed=3))
    other = train_order(PromptDataModule(path, batch_size=1, shuffle_seed=4))
    assert first == again
    assert first != other
    assert sorted(first) == sorted(other) == sorted(PROMPTS)
    assert first != PROMPTS  # shuffled, not file order


def test_workers_give_the_same_batches(tmp_path):
    path = write_txt(tmp_path, PROMPTS)
    in_process = train_order(PromptDataModule(path, batch_size=2))
    assert train_order(PromptDataModule(path, batch_size=2, num_workers=1)) == in_process


def test_val_loader_reads_val_file_in_order(tmp_path):
    val = ["val a", "val b", "val c"]
    module = PromptDataModule(write_txt(tmp_path, PROMPTS), write_txt(tmp_path, val, "val.txt"), batch_size=2)
    assert [batch["prompts"] for batch in module.val_dataloader()] == [val[:2], val[2:]]


def test_val_loader_defaults_to_first_train_batch(tmp_path):
    module = PromptDataModule(write_txt(tmp_path, PROMPTS), batch_size=3, field="unused for txt")
    assert [batch["prompts"] for batch in module.val_dataloader()] == [PROMPTS[:3]]


def test_jsonl_field_reaches_the_datamodule(tmp_path):
    lines = "\n".join(json.dumps({"text": prompt}) for prompt in PROMPTS)
    module = PromptDataModule(str(write(tmp_path / "p.jsonl", lines)), batch_size=5, field="text")
    assert sorted(train_order(module)) == sorted(PROMPTS)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"batch_size": 0}, "batch_size.*0"), ({"num_workers": -1}, "num_workers.*-1")]
)
def test_prompt_datamodule_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptDataModule(write_txt(tmp_path, PROMPTS), **kwargs)


def test_fewer_prompts_than_a_batch_is_an_error(tmp_path):
    module = PromptDataModule(write_txt(tmp_path, PROMPTS), batch_size=11)
    with pytest.raises(ValueError, match="10 prompts.*batch_size=11"):
        module.setup("fit")


# --- digits prompts ---------------------------------------------------------------------------


@pytest.mark.parametrize("label", range(10))
def test_digit_prompt_round_trip(label):
    assert digit_prompt(label) == DIGIT_PROMPT.format(label=label) == f"a handwritten digit {label}"
    assert digit_from_prompt(digit_prompt(label)) == label


@pytest.mark.parametrize(
    ("prompt", "label"), [("A handwritten SEVEN.", 7), ("digit 3, a three", 3), ("draw a 0 please", 0)]
)
def test_digit_from_free_form_prompts(prompt, label):
    assert digit_from_prompt(prompt) == label


@pytest.mark.parametrize("prompt", ["a handwritten digit", "a handwritten digit 12", "digit 0.5", "digit 3 or 4"])
def test_prompt_naming_no_single_digit_is_an_error(prompt):
    with pytest.raises(ValueError, match="a handwritten digit 7") as error:
        digit_from_prompt(prompt)
    assert repr(prompt) in str(error.value)


@pytest.mark.parametrize("label", [10, -1, 7.0, "7", True])
def test_digit_prompt_rejects_non_digits(label):
    with pytest.raises(ValueError, match=f"0..9, got {label!r}"):
        digit_prompt(label)


def test_digit_prompt_accepts_numpy_and_torch_integers():
    assert digit_prompt(np.int64(4)) == digit_prompt(torch.tensor(4)) == "a handwritten digit 4"


# --- digits split -----------------------------------------------------------------------------


def test_default_split_sizes_shapes_and_range():
    split = digits_split()
    assert split.train_images.shape == (1437, 1, 8, 8) and split.test_images.shape == (360, 1, 8, 8)
    assert split.train_labels.shape == (1437,) and split.test_labels.shape == (360,)
    assert split.train_images.dtype == torch.float32 and split.train_labels.dtype == torch.long
    images = torch.cat([split.train_images, split.test_images])
    assert images.min() == 0.0 and images.max() == 1.0
    assert torch.equal(images * 16, (images * 16).round())  # value / 16


def test_split_is_stratified():
    counts = torch.bincount(digits_split().test_labels, minlength=10)
    assert ((counts - 36).abs() <= 1).all(), counts


def test_split_partitions_the_dataset():
    data = load_digits()
    split = digits_split()

    def rows(pixels: np.ndarray, labels: np.ndarray) -> Counter:
        """Each (image, label) pair as a hashable row, counted so that an image in both halves shows."""
        return Counter(zip(map(bytes, pixels.reshape(len(labels), -1).astype(np.uint8)), labels.tolist()))

    full = rows(data.images, data.target)
    train = rows((split.train_images * 16).numpy(), split.train_labels.numpy())
    test = rows((split.test_images * 16).numpy(), split.test_labels.numpy())
    assert train + test == full  # every image exactly once, so train and test are disjoint


def test_split_depends_on_seed_only():
    assert torch.equal(digits_split(seed=0).test_labels, digits_split(seed=0).test_labels)
    assert not torch.equal(digits_split(seed=0).test_images, digits_split(seed=1).test_images)
    assert len(digits_split(test_fraction=0.5).test_labels) == 899


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match=f"test_fraction.*{fraction}"):
        digits_split(test_fraction=fraction)


# --- DigitsDataModule -------------------------------------------------------------------------


def test_digits_train_batches_match_the_train_split():
    module = DigitsDataModule(batch_size=32)
    loader = module.train_dataloader()
    assert len(loader) == 1437 // 32  # drop_last
    batch = next(iter(loader))
    assert set(batch) == {"images", "labels", "prompts"}
    assert batch["images"].shape == (32, 1, 8, 8) and batch["images"].dtype == torch.float32
    assert batch["labels"].shape == (32,) and batch["labels"].dtype == torch.long
    assert batch["prompts"] == [digit_prompt(label) for label in batch["labels"].tolist()]
    split = digits_split()
    for image, label in zip(batch["images"], batch["labels"]):
        matches = (split.train_images == image).flatten(1).all(dim=1)
        assert matches.any() and (split.train_labels[matches] == label).all()


def test_digits_order_depends_on_shuffle_seed():
    def first_labels(seed: int) -> torch.Tensor:
        return next(iter(DigitsDataModule(batch_size=64, shuffle_seed=seed).train_dataloader()))["labels"]

    assert torch.equal(first_labels(0), first_labels(0))
    assert not torch.equal(first_labels(0), first_labels(1))


def test_digits_split_seed_and_fraction_reach_the_datamodule():
    module = DigitsDataModule(test_fraction=0.5, split_seed=1)
    module.setup("fit")
    assert torch.equal(module.split.train_images, digits_split(0.5, seed=1).train_images)


def test_digits_val_prompts_are_fixed_and_class_balanced():
    batches = list(DigitsDataModule(batch_size=10, val_size=25).val_dataloader())
    assert [len(batch["prompts"]) for batch in batches] == [10, 10, 5]
    labels = torch.cat([batch["labels"] for batch in batches])
    assert labels.tolist() == [index % 10 for index in range(25)]
    assert [p for batch in batches for p in batch["prompts"]] == [digit_prompt(label) for label in labels.tolist()]
    default = torch.cat([batch["labels"] for batch in DigitsDataModule().val_dataloader()])
    assert torch.bincount(default).tolist() == [10] * 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size.*0"),
        ({"num_workers": -2}, "num_workers.*-2"),
        ({"test_fraction": 1.0}, "test_fraction.*1.0"),
        ({"val_size": 0}, "val_size.*0"),
    ],
)
def test_digits_datamodule_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


def test_digits_batch_larger_than_train_split_is_an_error():
    with pytest.raises(ValueError, match="1437 images.*batch_size=2000"):
        DigitsDataModule(batch_size=2000).setup("fit")
