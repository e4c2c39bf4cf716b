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
        self.sums = whole(group[family.table])
        self.flags = whole(group[family.flags]) if flags else None
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
            raw = plain_chunks(arr, a, b, self.family.grid)
            return np.asarray(arr[a:b]) if raw is None else raw
        except Exception:  # find the chunks at fault, for the message
            bad = []
            g = self.family.grid
            for c in range(a // g, -(-b // g)):
                lo, hi = self.family.chunk_range(c)
                try:
                    if plain_chunks(arr, lo, hi, g) is None:
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


def _plain_dir(arr: Any) -> Any:
    """The directory of a local array whose chunk files hold exactly its values' bytes (no compressor or
    filter, one byte per value or little-endian, regular chunks over rows only), else None."""
    try:
        from pathlib import Path

        from zarr.storage import LocalStore

        store = arr.store_path.store
        if not isinstance(store, LocalStore) or arr.filters or len(arr.compressors) > 1 or \
                (arr.compressors and type(arr.compressors[0]).__name__ != "ZstdCodec"):
            return None
        if arr.dtype.itemsize > 1 and getattr(arr.serializer, "endian", None) is None:
            return None
        if tuple(arr.chunks[1:]) != tuple(arr.shape[1:]) or type(arr.serializer).__name__ != "BytesCodec":
            return None
        return Path(store.root) / arr.store_path.path
    except Exception:  # another zarr layout: read through zarr
        return None


PLAIN_READ_THREADS = 4


class _PlainFiles:
    """The chunk files of a plain local array (see _plain_dir), read without Zarr: raw bytes, or zstd frames
    (zarr's ZstdCodec writes plain frames, which decode without knowing the level)."""

    def __init__(self, arr: Any, root: Any):
        self.arr, self.root = arr, root
        self.dtype = np.dtype(arr.dtype)
        self.row_shape = tuple(arr.shape[1:])
        self.per_row = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.zstd = None
        if arr.compressors:
            from numcodecs import Zstd

            self.zstd = Zstd()

    def key(self, c: int) -> str:
        return self.arr.metadata.encode_chunk_key((c,) + (0,) * len(self.row_shape))

    def read_into(self, c: int, rows: int, dst: np.ndarray) -> int:
        """The values of chunk c's first `rows` rows into dst (uint8, at least that many bytes); returns the
        bytes read (fewer: the file is short). FileNotFoundError when the chunk file is gone."""
        want = rows * self.per_row
        with open(self.root / self.key(c), "rb", buffering=0) as f:
            if self.zstd is None:
                return f.readinto(memoryview(dst)[:want])
            raw = np.frombuffer(self.zstd.decode(f.read()), np.uint8)
            got = min(raw.size, want)
            dst[:got] = raw[:got]
            return got


def plain_chunks(arr: Any, a: int, b: int, grid: int) -> np.ndarray | None:
    """arr[a:b] (a chunk-aligned range of whole chunks) read straight from the chunk files of a plain local
    array (see _plain_dir: raw or zstd-compressed values), skipping Zarr's codec pipeline, several files at
    once; None when the array is not plain. Zarr's own path costs several times the file reads for many
    small chunks (pqgpu.bench.integrity); this one reads at about the file system's rate plus zstd's. A
    missing file reads as fill values, as in Zarr."""
    root = _plain_dir(arr)
    if root is None or a % grid or arr.chunks[0] != grid:
        return None
    import concurrent.futures

    files = _PlainFiles(arr, root)
    out = np.empty((b - a, *files.row_shape), files.dtype)
    flat = out.reshape(-1).view(np.uint8)

    def read(c: int) -> None:
        lo, hi = c * grid, min(b, (c + 1) * grid)
        try:
            got = files.read_into(c, hi - lo, flat[(lo - a) * files.per_row:(hi - a) * files.per_row])
        except FileNotFoundError:
            out[lo - a:hi - a] = arr.fill_value
            return
        if got != (hi - lo) * files.per_row:
            raise ValueError(f"chunk file {files.key(c)} holds {got} bytes where {(hi - lo) * files.per_row} were "
                             "expected (truncated?)")

    chunks = list(range(a // grid, -(-b // grid)))
    if len(chunks) == 1:
        read(chunks[0])
        return out
    with concurrent.futures.ThreadPoolExecutor(min(PLAIN_READ_THREADS, len(chunks))) as pool:
        list(pool.map(lambda part: [read(c) for c in part], _batches(chunks)))
    return out


def whole(arr: Any) -> np.ndarray:
    """All of a small per-chunk table (done flags, checksums): one file per task makes it many tiny chunk
    files, which plain_chunks reads straight and several at once, instead of one Zarr call each."""
    got = plain_chunks(arr, 0, int(arr.shape[0]), int(arr.chunks[0])) if arr.ndim and arr.shape[0] else None
    return np.asarray(arr[...]) if got is None else got


VERIFY_BLOCK_BYTES = 64 << 20  # rows read per Zarr call by verify_family: many chunks, fetched concurrently


def stream_crcs(arr: Any, chunks: Sequence[int], family: Family) -> dict[int, Any]:
    """{chunk: CRC of its values, or the error reading it} for a plain local array (see _plain_dir), each
    chunk file read into a buffer that is reused (and decompressed where it is zstd), on a few threads: no
    array of the values is ever built, so verify reads at about the rate of the files themselves."""
    import concurrent.futures
    import threading

    files = _PlainFiles(arr, _plain_dir(arr))
    local = threading.local()

    def one(c: int) -> tuple[int, Any]:
        lo, hi = family.chunk_range(c)
        want = (hi - lo) * files.per_row
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = np.empty(family.grid * files.per_row, np.uint8)
        try:
            got = files.read_into(c, hi - lo, buf)
        except FileNotFoundError:
            # the fill values Zarr would read; their CRC equals the recorded one only if nothing was lost
            filled = crc(np.full((hi - lo, *files.row_shape), arr.fill_value, files.dtype))
            return c, (filled, f"its chunk file {files.key(c)} is missing")
        except Exception as exc:  # a damaged compressed chunk
            return c, exc
        if got != want:
            return c, ValueError(f"its chunk file holds {got} bytes of values where {want} were expected")
        return c, crc(buf[:got])

    def batch(part: Sequence[int]) -> list[tuple[int, Any]]:
        return [one(c) for c in part]

    with concurrent.futures.ThreadPoolExecutor(PLAIN_READ_THREADS, thread_name_prefix="pqgpu-verify") as pool:
        return {c: got for part in pool.map(batch, _batches(list(chunks))) for c, got in part}


def _batches(items: list, per_thread: int = 4) -> list[list]:
    """items cut into about PLAIN_READ_THREADS * per_thread contiguous runs: a thread takes a run of small
    files at a time, not one file per hand-off (thousands of hand-offs cost more than the files)."""
    n = max(1, min(len(items), PLAIN_READ_THREADS * per_thread))
    step = -(-len(items) // n) if items else 1
    return [items[i:i + step] for i in range(0, len(items), step)]


def verify_family(store_path: str, group: Any, family: Family, chunks: Sequence[int] | None = None
                  ) -> list[tuple[str, int, str, tuple[int, int]]]:
    """Read every flagged chunk (or the given ones) of every array of the family and compare each chunk with
    its CRC: [(array, chunk, why, (lo, hi))] for those that differ, are unreadable or were never completed.
    Plain local arrays stream their chunk files (stream_crcs); others are read through Zarr in large blocks,
    one read ahead."""
    import concurrent.futures

    checker = Checker(store_path, group, family, flags=True)
    todo = np.flatnonzero(checker.flags) if chunks is None else np.asarray(sorted(chunks), np.int64)
    arrays = {name: group[name] for name in family.arrays}
    bad: list[tuple[str, int, str, tuple[int, int]]] = []
    unflagged = [int(c) for c in todo if not checker.flags[c]]
    bad.extend((name, c, "never completed (its write was interrupted)", family.chunk_range(c))
               for c in unflagged for name in arrays)
    todo = [int(c) for c in todo if checker.flags[c]]
    slow = {}
    for name, arr in arrays.items():
        if _plain_dir(arr) is None or arr.chunks[0] != family.grid:
            slow[name] = arr
            continue
        for c, got in stream_crcs(arr, todo, family).items():
            want = checker.recorded(c, name)
            if isinstance(got, tuple):  # a missing file: lost data unless the chunk was all fill values
                if got[0] != want:
                    bad.append((name, c, got[1], family.chunk_range(c)))
            elif isinstance(got, Exception):
                bad.append((name, c, f"unreadable ({type(got).__name__}: {got})", family.chunk_range(c)))
            elif got != want:
                bad.append((name, c, f"checksum mismatch (recorded {want:08x}, stored data "
                                     f"gives {got:08x})", family.chunk_range(c)))
    if slow:
        row_bytes = sum(int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize if a.dtype.kind in "iub"
                        else 64 for a in slow.values())
        per_block = max(1, VERIFY_BLOCK_BYTES // max(1, row_bytes * family.grid))
        runs: list[tuple[int, int]] = []  # runs of consecutive chunks, at most per_block long
        for c in todo:
            if runs and c == runs[-1][1] and c - runs[-1][0] < per_block:
                runs[-1] = (runs[-1][0], c + 1)
            else:
                runs.append((c, c + 1))

        def read(run: tuple[int, int]) -> dict[str, Any]:
            lo, hi = family.chunk_range(run[0])[0], family.chunk_range(run[1] - 1)[1]
            out = {}
            for name, arr in slow.items():
                try:
                    out[name] = checker.values(arr, name, lo, hi)
                except StoreError as exc:
                    out[name] = exc
            return out

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
                                one = checker.values(slow[name], name, a, b)
                            except StoreError:
                                bad.append((name, c, "unreadable (its chunk file cannot be decoded)", (a, b)))
                                continue
                            bad.extend((name, cc, why, family.chunk_range(cc))
                                       for cc, why in checker.problems(name, a, one))
                        continue
                    bad.extend((name, c, why, family.chunk_range(c)) for c, why in checker.problems(name, lo, v))
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


def stored_keys(arr: Any) -> set[str]:
    """Keys of the chunk objects an array holds in its store (relative to the array)."""
    from zarr.core.sync import sync

    sp = arr.store_path
    prefix = sp.path.rstrip("/") + "/" if sp.path else ""

    async def listing() -> list[str]:
        return [k async for k in sp.store.list_prefix(prefix)]

    return {k[len(prefix):] for k in sync(listing())}


# -- an IVF store's inverted layout: its state (pqgpu info, verify, resume) ----------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """One inverted layout of an IVF store: the group `node` (`ivf` for the layout of the first encode,
    `ivf/segments/<name>` for an append's segment or a compaction) holding store rows [lo, hi) by list."""

    node: str
    lo: int
    hi: int

    @property
    def n(self) -> int:
        return self.hi - self.lo


def layouts(store: Any) -> list[Layout]:
    """The committed inverted layouts, in row order (root attr `ivf_layouts`; before any append: `ivf`)."""
    recorded = store.group.attrs.get("ivf_layouts")
    if not recorded:
        return [Layout("ivf", 0, int(store.group.attrs["n"]))]
    return [Layout(str(node), int(lo), int(hi)) for node, lo, hi in recorded]


def layout_state(store: Any) -> str:
    """Cheap (flags, offsets and listings, no data read), over every committed layout: `built`,
    `building (...)`, `not built` or `damaged (...)`."""
    states = [node_state(store, lay) for lay in layouts(store)]
    for kind in ("damaged", "building", "not built"):
        found = [st for st in states if st.startswith(kind)]
        if found:
            return found[0]
    return "built"


def node_state(store: Any, layout: Layout) -> str:
    if layout.node not in store.group:
        return "not built"
    ivf = store.group[layout.node]
    a = ivf.attrs
    if not a.get("complete"):
        if not a.get("starts_done") or "copy_done" not in ivf:
            return "not built"
        scattered = int(whole(ivf["scatter_done"]).sum())
        copied = int(whole(ivf["copy_done"]).sum())
        where = "" if layout.node == "ivf" else f" of {layout.node}"
        return (f"building (interrupted or running{where}: scatter {scattered}/{ivf['scatter_done'].shape[0]} "
                f"chunks, copy {copied}/{ivf['copy_done'].shape[0]})")
    problems = _cheap_problems(store, layout)
    return "built" if not problems else f"damaged ({'; '.join(problems[:3])}{' …' if len(problems) > 3 else ''})"


def _cheap_problems(store: Any, layout: Layout | None = None) -> list[str]:
    layout = layout or layouts(store)[0]
    node = layout.node
    ivf = store.group[node]
    out = []
    for name in ("offsets", "codes", "rows", "ids", "copy_done"):
        if name == "ids" and store.ids.dtype.kind not in "iu":
            continue
        if name not in ivf:
            out.append(f"{node}/{name} is missing")
    if out:
        return out
    if not whole(ivf["copy_done"]).all():
        out.append(f"{node}/copy_done says some inverted chunks were never copied")
    offsets = np.asarray(ivf["offsets"][...])
    try:
        check_offsets(store.path, ivf, offsets)
    except StoreError:
        out.append(f"{node}/offsets differ from what was written")
    if offsets[-1] != layout.n:
        out.append(f"{node}/offsets end at {int(offsets[-1])}, not at the layout's {layout.n} rows")
    icr = int(ivf.attrs["chunk_rows"])
    for name in ("codes", "rows", "ids"):
        if name not in ivf:
            continue
        arr = ivf[name]
        keys = stored_keys(arr)
        missing = [j for j in range(-(-layout.n // icr))
                   if arr.metadata.encode_chunk_key((j, 0) if arr.ndim == 2 else (j,)) not in keys]
        if missing:
            out.append(f"{node}/{name} has lost {len(missing)} chunk file(s) (chunk "
                       f"{', '.join(map(str, missing[:5]))}{' …' if len(missing) > 5 else ''})")
    return out


def verify_layout(store: Any) -> tuple[str, list[tuple[str, int, str, tuple[int, int]]]]:
    """(state, damaged chunks as (array, chunk, why, (lo, hi))): reads every inverted chunk of every built
    layout and compares it with its CRC (presence only for a layout built without CRCs)."""
    state = layout_state(store)
    bad: list[tuple[str, int, str, tuple[int, int]]] = []
    for lay in layouts(store):
        bad += verify_node(store, lay)
    if bad and state == "built":
        state = f"damaged ({len(bad)} problem(s))"
    return state, bad


def verify_node(store: Any, layout: Layout) -> list[tuple[str, int, str, tuple[int, int]]]:
    if layout.node not in store.group:
        return []
    ivf = store.group[layout.node]
    if not ivf.attrs.get("complete") or "copy_done" not in ivf or "offsets" not in ivf:
        return []
    family = ivf_family(store.group, layout.node)
    if family is None:
        return [(p, -1, "", (0, 0)) for p in _cheap_problems(store, layout)]
    bad = list(verify_family(store.path, store.group, family, range(family.n_chunks)))
    try:
        check_offsets(store.path, ivf, np.asarray(ivf["offsets"][...]))
    except StoreError:
        bad.append((f"{layout.node}/offsets", 0, "differ from what was written (CRC mismatch)", (0, 0)))
    return bad
