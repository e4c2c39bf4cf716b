"""What is checked in a code store, and when: one integrity model for every array that search, export, resume
and append read.

Every protected array is cut along its rows into the Zarr chunks it is written in, and each chunk has a
CRC-32C recorded by the task that wrote it, in a checksum table beside the arrays:

| table | rows | columns (one CRC per array) | written by | flag |
| --- | --- | --- | --- | --- |
| `checksums` | encode chunks | `codes`, `ids`, (IVF) `lists` | the encode task | `done` |
| `ivf/checksums` | inverted chunks | `codes`, `rows`, (integer ids) `ids` of `ivf/` | the copy task | `ivf/copy_done` |

plus `ivf/offsets` (its CRC in the `ivf` attrs) and the codebook (`codebook_sha256` in the root attrs, over
centroids, rotation and coarse centroids). A CRC is of the values as read through Zarr, not of the chunk
files, so it does not depend on the codec; a lost chunk file reads as fill values, which its CRC tells apart
from the recorded data unless that data was the fill values itself (then nothing was lost).

Who checks what (README "What is checked, when"):
- `pqgpu verify`: everything, fully;
- every open of a store's codebook (search, export, evaluate, info): the codebook against its sha256;
- search: each chunk of codes it scans, the chunks of ids it maps results through, and for IVF the offsets
  and each inverted chunk it reads;
- export: every chunk it writes out;
- resume: every done chunk (damaged ones are encoded again) and a built inverted layout (rebuilt when
  damaged).

CRC-32C (google-crc32c, a Zarr dependency, ~4 GB/s here) rather than zlib's CRC-32 (~1.6 GB/s): the same
guarantees against accidental damage (every burst up to 32 bits, all but 2**-32 of the rest) at twice the
rate, so reading through the checks costs little beside the reads. Stores of format 1 (zlib CRC-32 over
codes and ids together, no IVF or lists checksums) are still verified the way they were written.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import StoreError

log = logging.getLogger(__name__)

ALGORITHM = "crc32c"
# For pqgpu.bench.integrity only, which measures what the checks cost: PQGPU_BENCH_SKIP_CHECKS=1 makes readers
# and resume skip them (verify still checks everything). Never set it to work around a damaged store.
ENABLED = os.environ.get("PQGPU_BENCH_SKIP_CHECKS") != "1"


def crc(values: Any, start: int = 0) -> int:
    """CRC-32C of an array's values: numbers as their little-endian bytes (uint8 codes, int64/uint64 ids,
    int32 lists, int64 rows), strings each as its UTF-8 length (4 bytes) and bytes."""
    import google_crc32c

    a = np.asarray(values)
    if a.dtype.kind in "iub":
        b = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).view(np.uint8).reshape(-1)
        return google_crc32c.extend(start, b) if b.size else start
    out = start
    for v in a.reshape(-1).tolist():
        s = str(v).encode()
        out = google_crc32c.extend(google_crc32c.extend(out, len(s).to_bytes(4, "little")), s)
    return out


@dataclass(frozen=True)
class Family:
    """Arrays of one chunk grid and the table that holds their CRCs: row c of `table` holds, per array of
    `arrays` (the table's `columns`), the CRC of that array's rows [c * grid, (c + 1) * grid)."""

    table: str  # path of the checksum table in the store group
    arrays: tuple[str, ...]  # paths of the protected arrays, in column order
    grid: int  # rows per chunk
    n: int  # rows of each array
    flags: str  # bool array: chunk c is written (its CRCs recorded)
    # (chunk, rows, ((array, crc), ...)): the CRCs of the committed partial last chunk, recorded at commit
    # (root attr `tail_crcs`), used for that chunk when it holds exactly `rows` rows: an append that completes
    # it rewrites its table row before the new rows are committed (pqgpu.append)
    tail: tuple | None = None

    def chunk_range(self, c: int) -> tuple[int, int]:
        return c * self.grid, min(self.n, (c + 1) * self.grid)

    @property
    def n_chunks(self) -> int:
        return max(1, -(-self.n // self.grid))


def chunk_family(group: Any, n: int | None = None) -> Family | None:
    """codes, ids (and lists) per encode chunk, over the committed rows (or n rows, for a writer); None for a
    format-1 store (1-D zlib checksums or none)."""
    if "checksums" not in group or group["checksums"].ndim != 2:
        return None
    a = group.attrs
    cols = tuple(group["checksums"].attrs["columns"])
    t = a.get("tail_crcs")
    tail = None if not t else (int(t["chunk"]), int(t["rows"]), tuple((k, int(v)) for k, v in t["crcs"].items()))
    return Family("checksums", cols, int(a["chunk_rows"]), int(a["n"]) if n is None else int(n), "done", tail)


def ivf_family(group: Any, node: str = "ivf") -> Family | None:
    """The inverted arrays of one layout (`ivf`, or an appended segment `ivf/segments/<name>`) per inverted
    chunk; None until the layout's arrays exist (or in a format-1 store)."""
    if node not in group or "checksums" not in group[node]:
        return None
    ivf = group[node]
    cols = tuple(f"{node}/{c}" for c in ivf["checksums"].attrs["columns"])
    n = int(ivf.attrs["n"]) if "n" in ivf.attrs else int(group.attrs["n"])
    return Family(f"{node}/checksums", cols, int(ivf.attrs["chunk_rows"]), n, f"{node}/copy_done")


def create_table(group: Any, path: str, n_chunks: int, columns: Sequence[str], rows_per_zarr_chunk: int = 1) -> None:
    """An empty checksum table (n_chunks, len(columns)) uint32; one Zarr chunk per writing task."""
    arr = group.create_array(path, shape=(n_chunks, len(columns)), chunks=(max(1, rows_per_zarr_chunk), len(columns)),
                             dtype="uint32", fill_value=0, overwrite=True)
    arr.attrs.update({"columns": list(columns), "algorithm": ALGORITHM})


def chunk_crcs(values: dict[str, Any], columns: Sequence[str]) -> np.ndarray:
    """One table row: the CRC of each column's values (uint32 (len(columns),))."""
    return np.array([crc(values[c]) for c in columns], np.uint32)


class Checker:
    """A family's recorded CRCs, loaded once, against which the values just read are compared."""

    def __init__(self, store_path: str, group: Any, family: Family, *, flags: bool = False):
        """flags: also load the family's written-flags, to tell a chunk never written from a damaged one
        (verify does; readers need not: a chunk never written fails its CRC all the same, the recorded one
        being 0 and no CRC-32C of real data being 0 but for 1 in 2**32)."""
        self.path = store_path
        self.family = family
        self.sums = np.asarray(group[family.table][...])
        self.flags = np.asarray(group[family.flags][...]) if flags else None
        if self.flags is not None and family.flags == "done" and group.attrs.get("generations"):
            # committed chunks are complete (an append under way, or killed, clears the flag of the partial
            # last chunk it rewrites; its committed rows are checked against tail_crcs)
            self.flags[:min(family.n_chunks, self.flags.shape[0])] = True
        self.columns = {name: j for j, name in enumerate(family.arrays)}
        self.tail = None if family.tail is None else (family.tail[0], family.tail[1], dict(family.tail[2]))

    def recorded(self, c: int, name: str) -> int:
        """The CRC recorded for chunk c of `name` (the committed tail's, for a partial last chunk)."""
        t = self.tail
        if t is not None and c == t[0] and name in t[2]:
            a, b = self.family.chunk_range(c)
            if b - a == t[1]:
                return int(t[2][name])
        return int(self.sums[c, self.columns[name]])

    def problems(self, name: str, lo: int, values: Any) -> list[tuple[int, str]]:
        """(chunk, reason) for each chunk of `name` whose rows [c*grid, ...) lie wholly in values (rows
        lo .. lo + len(values)) and differ from the recorded CRC (or were never recorded)."""
        f = self.family
        hi = lo + len(values)
        out = []
        for c in range(-(-lo // f.grid), f.n_chunks):
            a, b = f.chunk_range(c)
            if b > hi or a >= b:
                break
            if self.flags is not None and not self.flags[c]:
                out.append((c, "never completed (its write was interrupted)"))
                continue
            got = crc(values[a - lo:b - lo])
            want = self.recorded(c, name)
            if got != want:
                out.append((c, f"checksum mismatch (recorded {want:08x}, stored data gives {got:08x})"))
        return out

    def check(self, name: str, lo: int, values: Any) -> Any:
        """values as they are, or StoreError naming the damaged chunks and the way out."""
        bad = self.problems(name, lo, values) if ENABLED else []
        if bad:
            raise StoreError(damage_message(self.path, [(name, c, why, self.family.chunk_range(c)) for c, why in bad]))
        return values

    def values(self, arr: Any, name: str, a: int, b: int) -> np.ndarray:
        """arr[a:b] (whole chunks), or StoreError naming the chunks that cannot be decoded (a truncated or
        overwritten chunk file fails in its codec before any CRC can be taken)."""
        try:
            return np.asarray(arr[a:b])
        except Exception:  # find the chunks at fault, for the message
            bad = []
            g = self.family.grid
            for c in range(a // g, -(-b // g)):
                lo, hi = self.family.chunk_range(c)
                try:
                    arr[lo:hi]
                except Exception as exc:
                    bad.append((name, c, f"unreadable ({type(exc).__name__}: {exc})", (lo, hi)))
            if not bad:
                raise
            raise StoreError(damage_message(self.path, bad)) from None

    def read(self, arr: Any, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of arr, read as whole chunks so that each can be checked, then sliced."""
        g = self.family.grid
        a, b = (lo // g) * g, min(self.family.n, -(-hi // g) * g)
        values = self.values(arr, name, a, b)
        self.check(name, a, values)
        return values[lo - a:hi - a]

    def take(self, arr: Any, name: str, rows: np.ndarray) -> np.ndarray:
        """arr[rows] for sorted unique rows, reading (and checking) only the chunks that hold them."""
        g = self.family.grid
        out = []
        chunks = np.unique(rows // g)
        for c in chunks.tolist():
            a, b = self.family.chunk_range(c)
            values = self.check(name, a, self.values(arr, name, a, b))
            sel = rows[(rows >= a) & (rows < b)]
            out.append(values[sel - a])
        return np.concatenate(out) if out else np.asarray(arr[0:0])


VERIFY_BLOCK_BYTES = 64 << 20  # rows read per Zarr call by verify_family: many chunks, fetched concurrently


def verify_family(store_path: str, group: Any, family: Family, chunks: Sequence[int] | None = None
                  ) -> list[tuple[str, int, str, tuple[int, int]]]:
    """Read every flagged chunk (or the given ones) of every array of the family in large blocks, one read
    ahead, and compare each chunk with its CRC: [(array, chunk, why, (lo, hi))] for those that differ, are
    unreadable or were never completed."""
    import concurrent.futures

    checker = Checker(store_path, group, family, flags=True)
    todo = np.flatnonzero(checker.flags) if chunks is None else np.asarray(sorted(chunks), np.int64)
    arrays = {name: group[name] for name in family.arrays}
    row_bytes = sum(int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize if a.dtype.kind in "iub" else 64
                    for a in arrays.values())
    per_block = max(1, VERIFY_BLOCK_BYTES // max(1, row_bytes * family.grid))
    runs: list[tuple[int, int]] = []  # runs of consecutive chunks, at most per_block long
    for c in todo.tolist():
        if runs and c == runs[-1][1] and c - runs[-1][0] < per_block:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))

    def read(run: tuple[int, int]) -> dict[str, Any]:
        lo, hi = family.chunk_range(run[0])[0], family.chunk_range(run[1] - 1)[1]
        out = {}
        for name, arr in arrays.items():
            try:
                out[name] = checker.values(arr, name, lo, hi)
            except StoreError as exc:
                out[name] = exc
        return out

    bad: list[tuple[str, int, str, tuple[int, int]]] = []
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pqgpu-verify") as pool:
        pending = pool.submit(read, runs[0]) if runs else None
        for i, run in enumerate(runs):
            values = pending.result()
            if i + 1 < len(runs):
                pending = pool.submit(read, runs[i + 1])
            lo = family.chunk_range(run[0])[0]
            for name, v in values.items():
                if isinstance(v, StoreError):  # undecodable chunks: check the others one by one
                    for c in range(*run):
                        a, b = family.chunk_range(c)
                        try:
                            one = checker.values(arrays[name], name, a, b)
                        except StoreError:
                            bad.append((name, c, "unreadable (its chunk file cannot be decoded)", (a, b)))
                            continue
                        bad.extend((name, cc, why, family.chunk_range(cc)) for cc, why in checker.problems(name, a, one))
                    continue
                found = checker.problems(name, lo, v)
                wanted = set(range(*run))
                bad.extend((name, c, why, family.chunk_range(c)) for c, why in found if c in wanted)
    return sorted(bad, key=lambda t: (t[1], family.arrays.index(t[0])))


def damage_message(path: str, bad: list[tuple[str, int, str, tuple[int, int]]], limit: int = 10) -> str:
    """One paragraph: what is damaged (array, chunk, rows) and what to run."""
    items = [f"{name} chunk {c} (rows {a}-{b - 1}): {why}" for name, c, why, (a, b) in bad[:limit]]
    more = f"; and {len(bad) - limit} more" if len(bad) > limit else ""
    ivf = any(name.startswith("ivf/") for name, *_ in bad)
    fix = ("Run `pqgpu encode` with the same config: it re-encodes damaged chunks of codes, ids and lists and "
           "rebuilds a damaged inverted layout" + (" (here the inverted layout)" if ivf else "") +
           f"; `pqgpu verify {path}` lists everything that is damaged.")
    return f"The code store {path} is damaged: {'; '.join(items)}{more}. Its results would be wrong. {fix}"


def offsets_crc(offsets: np.ndarray) -> int:
    return crc(np.asarray(offsets, dtype=np.int64))


def check_offsets(path: str, ivf: Any, offsets: np.ndarray) -> np.ndarray:
    """ivf/offsets as read, or StoreError when they differ from the CRC recorded when they were written."""
    want = ivf.attrs.get("offsets_crc32c")
    if ENABLED and want is not None and offsets_crc(offsets) != int(want):
        raise StoreError(f"The code store {path} is damaged: ivf/offsets (where each inverted list starts) differ from "
                         "what was written. Search would read the wrong rows for every list. Run `pqgpu encode` "
                         f"with the same config to rebuild the inverted layout (`pqgpu verify {path}` for a full "
                         "check).")
    return offsets


def codebook_problem(store_path: str, recorded: str | None, got: str) -> str | None:
    """The message for a codebook whose sha256 differs from the one recorded when the store was made."""
    if recorded is None or recorded == got:
        return None
    return (f"The code store {store_path} is damaged: its codebook (codebook/centroids, rotation, coarse) has "
            f"sha256 {got[:16]}…, not the {recorded[:16]}… recorded when it was made, so its codes would be decoded "
            "and searched with other centroids than they were encoded with. Run `pqgpu encode` with the config "
            "that made it: its quantizer file (quantizer.path, sha256 "
            f"{recorded[:16]}…) restores the codebook; without that file the store must be encoded again "
            "(`pqgpu run --overwrite`).")
