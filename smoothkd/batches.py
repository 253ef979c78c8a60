"""Batches from a soft-label store, for training (distill) and evaluation (calibration).

Epoch order: parts in a seeded permutation, sequences in a seeded permutation within each
part. So consecutive batches come from the same part, which the store reader reads whole
once and this module keeps (two parts at a time), instead of touching every chunk of the
store per batch. The order depends on (selection, seed, epoch) only; rank r of w takes
every w-th sequence of it, so ranks read disjoint slices and together see every sequence
once per epoch. Resume state is (epoch, batches done): nothing is replayed.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from smoothkd.errors import SmoothkdError
from smoothkd.storage_schemas import SoftLabelStore, spec
from smoothkd.storage_schemas.reader import PartArrays
from smoothkd.tokens import pad_batch


@dataclass(frozen=True)
class TeacherTopK:
    """Teacher soft labels for n supervised positions, as torch tensors on the student's device.
    Rows with fewer entries than k (adaptive k, or a batch across parts) end in padding: log-prob
    -inf (probability 0), id spec.PAD_ID."""

    ids: torch.Tensor  # [n, k] int64, teacher top-k token ids, most probable first
    logprobs: torch.Tensor  # [n, k] float32, teacher log-probs at temperature 1 (log-softmax over the full vocabulary)
    tail: torch.Tensor  # [n] float32, teacher mass outside the top-k, r = 1 - sum_i exp(logprobs_i) (stored separately, exact)


@dataclass(frozen=True)
class TeacherSampled:
    """Ids drawn from the teacher's full distribution at n positions, with their counts (0 at padding)."""

    ids: torch.Tensor  # [n, m] int64, the distinct ids drawn at each position, most drawn first
    counts: torch.Tensor  # [n, m] float32, draws of each; every row sums to the store's samples


Teacher = TeacherTopK | TeacherSampled


def teacher_to(teacher: Teacher, device: torch.device) -> Teacher:
    return type(teacher)(**{f.name: getattr(teacher, f.name).to(device) for f in dataclasses.fields(teacher)})


@dataclass
class Batch:
    """One micro-batch, right-padded; supervised positions flattened in (row, position) order."""

    seqs: list[int]  # store sequence indices, for logs and fairness checks
    input_ids: torch.Tensor  # [b, L]
    attention_mask: torch.Tensor  # [b, L]
    supervised: torch.Tensor  # [b, L] bool: position t predicts token t + 1, a response token
    targets: torch.Tensor  # [n] the supervised tokens
    teacher: Teacher  # [n, k] soft labels, aligned with targets

    @property
    def n_supervised(self) -> int:
        return int(self.targets.numel())

    def to(self, device: torch.device) -> Batch:
        return Batch(self.seqs, self.input_ids.to(device), self.attention_mask.to(device),
                     self.supervised.to(device), self.targets.to(device), teacher_to(self.teacher, device))


def _join(arrays: list[np.ndarray], fill: float = 0) -> torch.Tensor:
    """The arrays end to end, as one tensor, [n, k] rows padded with `fill` to the widest; a single
    array (a batch within one part) is fresh from decoding, so it is not copied again."""
    if len(arrays) == 1:
        return torch.from_numpy(arrays[0])
    if arrays[0].ndim == 2:
        width = max(a.shape[1] for a in arrays)
        arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill) for a in arrays]
    return torch.from_numpy(np.concatenate(arrays))


class _PartCache:
    """The arrays of the most recently used parts (stored dtypes: small)."""

    def __init__(self, store: SoftLabelStore, size: int = 2):
        self.store, self.size = store, size
        self._parts: OrderedDict[str, PartArrays] = OrderedDict()

    def get(self, part: str) -> PartArrays:
        if part in self._parts:
            self._parts.move_to_end(part)
            return self._parts[part]
        arrays = self._parts[part] = self.store.read_part(part)
        if len(self._parts) > self.size:
            self._parts.popitem(last=False)
        return arrays


GROUP_WINDOW = 32  # batches sorted by length together (Hugging Face's LengthGroupedSampler takes 50)


class StoreDataset:
    """The selection of a store (split and sources) and its batches."""

    def __init__(self, store: SoftLabelStore, sources: list[str], split: str = "train", pad_id: int = 0):
        # pad_id: positions past a row's end are masked out and never scored, so callers
        # without a tokenizer (calibration) may keep 0.
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

    def batches(self, epoch: int, seed: int, batch_size: int, rank: int = 0, world: int = 1,
                group_by_length: bool = False) -> list[np.ndarray]:
        mine = self.epoch_order(epoch, seed)[rank::world]
        if group_by_length:
            mine = self._grouped(mine, batch_size, np.random.default_rng([seed, epoch, rank]))
        return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]

    def _grouped(self, order: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """The order in windows of GROUP_WINDOW batches, each window sorted by length, cut into
        batches and those shuffled: a batch pads to a length near its own (random batches of Dolly
        pad to about twice their tokens). Windows are consecutive in the order, so mostly one part."""
        out = []
        size = batch_size * GROUP_WINDOW
        for start in range(0, len(order), size):
            window = order[start : start + size]
            window = window[np.argsort(-self.n_tokens[window], kind="stable")]
            chunks = [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
            out += [chunks[j] for j in rng.permutation(len(chunks))]
        return np.concatenate(out) if out else order

    def load(self, positions: np.ndarray) -> Batch:
        tokens, prompts, labels = [], [], []
        # Positions come grouped by part (see epoch_order): one decode per part, not per row.
        for part, run in itertools.groupby(positions, key=self.part.__getitem__):
            arrays, rows = self._cache.get(part), []
            for i in run:
                t0, n, p, l0 = self.token_offset[i], self.n_tokens[i], self.prompt_tokens[i], self.label_offset[i]
                tokens.append(arrays.tokens[t0 : t0 + n])
                prompts.append(int(p))
                rows.append(np.arange(l0, l0 + n - p))
            label_rows = np.concatenate(rows)
            labels.append(arrays.labels(label_rows, with_true=False))
        input_ids, mask = pad_batch(tokens, self.pad_id)
        sup = torch.zeros(input_ids.shape, dtype=torch.bool)
        for j, (row, p) in enumerate(zip(tokens, prompts)):
            sup[j, p - 1 : len(row) - 1] = True
        if self.store.manifest.label_kind == spec.LABEL_KIND_SAMPLED:
            teacher: Teacher = TeacherSampled(ids=_join([lab.ids for lab in labels], spec.PAD_ID),
                                              counts=_join([lab.counts.astype(np.float32) for lab in labels]))
        else:
            teacher = TeacherTopK(ids=_join([lab.ids for lab in labels], spec.PAD_ID),
                                  logprobs=_join([lab.logprobs for lab in labels], -np.inf),
                                  tail=_join([lab.tail for lab in labels]))
        targets = torch.from_numpy(np.concatenate([row[p:] for row, p in zip(tokens, prompts)]))  # a copy, not the cache
        return Batch([int(self.seq[i]) for i in positions], input_ids, mask, sup, targets, teacher)
