"""Text embeddings encoded once, stored as safetensors shards and memory-mapped (``docs/embedding_cache.md``).

A cache is a folder: ``fingerprint.json`` names the text encoders and settings that wrote
it, and each ``shard-*.safetensors`` holds the :class:`Conditioning` tensors of a list of
prompts (stacked on the first axis; the prompts are in the shard's metadata). Shards are
only ever added, each under a unique name written atomically, so several processes (the
ranks of one run) can fill one cache without coordinating. A prompt is read back by
slicing its row out of the memory-mapped shard.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rdm_lightning.backbones.base import Conditioning

FINGERPRINT_FILE = "fingerprint.json"
SHARD_GLOB = "shard-*.safetensors"
PROMPTS_METADATA = "prompts"
DEFAULT_SHARD_SIZE = 1024


def file_digest(path: Path) -> str:
    """sha256 of a small file (configs, tokenizer files)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def component_fingerprint(folder: Path) -> dict[str, Any]:
    """What identifies a text encoder or tokenizer folder without hashing gigabytes of weights: the
    digest of every file up to 64 MiB (configs, vocabularies, templates) and the name and size of
    every larger one (weight shards)."""
    entries: dict[str, Any] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        name = str(path.relative_to(folder))
        entries[name] = file_digest(path) if size <= 64 * 2**20 else {"bytes": size}
    return entries


def fingerprint_differences(expected: dict[str, Any], found: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted names of the entries in which two fingerprints differ."""
    names = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key), found.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += fingerprint_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}")
    return names


class StaleEmbeddingCache(ValueError):
    """The cache folder was written by other text encoders, templates or settings."""


class EmbeddingCache:
    """Prompt → :class:`Conditioning` rows, in a folder of safetensors shards.

    Args:
        folder: the cache folder (created if missing).
        fingerprint: what wrote the embeddings (text encoders, tokenizers, template, max length,
            dtype); a folder written under another fingerprint raises :class:`StaleEmbeddingCache`
            unless ``refresh``, which empties it first.
        refresh: re-encode from scratch when the fingerprint differs.
        shard_size: prompts added with :meth:`add` are written once this many are pending
            (and the rest by :meth:`flush`).
    """

    def __init__(self, folder: str | Path, fingerprint: dict[str, Any], refresh: bool = False,
                 shard_size: int = DEFAULT_SHARD_SIZE):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.folder = Path(folder).expanduser()
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from JSON
        self.shard_size = shard_size
        self._check_fingerprint(refresh)
        self._rows: dict[str, tuple[Path, int]] = {}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._handles: dict[Path, Any] = {}
        self.reload()

    def _check_fingerprint(self, refresh: bool) -> None:
        file = self.folder / FINGERPRINT_FILE
        if file.is_file():
            found = json.loads(file.read_text())
            if found == self.fingerprint:
                return
            if not refresh:
                differing = fingerprint_differences(self.fingerprint, found)
                raise StaleEmbeddingCache(
                    f"embedding cache {str(self.folder)!r} was written by other text encoders or settings "
                    f"(differing: {', '.join(differing[:6])}{' ...' if len(differing) > 6 else ''}); point "
                    "embedding_cache at another folder, or set embedding_cache_refresh: true to re-encode into this one"
                )
            for shard in self.folder.glob(SHARD_GLOB):
                shard.unlink()
        elif self.folder.exists() and any(self.folder.glob(SHARD_GLOB)):
            raise StaleEmbeddingCache(f"embedding cache {str(self.folder)!r} has shards but no {FINGERPRINT_FILE}")
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(file, (json.dumps(self.fingerprint, indent=2, sort_keys=True) + "\n").encode())

    def __getstate__(self) -> dict[str, Any]:
        # Open shard handles do not pickle (a module's saved hyperparameters deep-copy its backbone):
        # a copy re-opens the folder's shards.
        state = dict(self.__dict__)
        state.update(_rows={}, _handles={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.reload()

    def reload(self) -> None:
        """Index the shards now in the folder (other processes may have added some)."""
        for shard in sorted(self.folder.glob(SHARD_GLOB)):
            if shard in self._handles:
                continue
            handle = safe_open(str(shard), framework="pt")
            self._handles[shard] = handle
            for row, prompt in enumerate(json.loads(handle.metadata()[PROMPTS_METADATA])):
                self._rows.setdefault(prompt, (shard, row))

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._rows or prompt in self._pending

    def __len__(self) -> int:
        return len(self._rows.keys() | self._pending.keys())

    def missing(self, prompts: Sequence[str]) -> list[str]:
        """The distinct prompts of ``prompts`` the cache does not hold, in order of first appearance."""
        return [p for p in dict.fromkeys(prompts) if p not in self]

    def _row(self, prompt: str) -> dict[str, torch.Tensor]:
        if prompt in self._pending:
            return self._pending[prompt]
        shard, row = self._rows[prompt]
        handle = self._handles[shard]
        return {key: handle.get_slice(key)[row : row + 1][0] for key in handle.keys()}

    def get(self, prompts: Sequence[str]) -> Conditioning:
        """The cached conditioning of ``prompts`` (KeyError naming the first missing prompt)."""
        missing = self.missing(prompts)
        if missing:
            raise KeyError(f"prompt {missing[0]!r} is not in the embedding cache {str(self.folder)!r}")
        rows = [self._row(p) for p in prompts]
        return Conditioning({key: torch.stack([r[key] for r in rows]) for key in rows[0]})

    def add(self, prompts: Sequence[str], cond: Conditioning) -> None:
        """Hold the rows of ``cond`` for ``prompts`` (one row per prompt); write a shard once
        ``shard_size`` are pending."""
        if len(prompts) != len(cond):
            raise ValueError(f"{len(prompts)} prompts for {len(cond)} conditioning rows")
        for i, prompt in enumerate(prompts):
            if prompt not in self:
                self._pending[prompt] = {k: v[i].detach().to("cpu").contiguous() for k, v in cond.tensors.items()}
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the pending rows as one new shard."""
        if not self._pending:
            return
        prompts = list(self._pending)
        keys = self._pending[prompts[0]].keys()
        tensors = {key: torch.stack([self._pending[p][key] for p in prompts]) for key in keys}
        shard = self.folder / f"shard-{uuid.uuid4().hex}.safetensors"
        tmp = shard.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={PROMPTS_METADATA: json.dumps(prompts)})
        os.replace(tmp, shard)
        self._pending.clear()
        self.reload()

    def fill(self, prompts: Sequence[str], encode: Callable[[Sequence[str]], Conditioning], batch_size: int,
             progress: Callable[[int], None] | None = None) -> int:
        """Encode and store every prompt of ``prompts`` not yet cached, ``batch_size`` at a time;
        returns how many were encoded. ``progress(n)`` is called after each batch."""
        missing = self.missing(prompts)
        for begin in range(0, len(missing), batch_size):
            chunk = missing[begin : begin + batch_size]
            self.add(chunk, encode(chunk))
            if progress is not None:
                progress(len(chunk))
        self.flush()
        return len(missing)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
