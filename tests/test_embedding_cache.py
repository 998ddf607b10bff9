"""The text-embedding cache on a tiny SD3 with T5: exact embeddings, no text encoders with a full cache,
stale caches detected, the empty prompt encoded once, and ``rdm cache-embeddings``."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from rdm_lightning.backbones.base import Conditioning
from rdm_lightning.backbones.embedding_cache import EmbeddingCache, StaleEmbeddingCache
from rdm_lightning.backbones.sd3 import SD3Backbone
from rdm_lightning.cli import main
from tiny_models import make_tiny_sd3

PROMPTS = ["a photo of a cat", "a red car", "a bowl of soup, studio lighting"]


@pytest.fixture(scope="module")
def sd3_t5(tmp_path_factory) -> Path:
    return make_tiny_sd3(tmp_path_factory.mktemp("tiny") / "sd3_t5", with_t5=True)


@pytest.fixture(scope="module")
def reference(sd3_t5) -> dict[str, torch.Tensor]:
    return SD3Backbone(str(sd3_t5)).encode_prompts(PROMPTS).tensors


def test_cached_embeddings_equal_the_encoders_and_need_no_encoder(sd3_t5, reference, tmp_path):
    cache = tmp_path / "cache"
    filling = SD3Backbone(str(sd3_t5), embedding_cache=str(cache))
    assert not filling.text_encoders_loaded and not hasattr(filling, "text_encoder_3")
    assert filling.fill_embedding_cache(PROMPTS, batch_size=2) == len(PROMPTS) + 1  # and the empty prompt
    assert filling.fill_embedding_cache(PROMPTS, batch_size=2) == 0

    backbone = SD3Backbone(str(sd3_t5), embedding_cache=str(cache))
    got = backbone.encode_prompts(list(reversed(PROMPTS)) + PROMPTS[:1])
    for key, value in reference.items():
        assert torch.equal(got.tensors[key], torch.cat([value.flip(0), value[:1]]))
    backbone.empty_conditioning(4)
    assert not backbone.text_encoders_loaded  # every prompt was cached: the encoders never loaded
    assert not any(name.startswith("text_encoder") for name, _ in backbone.named_children())


def test_missing_prompts_are_encoded_added_and_flushed(sd3_t5, reference, tmp_path):
    cache = tmp_path / "cache"
    backbone = SD3Backbone(str(sd3_t5), embedding_cache=str(cache))
    got = backbone.encode_prompts(PROMPTS[:2])
    assert backbone.text_encoders_loaded and not list(cache.glob("shard-*"))  # pending until flushed
    backbone.flush_embedding_cache()
    assert len(list(cache.glob("shard-*.safetensors"))) == 1
    again = SD3Backbone(str(sd3_t5), embedding_cache=str(cache))
    assert PROMPTS[0] in again.embedding_cache and PROMPTS[2] not in again.embedding_cache
    for key, value in reference.items():
        assert torch.equal(got.tensors[key], value[:2])
        assert torch.equal(again.encode_prompts(PROMPTS[:2]).tensors[key], value[:2])


def test_processes_filling_one_cache_see_each_others_shards(tmp_path):
    fingerprint = {"backbone": "test"}
    first, second = EmbeddingCache(tmp_path, fingerprint, shard_size=2), EmbeddingCache(tmp_path, fingerprint)
    rows = {p: torch.full((1, 3), float(i)) for i, p in enumerate("abc")}
    first.add(["a", "b"], Conditioning({"x": torch.cat([rows["a"], rows["b"]])}))  # reaches shard_size: written
    assert "a" not in second  # until it looks at the folder again
    second.add(["c"], Conditioning({"x": rows["c"]}))
    second.flush()  # writes its shard and indexes the folder's
    first.reload()
    for cache in (first, second):
        assert len(cache) == 3
        torch.testing.assert_close(cache.get(["c", "a"]).tensors["x"], torch.cat([rows["c"], rows["a"]]))
    with pytest.raises(KeyError, match="'d' is not in the embedding cache"):
        first.get(["a", "d"])
    first.add(["d"], Conditioning({"x": rows["a"]}))
    copy = pickle.loads(pickle.dumps(first))  # a module's hyperparameters deep-copy its backbone
    assert len(copy) == 4 and torch.equal(copy.get(["c", "d"]).tensors["x"], torch.cat([rows["c"], rows["a"]]))


def test_a_cache_of_other_settings_or_encoders_is_detected(sd3_t5, tmp_path):
    cache = tmp_path / "cache"
    SD3Backbone(str(sd3_t5), embedding_cache=str(cache)).fill_embedding_cache(PROMPTS, batch_size=4)
    with pytest.raises(StaleEmbeddingCache, match=r"differing: settings\.max_sequence_length.*embedding_cache_refresh"):
        SD3Backbone(str(sd3_t5), max_sequence_length=32, embedding_cache=str(cache))
    with pytest.raises(StaleEmbeddingCache, match="frozen_dtype"):
        SD3Backbone(str(sd3_t5), frozen_dtype="bfloat16", embedding_cache=str(cache))

    other = tmp_path / "other_t5"
    shutil.copytree(sd3_t5, other)
    config_file = other / "text_encoder_3" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "layer_norm_epsilon": 1e-3}))
    with pytest.raises(StaleEmbeddingCache, match=r"components\.text_encoder_3\.config\.json"):
        SD3Backbone(str(other), embedding_cache=str(cache))

    refreshed = SD3Backbone(str(sd3_t5), max_sequence_length=32, embedding_cache=str(cache), embedding_cache_refresh=True)
    assert len(refreshed.embedding_cache) == 0
    assert refreshed.encode_prompts(PROMPTS[:1]).tensors["prompt_embeds"].shape[1] == 77 + 32


def test_the_empty_prompt_is_encoded_once_per_run(sd3_t5, monkeypatch):
    backbone = SD3Backbone(str(sd3_t5))
    calls = []
    encode_text = backbone.encode_text
    monkeypatch.setattr(backbone, "encode_text", lambda prompts: calls.append(list(prompts)) or encode_text(prompts))
    first = backbone.empty_conditioning(3)
    for _ in range(3):
        again = backbone.empty_conditioning(2)
    assert calls == [[""]]
    for key, value in first.tensors.items():
        assert value.shape[0] == 3 and torch.equal(again.tensors[key], value[:2])


def test_rdm_cache_embeddings_fills_the_configs_cache(sd3_t5, reference, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "rdm_lightning.methods.DMD", "init_args": {"backbone": {
        "class_path": "rdm_lightning.backbones.SD3Backbone", "init_args": {"path": "/nowhere"}}}}}))
    cache = tmp_path / "cache"
    main(["cache-embeddings", "--config", str(config), "--prompts-file", str(prompts), "--path", str(sd3_t5),
          "--embedding-cache", str(cache), "--batch-size", "2"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == {"cache": str(cache), "encoded": 4, "cached": 4}
    got = SD3Backbone(str(sd3_t5), embedding_cache=str(cache)).embedding_cache.get(PROMPTS)
    assert torch.equal(got.tensors["prompt_embeds"], reference["prompt_embeds"])

    with pytest.raises(SystemExit):
        main(["cache-embeddings", "--config", str(config), "--prompts-file", str(prompts), "--path", str(sd3_t5)])
    assert "no embedding cache folder" in capsys.readouterr().err
