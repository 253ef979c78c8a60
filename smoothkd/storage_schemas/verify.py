"""`smoothkd store verify`: check every committed part against the format, naming each fault.

Work is bounded by what commit.json records: an array whose files or metadata are at fault
is reported as such and not read, so a damaged file is named, not its symptoms elsewhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from smoothkd.errors import StoreError
from smoothkd.storage_schemas import spec
from smoothkd.storage_schemas.reader import ArrayFault, Fault, PartArrays, SoftLabelStore

# float32 log-softmax sums to 1 within ~1e-6 over the vocabulary; allow some slack on top
# of the fixed-point rounding of every stored log-prob.
_NORMALISATION_SLACK = 1e-4


@dataclass(frozen=True)
class Checked:
    """What verification read: the committed parts and their sequences and supervised tokens."""

    parts: int
    sequences: int
    supervised_tokens: int


@dataclass(frozen=True)
class VerifyReport:
    """`smoothkd store verify`'s result; `--json` prints `to_json()`."""

    url: str
    faults: list[Fault]
    warnings: list[str]  # not faults: uncommitted parts (which readers ignore), what could not be checked
    checked: Checked

    @property
    def ok(self) -> bool:
        return not self.faults

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "ok": self.ok, "faults": [asdict(f) for f in self.faults], "warnings": self.warnings,
                "checked": asdict(self.checked)}


def verify_store(store: SoftLabelStore, progress: Callable[[str], None] | None = None) -> VerifyReport:
    """Check every committed part, collecting every fault found."""
    faults = store.store_faults()
    warnings = [f"{p.name}: not committed (an interrupted write); ignored by readers"
                for p in store.uncommitted if not p.problem]
    n_seq = n_lab = 0
    unchecked = []
    for part in store.parts:
        if progress:
            progress(part.name)
        faults += _verify_part(store, part.name, part.commit or {})
        n_seq += int(part.commit["n_sequences"])
        n_lab += int(part.commit["n_labels"])
        if not store.has_digests(part.name):
            unchecked.append(part.name)
    if unchecked:
        warnings.append(
            f"{len(unchecked)} of {len(store.parts)} parts (first: {unchecked[0]}) were written by an older smoothkd, "
            "without chunk checksums or file digests: silent corruption in them (a flipped byte that still "
            "decodes) cannot be detected; only their format invariants were checked. Precompute the store "
            "again, into a new --out, to add them")
    missing = store.missing_parts
    if missing:
        faults.append(Fault("store", spec.PARTS_DIR, (
            f"incomplete: {len(missing)} of {store.expected_parts} parts are not committed "
            f"(first: {spec.part_name(missing[0])}); a run is still going, was killed, or a shard has not run: "
            "run the same precompute command again to finish it")))
    return VerifyReport(store.url, faults, warnings, Checked(len(store.parts), n_seq, n_lab))


def _digest_faults(store: SoftLabelStore, part: str, skip: set[str]) -> list[Fault]:
    """Every file commit.json records (but those in `skip`, already at fault) against its sha256."""
    faults = []
    for rel, want in (store.recorded_files(part) or {}).items():
        path = f"{spec.PARTS_DIR}/{part}/{rel}"
        if path in skip:
            continue
        try:
            data = store.loc.fs.cat_file(store.loc.path(path))
        except OSError as e:
            faults.append(Fault(part, rel.split("/")[0], f"{path} cannot be read: {e}", path))
            continue
        if hashlib.sha256(data).hexdigest() != want["sha256"]:
            faults.append(Fault(part, rel.split("/")[0], f"{path} differs from the sha256 commit.json records "
                                                         "for it: the file is damaged", path))
    return faults


def _verify_part(store: SoftLabelStore, part: str, commit: dict[str, Any]) -> list[Fault]:
    m = store.manifest
    faults = store.part_faults(part)
    faults += _digest_faults(store, part, {f.file for f in faults if f.file})
    at_fault = {f.array for f in faults}

    def fault(array: str, message: str) -> None:
        faults.append(Fault(part, array, message))

    arrays: dict[str, np.ndarray] = {}
    for a in m.arrays:
        if a.name in at_fault:  # not read: its damage is reported, its symptoms would only repeat it
            continue
        try:
            arrays[a.name] = store.read(part, a.name)
        except StoreError as e:
            fault(a.name, str(e))
    if len(arrays) < len(m.arrays) or spec.TABLE_FILE in at_fault:
        return faults

    tokens, table = arrays["tokens"], arrays["id_table"]
    if len(np.unique(table)) != len(table):
        fault("id_table", "repeats an id")
    for name in ("tokens", "id_table"):
        arr = arrays[name]
        bad = np.flatnonzero(arr >= m.vocab_size) if arr.size else arr[:0]
        if bad.size:
            fault(name, f"{bad.size} values are ids >= vocabulary size {m.vocab_size} (first at row {bad[0]})")
    # Decoded as a reader decodes it; the reader names what does not fit together (codes beyond
    # id_table, entry counts that do not add up, ...).
    rows = PartArrays(store, part)
    rows._stored.update(arrays)
    try:
        labels = rows.labels()
    except ArrayFault as e:
        fault(e.array, e.message)
        return faults
    n_labels = len(labels)
    for a in m.arrays:
        if a.axis == "labels" and len(arrays[a.name]) != n_labels:
            fault(a.name, f"{len(arrays[a.name])} rows, the part has {n_labels} supervised positions")
    if faults:
        return faults

    codes = "topk_codes" if m.schema_version == 1 else "entry_codes"
    ids, n = labels.ids, rows.n_entries
    valid = np.arange(ids.shape[1]) < n[:, None]
    if n_labels and ids.shape[1] > 1:
        # padding made distinct (negative) so that only repeated entries are found
        marked = np.where(valid, ids, -1 - np.arange(ids.shape[1]))
        sorted_ids = np.sort(marked, axis=1)
        dup = np.flatnonzero((sorted_ids[:, 1:] == sorted_ids[:, :-1]).any(axis=1))
        if dup.size:
            fault(codes, f"{dup.size} rows repeat an id (first at row {dup[0]})")
    if isinstance(labels, spec.SampledLabels):
        if n_labels:
            draws = labels.counts.sum(axis=1)
            off = np.flatnonzero(draws != int(m.selection["samples"]))
            if off.size:
                fault("entry_counts", f"{off.size} rows hold {draws[off[0]]} draws, not the store's "
                                      f"{m.selection['samples']} (first at row {off[0]})")
            unsorted = np.flatnonzero((np.diff(labels.counts, axis=1) > 0).any(axis=1))
            if unsorted.size:
                fault("entry_counts", f"{unsorted.size} rows are not sorted most drawn first (first at row {unsorted[0]})")
        faults += _verify_table(store, part, commit, tokens, ids, valid, None, labels.true_logprob)
        return faults

    q, tail = labels.logprobs, labels.tail
    if n_labels:
        if ids.shape[1] > 1:
            steps = np.diff(np.where(valid, q, np.float32(-1e30)), axis=1)  # padding: no inf - inf
            unsorted = np.flatnonzero((np.where(valid[:, 1:], steps, 0) > 0).any(axis=1))
            if unsorted.size:
                fault("topk_logprobs" if m.schema_version == 1 else "entry_logprobs",
                      f"{unsorted.size} rows are not sorted most probable first (first at row {unsorted[0]})")
        if not np.isfinite(tail).all():
            fault("tail", f"{int((~np.isfinite(tail)).sum())} values are NaN or infinite")
        elif ((tail < 0) | (tail > 1)).any():
            fault("tail", "values outside [0, 1]")
        else:
            mass = np.exp(q.astype(np.float64)).sum(axis=1) + tail
            tail_error = 0.0 if m.schema_version == 1 else m.tail.max_relative_error
            tol = np.expm1(m.encoding.max_error) + tail_error + _NORMALISATION_SLACK
            off = np.flatnonzero(np.abs(mass - 1) > tol)
            if off.size:
                fault("tail", f"{off.size} rows have top-k mass + tail off 1 by more than {tol:.4f} "
                              f"(row {off[0]}: {mass[off[0]]:.6f})")

    stored_rank = arrays.get("true_rank")
    faults += _verify_table(store, part, commit, tokens, ids, valid, q, labels.true_logprob,
                            None if stored_rank is None else stored_rank.astype(np.int64))
    return faults


def _starts(lengths: np.ndarray) -> np.ndarray:
    """Offsets of back-to-back runs of the given lengths."""
    return np.cumsum(lengths) - lengths


def _verify_table(store: SoftLabelStore, part: str, commit: dict[str, Any], tokens: np.ndarray, ids: np.ndarray,
                  valid: np.ndarray, q: np.ndarray | None, true_q: np.ndarray,
                  true_rank: np.ndarray | None = None) -> list[Fault]:
    """The sequence table against the arrays; for top-k labels (q, the decoded log-probs), the true
    token's log-prob against the entries (and its stored rank, in version 2)."""
    faults: list[Fault] = []

    def fault(message: str) -> None:
        faults.append(Fault(part, spec.TABLE_FILE, message))

    try:
        table = store.part_table(part)
    except Exception as e:  # noqa: BLE001
        return [Fault(part, spec.TABLE_FILE, f"cannot be read: {e}")]
    missing = [c for c in store.manifest.table_columns if c not in table.column_names]
    if missing:
        return [Fault(part, spec.TABLE_FILE, f"missing columns {missing}")]
    if table.num_rows != commit.get("n_sequences"):
        fault(f"{table.num_rows} rows, commit.json says {commit.get('n_sequences')}")
    col = {c: np.asarray(table[c].to_numpy(zero_copy_only=False)) for c in
           ("token_offset", "n_tokens", "prompt_tokens", "label_offset", "n_labels")}
    n_tok, n_lab = col["n_tokens"].astype(np.int64), col["n_labels"].astype(np.int64)
    if (col["token_offset"] != _starts(n_tok)).any():
        fault("token_offset is not the running sum of n_tokens")
    if (col["label_offset"] != _starts(n_lab)).any():
        fault("label_offset is not the running sum of n_labels")
    if (n_lab != n_tok - col["prompt_tokens"]).any():
        fault("n_labels != n_tokens - prompt_tokens")
    if (col["prompt_tokens"] < 1).any() or (n_lab < 1).any():
        fault("a sequence has an empty prompt or no supervised token")
    if n_tok.sum() != len(tokens):
        fault(f"n_tokens sums to {n_tok.sum()}, tokens has {len(tokens)}")
    if n_lab.sum() != len(ids):
        fault(f"n_labels sums to {n_lab.sum()}, label arrays have {len(ids)} rows")
    for name, allowed in (("source", spec.SOURCES), ("split", spec.SPLITS)):
        bad = set(table[name].to_pylist()) - set(allowed)
        if bad:
            fault(f"unknown {name} values {sorted(bad)}")
    if faults or q is None or not len(ids):
        return faults

    # The true next token's log-prob must agree with the entries: equal to its entry when it
    # is one of them (both come from one float32 value), no higher than the last one otherwise.
    starts = np.repeat(col["token_offset"] + col["prompt_tokens"], n_lab)
    within = np.arange(len(ids)) - np.repeat(col["label_offset"], n_lab)
    targets = tokens[(starts + within).astype(np.int64)].astype(np.int64)
    hit = (ids.astype(np.int64) == targets[:, None]) & valid
    in_topk = hit.any(axis=1)
    rows = np.flatnonzero(in_topk)
    if true_rank is not None:
        want = np.where(in_topk, hit.argmax(axis=1), store.manifest.top_k)
        off = np.flatnonzero(true_rank != want)
        if off.size:
            faults.append(Fault(part, "true_rank", f"{off.size} ranks do not point at the true token's entry "
                                                   f"(first at row {off[0]})"))
            return faults
    if rows.size and (q[rows, hit[rows].argmax(axis=1)] != true_q[rows]).any():
        faults.append(Fault(part, "true_logprob", "differs from the top-k entry of the same token"))
    out = np.flatnonzero(~in_topk)
    last = q[np.arange(len(q)), valid.sum(axis=1) - 1] if len(q) else q[:, 0]
    if out.size and (true_q[out] > last[out]).any():
        faults.append(Fault(part, "true_logprob", "a token outside the top-k is more probable than the k-th entry"))
    return faults
