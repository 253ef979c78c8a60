"""`smoothkd store verify`: check every committed part against the format, naming each fault."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from smoothkd.storage_schemas import spec
from smoothkd.storage_schemas.reader import SoftLabelStore

# float32 log-softmax sums to 1 within ~1e-6 over the vocabulary; allow some slack on top
# of the fixed-point rounding of every stored log-prob.
_NORMALISATION_SLACK = 1e-4


@dataclass(frozen=True)
class Fault:
    part: str
    array: str
    message: str

    def __str__(self) -> str:
        return f"{self.part}/{self.array}: {self.message}"


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
    warnings: list[str]  # not faults: uncommitted parts, which readers ignore
    checked: Checked

    @property
    def ok(self) -> bool:
        return not self.faults

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "ok": self.ok, "faults": [asdict(f) for f in self.faults], "warnings": self.warnings,
                "checked": asdict(self.checked)}


def verify_store(store: SoftLabelStore, progress: Callable[[str], None] | None = None) -> VerifyReport:
    """Check every committed part, collecting every fault found."""
    faults: list[Fault] = []
    warnings = [f"{p.name}: not committed (an interrupted write); ignored by readers" for p in store.uncommitted]
    n_seq = n_lab = 0
    for part in store.parts:
        if progress:
            progress(part.name)
        faults += _verify_part(store, part.name, part.commit or {})
        n_seq += int(part.commit["n_sequences"])
        n_lab += int(part.commit["n_labels"])
    missing = store.missing_parts
    if missing:
        faults.append(Fault("store", spec.PARTS_DIR, (
            f"incomplete: {len(missing)} of {store.expected_parts} parts are not committed "
            f"(first: {spec.part_name(missing[0])}); a run is still going, was killed, or a shard has not run: "
            "run the same precompute command again to finish it")))
    return VerifyReport(store.url, faults, warnings, Checked(len(store.parts), n_seq, n_lab))


def _verify_part(store: SoftLabelStore, part: str, commit: dict[str, Any]) -> list[Fault]:
    m = store.manifest
    enc = m.encoding
    faults: list[Fault] = []

    def fault(array: str, message: str) -> None:
        faults.append(Fault(part, array, message))

    arrays: dict[str, np.ndarray] = {}
    for a in spec.ARRAYS:
        try:
            arr = store.array(part, a.name)
        except Exception as e:  # noqa: BLE001 - any failure to open is a fault to report
            fault(a.name, f"cannot be opened: {e}")
            continue
        want_dtype = a.numpy_dtype(m.ids, enc)
        if arr.dtype != want_dtype:
            fault(a.name, f"dtype {arr.dtype}, expected {want_dtype}")
        want_shape = list(commit.get("arrays", {}).get(a.name, []))
        if list(arr.shape) != want_shape:
            fault(a.name, f"shape {list(arr.shape)}, commit.json says {want_shape}")
        if list(arr.shape[1:]) != list(a.row_shape(m.top_k)):
            fault(a.name, f"rows of shape {list(arr.shape[1:])}, expected {list(a.row_shape(m.top_k))}")
        try:
            arrays[a.name] = arr[...]
        except Exception as e:  # noqa: BLE001
            fault(a.name, f"cannot be read: {e}")
    if len(arrays) < len(spec.ARRAYS):
        return faults

    tokens, table, codes = arrays["tokens"], arrays["id_table"], arrays["topk_codes"]
    q, true_q, tail = arrays["topk_logprobs"], arrays["true_logprob"], arrays["tail"]
    n_labels = codes.shape[0]
    if codes.size and codes.max() >= len(table):
        fault("topk_codes", f"codes up to {codes.max()} for an id_table of {len(table)} entries")
        return faults
    ids = table[codes] if codes.size else codes
    if len(np.unique(table)) != len(table):
        fault("id_table", "repeats an id")
    for name in ("tokens", "id_table"):
        arr = arrays[name]
        bad = np.flatnonzero((arr >= m.vocab_size).reshape(len(arr), -1).any(axis=1)) if arr.size else arr[:0]
        if bad.size:
            fault(name, f"{bad.size} rows hold ids >= vocabulary size {m.vocab_size} (first at row {bad[0]})")
    for name in ("true_logprob", "topk_logprobs", "tail"):
        if len(arrays[name]) != n_labels:
            fault(name, f"{len(arrays[name])} rows, topk_codes has {n_labels}")
    if faults:
        return faults

    if n_labels:
        if ids.shape[1] > 1:
            sorted_ids = np.sort(ids, axis=1)
            dup = np.flatnonzero((sorted_ids[:, 1:] == sorted_ids[:, :-1]).any(axis=1))
            if dup.size:
                fault("topk_codes", f"{dup.size} rows repeat an id (first at row {dup[0]})")
            unsorted = np.flatnonzero((np.diff(q.astype(np.int64), axis=1) < 0).any(axis=1))
            if unsorted.size:
                fault("topk_logprobs", f"{unsorted.size} rows are not sorted most probable first (first at row {unsorted[0]})")
        if not np.isfinite(tail).all():
            fault("tail", f"{int((~np.isfinite(tail)).sum())} values are NaN or infinite")
        elif ((tail < 0) | (tail > 1)).any():
            fault("tail", "values outside [0, 1]")
        else:
            mass = np.exp(enc.decode(q).astype(np.float64)).sum(axis=1) + tail
            tol = np.expm1(enc.max_error) + _NORMALISATION_SLACK
            off = np.flatnonzero(np.abs(mass - 1) > tol)
            if off.size:
                fault("tail", f"{off.size} rows have top-k mass + tail off 1 by more than {tol:.4f} "
                              f"(row {off[0]}: {mass[off[0]]:.6f})")

    faults += _verify_table(store, part, commit, tokens, ids, q, true_q)
    return faults


def _starts(lengths: np.ndarray) -> np.ndarray:
    """Offsets of back-to-back runs of the given lengths."""
    return np.cumsum(lengths) - lengths


def _verify_table(store: SoftLabelStore, part: str, commit: dict[str, Any], tokens: np.ndarray,
                  ids: np.ndarray, q: np.ndarray, true_q: np.ndarray) -> list[Fault]:
    faults: list[Fault] = []

    def fault(message: str) -> None:
        faults.append(Fault(part, spec.TABLE_FILE, message))

    try:
        table = store.part_table(part)
    except Exception as e:  # noqa: BLE001
        return [Fault(part, spec.TABLE_FILE, f"cannot be read: {e}")]
    missing = [c for c in spec.TABLE_COLUMNS if c not in table.column_names]
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
    if faults:
        return faults

    # The true next token's log-prob must agree with the top-k: equal to its entry when it
    # is in the top-k (both come from one float32 value), no higher than the k-th otherwise.
    starts = np.repeat(col["token_offset"] + col["prompt_tokens"], n_lab)
    within = np.arange(len(ids)) - np.repeat(col["label_offset"], n_lab)
    targets = tokens[(starts + within).astype(np.int64)].astype(np.int64)
    hit = ids.astype(np.int64) == targets[:, None]
    in_topk = hit.any(axis=1)
    rows = np.flatnonzero(in_topk)
    if rows.size and (q[rows, hit[rows].argmax(axis=1)] != true_q[rows]).any():
        faults.append(Fault(part, "true_logprob", "differs from the top-k entry of the same token"))
    out = np.flatnonzero(~in_topk)
    if out.size and (true_q[out] < q[out, -1]).any():
        faults.append(Fault(part, "true_logprob", "a token outside the top-k is more probable than the k-th entry"))
    return faults
