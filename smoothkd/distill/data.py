"""Streaming a store into training batches: order is a pure function, reads are part-local.

Epoch order: parts in a seeded permutation, sequences in a seeded permutation within each
part. So consecutive batches come from the same part, which the reader decodes once and
keeps (two parts at a time), instead of touching every chunk of the store per batch. The
order depends on (selection, seed, epoch) only; rank r of w takes every w-th sequence of
it, so ranks read disjoint slices and together see every sequence once per epoch. Resume
state is (epoch, batches done): nothing is replayed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from smoothkd.distill.losses import TeacherTopK
from smoothkd.errors import SmoothkdError
from smoothkd.storage_schemas import SoftLabelStore


@dataclass
class Batch:
    """One micro-batch, right-padded; supervised positions flattened in (row, position) order."""

    seqs: list[int]  # store sequence indices, for logs and fairness checks
    input_ids: torch.Tensor  # [b, L]
    attention_mask: torch.Tensor  # [b, L]
    supervised: torch.Tensor  # [b, L] bool: position t predicts token t + 1, a response token
    targets: torch.Tensor  # [n] the supervised tokens
    teacher: TeacherTopK  # [n, k] soft labels, aligned with targets

    @property
    def n_supervised(self) -> int:
        return int(self.targets.numel())

    def to(self, device: torch.device) -> Batch:
        t = self.teacher
        return Batch(self.seqs, self.input_ids.to(device), self.attention_mask.to(device),
                     self.supervised.to(device), self.targets.to(device),
                     TeacherTopK(t.ids.to(device), t.logprobs.to(device), t.tail.to(device)))


class _PartCache:
    """The decoded arrays of the most recently used parts (stored dtypes: small)."""

    def __init__(self, store: SoftLabelStore, size: int = 2):
        self.store, self.size = store, size
        self._parts: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()

    def get(self, part: str) -> dict[str, np.ndarray]:
        if part in self._parts:
            self._parts.move_to_end(part)
            return self._parts[part]
        arrays = {name: self.store.array(part, name)[...]
                  for name in ("tokens", "topk_codes", "topk_logprobs", "tail")}
        arrays["id_table"] = self.store.id_table(part)
        self._parts[part] = arrays
        if len(self._parts) > self.size:
            self._parts.popitem(last=False)
        return arrays


class StoreDataset:
    """The training selection of a store (split and sources) and its batches."""

    def __init__(self, store: SoftLabelStore, sources: list[str], split: str = "train", pad_id: int = 0):
        self.store, self.pad_id = store, pad_id
        table = store.table()
        if not table.num_rows:
            raise SmoothkdError(f"{store.url} holds no sequences")
        keep = np.isin(table["source"].to_numpy(zero_copy_only=False), sources) & (
            table["split"].to_numpy(zero_copy_only=False) == split)
        if not keep.any():
            have = sorted(set(table["source"].to_pylist()))
            raise SmoothkdError(f"{store.url} has no {split} sequences from sources {sources} (it has {have})")
        t = table.filter(keep)
        self.seq = t["seq"].to_numpy()
        self.part = t["part"].to_numpy(zero_copy_only=False)
        self.token_offset = t["token_offset"].to_numpy()
        self.n_tokens = t["n_tokens"].to_numpy()
        self.prompt_tokens = t["prompt_tokens"].to_numpy()
        self.label_offset = t["label_offset"].to_numpy()
        self.parts = sorted(set(self.part))
        self.encoding = store.manifest.encoding
        self._cache = _PartCache(store)

    def __len__(self) -> int:
        return len(self.seq)

    @property
    def n_supervised(self) -> int:
        return int((self.n_tokens - self.prompt_tokens).sum())

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        """Positions into the selection, in this epoch's order (a pure function of its arguments)."""
        rng = np.random.default_rng([seed, epoch])
        by_part = {p: np.flatnonzero(self.part == p) for p in self.parts}
        return np.concatenate([rng.permutation(by_part[self.parts[i]]) for i in rng.permutation(len(self.parts))])

    def batches(self, epoch: int, seed: int, batch_size: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
        mine = self.epoch_order(epoch, seed)[rank::world]
        return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]

    def load(self, positions: np.ndarray) -> Batch:
        rows = []
        for i in positions:
            a = self._cache.get(self.part[i])
            t0, n, p, l0 = self.token_offset[i], self.n_tokens[i], self.prompt_tokens[i], self.label_offset[i]
            labels = slice(l0, l0 + n - p)
            rows.append((a["tokens"][t0 : t0 + n], p, a["id_table"][a["topk_codes"][labels]],
                         a["topk_logprobs"][labels], a["tail"][labels]))
        width = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        sup = torch.zeros((len(rows), width), dtype=torch.bool)
        for j, (tokens, p, *_) in enumerate(rows):
            ids[j, : len(tokens)] = torch.from_numpy(tokens.astype(np.int64))
            mask[j, : len(tokens)] = 1
            sup[j, p - 1 : len(tokens) - 1] = True
        targets = torch.cat([torch.from_numpy(r[0][r[1] :].astype(np.int64)) for r in rows])
        teacher = TeacherTopK(
            ids=torch.from_numpy(np.concatenate([r[2] for r in rows])),
            logprobs=torch.from_numpy(self.encoding.decode(np.concatenate([r[3] for r in rows]))),
            tail=torch.from_numpy(np.concatenate([r[4] for r in rows]).astype(np.float32)),
        )
        return Batch([int(self.seq[i]) for i in positions], ids, mask, sup, targets, teacher)
