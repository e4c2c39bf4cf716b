"""Appending new source files to an existing store (`pqgpu run --append`): new rows at the end, encoded with the
store's own codebook, each append one generation.

The committed state is the root attrs `n`, `source`, `generations`, `tail_crcs` and (IVF) `ivf_layouts`,
written in one metadata write at the end (Zarr's LocalStore writes every document and chunk to a temporary
file and renames it into place, so a reader sees the old document or the new one). Readers bound everything
by it, so while an append runs they see the previous complete state:

1. intent: the arrays grow (`codes`, `ids`, `lists`, `done`, `checksums`, `ivf/counts`; the chunk grid stays:
   chunk i is rows [i * chunk_rows, ...)), the done flags from the first chunk the append writes are cleared,
   and `appending` records the target (rows, source fingerprint). Before that, `tail_crcs` records the CRCs
   of the committed partial last chunk, which readers use for it while the append rewrites its table row;
2. encode: the pending chunks, through the same tasks as `encode`. The partial last chunk is completed by a
   task that keeps its rows' codes, ids and lists as stored (read back and checked against `tail_crcs`) and
   encodes only the new rows: old rows are never encoded again, so their codes cannot change;
3. IVF: an inverted segment `ivf/segments/<generation>` of the new rows only (pqgpu.invert.build_layout:
   the same resumable count-scatter-copy), so the cost follows the new rows; `pqgpu compact` merges them;
4. commit.
Each step is resumable: the same command after a kill at any point ends in the same store.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _fs, integrity
from ._faults import fault_point
from .errors import InputError, StoreError
from .store import CodeStore, Layout, _mismatches, is_ivf_store, layouts, open_store, versions

log = logging.getLogger(__name__)

# the arrays of one chunk grid that an append grows: name -> rows per encode chunk's row (1) or per chunk (0)
_ROW_ARRAYS = ("codes", "ids", "lists")
_CHUNK_ARRAYS = ("done", "checksums", "ivf/counts")


@dataclass
class AppendPlan:
    store: CodeStore  # a writer's view over n1 rows
    n0: int  # committed rows
    n1: int  # rows after the append
    keep: dict[int, int]  # chunk -> rows at its start already in the store (kept, not encoded again)
    files: list[str]
    generation: int
    segment: Layout | None  # IVF: the inverted segment of rows [n0, n1)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _refuse(path: str, why: str, fix: str) -> StoreError:
    return StoreError(f"Refusing to append to the code store {path}: {why}. Nothing was changed. {fix}")


def prepare_append(path: str, *, codebook: Any, source: Any, chunk_rows: int) -> AppendPlan | None:
    """Check that `source` is the store's source plus new files at the end, then grow the store for them
    (or find the append a killed run left); None when there are no new files. StoreError / InputError (store
    untouched) for everything an append cannot follow."""
    from .sources.fingerprint import compare

    fp = source.fingerprint()
    if not _fs.exists(path):
        raise StoreError(f"--append: there is no code store at {path} to append to. Run the same command without "
                         "--append to create it.")
    try:
        store = open_store(path, mode="r+")
    except StoreError:
        raise StoreError(f"--append: {path} exists but is not a pqgpu code store. Point encode.output at the store "
                         "to append to.") from None
    g, a = store.group, store.attrs
    problems = _mismatches(store, codebook, chunk_rows)
    if problems:
        raise _refuse(path, "; ".join(problems), "Append with the quantizer file and encode.chunk_rows the store "
                      "was made with (its codebook is what the new rows must be encoded with), or pass --overwrite "
                      "to encode the whole source again.")
    if integrity.chunk_family(g) is None:
        raise _refuse(path, "it was written by an older pqgpu (store format 1, without per-array checksums)",
                      "Encode it again with `pqgpu run --overwrite` (format 2), then append.")
    if np.dtype(source.id_dtype) != store.ids.dtype:
        raise _refuse(path, f"the new files' ids are {np.dtype(source.id_dtype)}, the store's are {store.ids.dtype}",
                      "Give the new files ids of the store's type (source.id_column).")
    diff = compare(a.get("source"), fp)
    if diff.refused:
        raise _refuse(path, diff.refused, "An append adds new files after the ones the store was made from, with "
                      "the same format, columns and dimension. Restore the source, or pass --overwrite to encode "
                      "the whole source again into a fresh store.")
    if diff.changed:
        names = [fp["files"][i]["path"] for i in diff.changed]
        raise _refuse(path, f"{len(names)} file(s) it was made from changed since (size, mtime or content): "
                      f"{', '.join(names[:5])}{' …' if len(names) > 5 else ''}",
                      "An append only adds rows; restore those files, or run the same command without --append "
                      "and without the new files to encode the changed files' chunks again, or pass --overwrite.")
    intent = a.get("appending")
    if not diff.added:
        if intent:  # the new files of a killed append are gone: the committed state is intact
            g.attrs["appending"] = None
            log.warning("%s: the files of an interrupted append are no longer in the source; abandoned it (the "
                        "store is as it was before it)", path)
        return None
    if not a.get("generations") and not (store.is_complete() and _layouts_built(store)):
        raise _refuse(path, "it is not complete (an encode was interrupted), and new rows cannot follow rows that "
                      "are not there yet", "Finish it first with the command that made it, without --append and "
                      "with the source it was made from (move the new files aside for that run), then append.")
    cr = store.chunk_rows
    n0, n1 = store.n, int(source.n)
    gens = list(a.get("generations") or [_first_generation(store)])
    if intent and intent.get("source") != fp:
        log.warning("%s: the new files differ from those of the interrupted append; starting the append again", path)
        intent = None
    generation = len(gens) if not intent else int(intent["generation"])
    segment = Layout(f"ivf/segments/{generation}", n0, n1) if is_ivf_store(store) else None
    if not intent:
        _grow(store, fp, gens, n0, n1, diff.added, generation, segment)
    keep = {n0 // cr: n0 % cr} if n0 % cr else {}
    return AppendPlan(CodeStore(path, g, writing=n1), n0, n1, keep, list(diff.added), generation, segment)


def _layouts_built(store: CodeStore) -> bool:
    if not is_ivf_store(store):
        return True
    return all(lay.node in store.group and store.group[lay.node].attrs.get("complete") for lay in layouts(store))


def _first_generation(store: CodeStore) -> dict[str, Any]:
    """Generation 0 of a store made before generations were recorded: its files and rows."""
    a = store.attrs
    runs = a.get("encode_runs") or [{}]
    return {"generation": 0, "files": [e["path"] for e in (a.get("source") or {}).get("files", [])],
            "rows": [0, store.n], "finished": runs[-1].get("finished"), "versions": a.get("created_by"),
            "workers": runs[-1].get("workers", {})}


def _grow(store: CodeStore, fp: dict[str, Any], gens: list[dict[str, Any]], n0: int, n1: int, files: list[str],
          generation: int, segment: Layout | None) -> None:
    """Step 1 (see the module docstring): attrs of the committed state first, then the arrays, then the intent."""
    g = store.group
    cr = store.chunk_rows
    pre: dict[str, Any] = {}
    if not store.attrs.get("generations"):
        pre["generations"] = gens
    if n0 % cr and not store.attrs.get("tail_crcs"):
        pre["tail_crcs"] = _tail_crcs(g, n0, cr)
    if segment is not None and not store.attrs.get("ivf_layouts"):
        pre["ivf_layouts"] = [[lay.node, lay.lo, lay.hi] for lay in layouts(store)]
        if "n" not in g["ivf"].attrs:
            g["ivf"].attrs.update({"lo": 0, "n": n0})
    if pre:
        g.attrs.update(pre)
    _rechunk(g, cr)
    chunks = max(1, -(-n1 // cr))
    for name in _ROW_ARRAYS:
        if name in g:
            arr = g[name]
            arr.resize((n1,) + tuple(arr.shape[1:]))
    for name in _CHUNK_ARRAYS:
        if name in g:
            arr = g[name]
            arr.resize((chunks,) + tuple(arr.shape[1:]))
    g["done"][n0 // cr:chunks] = False
    if segment is not None and segment.node in g:  # left by an abandoned append
        del g[segment.node]
    fault_point("append-grown", generation)
    g.attrs["appending"] = {"generation": generation, "n": n1, "from_n": n0, "files": files, "source": fp,
                            "started": _now()}


def _tail_crcs(g: Any, n0: int, cr: int) -> dict[str, Any]:
    c = n0 // cr
    cols = list(g["checksums"].attrs["columns"])
    row = np.asarray(g["checksums"][c])
    return {"chunk": c, "rows": n0 - c * cr, "crcs": {k: int(v) for k, v in zip(cols, row)}}


def _rechunk(g: Any, cr: int) -> None:
    """A store smaller than one chunk has Zarr chunks of its n rows; give codes, ids and lists chunks of
    chunk_rows (the encode grid), through a copy kept until the new array is written (a kill in between
    finds the copy and starts again from it)."""
    for name in _ROW_ARRAYS:
        tmp = f"{name}.rechunk"
        have_copy = tmp in g and g[tmp].attrs.get("complete")
        if not have_copy and (name not in g or g[name].chunks[0] == cr):
            continue
        if not have_copy:
            src = g[name]
            kw = {"fill_value": src.fill_value, "dtype": src.dtype}
            if name == "codes":
                kw["compressors"] = None
            copy = g.create_array(tmp, shape=src.shape, chunks=src.shape, overwrite=True, **kw)
            copy[...] = src[...]
            copy.attrs["complete"] = True
        src = g[tmp]
        kw = {"fill_value": src.fill_value, "dtype": src.dtype}
        if name == "codes":
            kw["compressors"] = None
        with __import__("zarr").config.set({"array.write_empty_chunks": True}):
            g.create_array(name, shape=src.shape, chunks=(cr,) + tuple(src.shape[1:]), overwrite=True, **kw)[...] = \
                src[...]
        del g[tmp]


def read_kept(path: str, chunk: int, start: int, rows: int, with_lists: bool) -> dict[str, np.ndarray]:
    """The codes, ids (and lists) of the rows already in a partial last chunk, checked against the CRCs
    recorded for them when they were committed (`tail_crcs`)."""
    import zarr

    g = zarr.open_group(path, mode="r")
    tail = g.attrs.get("tail_crcs") or {}
    out = {"codes": np.asarray(g["codes"][start:start + rows]), "ids": np.asarray(g["ids"][start:start + rows])}
    if with_lists:
        out["lists"] = np.asarray(g["lists"][start:start + rows])
    if int(tail.get("chunk", -1)) != chunk or int(tail.get("rows", -1)) != rows:
        raise StoreError(f"{path}: the CRCs of the {rows} rows already in chunk {chunk} are not recorded "
                         "(tail_crcs), so they cannot be kept safely. Run `pqgpu verify` on the store.")
    bad = [k for k, v in out.items() if k in tail["crcs"] and integrity.crc(v) != int(tail["crcs"][k])]
    if bad:
        raise StoreError(integrity.damage_message(path, [(k, chunk, "checksum mismatch", (start, start + rows))
                                                         for k in bad]))
    return out


def check_ids(plan: AppendPlan, source: Any, *, strict: bool, client: Any = None) -> list[Any] | None:
    """The duplicate-id check of an append, at a cost that follows the new rows: their ids against each other,
    then against the stored rows of only those generations whose id range (recorded at commit) overlaps theirs,
    so ids that grow from one append to the next are never read back. Warns, or raises InputError when strict
    (pqgpu.ids.report); returns the new ids' [smallest, largest] (None for string ids) for the generation."""
    from .ids import chunked, report, scan_ids

    store = plan.store
    new = chunked(store, plan.n0, plan.n1)
    scan = scan_ids(store, ranges=new, client=client)
    older = [gen for gen in store.attrs.get("generations") or [_first_generation(store)]
             if scan.lo is None or not gen.get("id_range")
             or not (scan.hi < gen["id_range"][0] or gen["id_range"][1] < scan.lo)]
    if older and not scan.n_dup:
        ranges = [r for gen in older for r in chunked(store, *gen["rows"])]
        log.info("%s: the new ids' range overlaps %d earlier generation(s): checking them against %s stored ids",
                 store.path, len(older), f"{sum(hi - lo for lo, hi in ranges):,}")
        scan = scan_ids(store, ranges=ranges + new, client=client)._replace(lo=scan.lo, hi=scan.hi)
    report(scan, store, source, strict=strict)
    return None if scan.lo is None else [scan.lo, scan.hi]


def commit(plan: AppendPlan, backends: dict[str, str], id_range: list[Any] | None = None) -> None:
    """Step 4: one write of the root attrs makes the new rows (and segment) visible to readers."""
    store = plan.store
    g, a = store.group, store.attrs
    cr = store.chunk_rows
    fp = a["appending"]["source"]
    gen = {"generation": plan.generation, "files": plan.files, "rows": [plan.n0, plan.n1], "finished": _now(),
           "versions": versions(), "backend": sorted(set(backends.values())), "workers": backends,
           "id_range": id_range}
    update: dict[str, Any] = {"n": plan.n1, "source": fp, "generations": list(a.get("generations") or []) + [gen],
                              "tail_crcs": _tail_crcs(g, plan.n1, cr) if plan.n1 % cr else None, "appending": None}
    if plan.segment is not None:
        seg = plan.segment
        update["ivf_layouts"] = [list(x) for x in a.get("ivf_layouts") or []] + [[seg.node, seg.lo, seg.hi]]
    fault_point("append-commit", plan.generation)
    g.attrs.update(update)
    log.info("%s: generation %d committed: rows %d-%d from %d new file(s)", store.path, plan.generation, plan.n0,
             plan.n1 - 1, len(plan.files))


def record_first_generation(store: CodeStore, backends: dict[str, str], id_range: list[Any] | None = None) -> None:
    """After the first encode completes: generation 0 (with its ids' [smallest, largest], which lets an append
    skip reading them back) and the CRCs of its partial last chunk, so that a later append finds them (a no-op
    once recorded)."""
    a = store.attrs
    if a.get("generations") or a.get("appending"):
        return
    cr = store.chunk_rows
    gen = {**_first_generation(store), "finished": _now(), "versions": versions(),
           "backend": sorted(set(backends.values())), "workers": backends, "id_range": id_range}
    update: dict[str, Any] = {"generations": [gen]}
    if store.n % cr and integrity.chunk_family(store.group) is not None:
        update["tail_crcs"] = _tail_crcs(store.group, store.n, cr)
    store.group.attrs.update(update)


def check_new_dimension(source: Any, d: int, path: str) -> None:
    if source.d != d:
        raise InputError(f"--append: the new files have vectors of d={source.d}, the store {path} holds d={d}. "
                         "Append files of the store's dimension.")


def compact(path: str, *, client: Any = None) -> int:
    """`pqgpu compact STORE`: merge an IVF store's inverted segments into one layout of all rows, built into a
    new node by the same resumable count-scatter-copy as a one-shot build (so it equals one), then committed
    in one write of the root attrs and the old layouts deleted. Returns the number of layouts merged (0:
    nothing to do)."""
    from .invert import build_layout
    from .store import exclusive_lock

    with exclusive_lock(path):
        store = open_store(path, mode="r+")
        g, a = store.group, store.attrs
        if not is_ivf_store(store):
            raise StoreError(f"{path} is not an IVF store (it was encoded with quantizer.nlist: 0): there are no "
                             "inverted segments to compact.")
        if a.get("appending"):
            raise StoreError(f"{path}: an append is interrupted or running; finish it first (the same "
                             "`--append` command), then compact.")
        current = layouts(store)
        target = f"ivf/segments/compact-{store.n}"
        _drop_stale(g, {lay.node for lay in current} | {target})
        if len(current) <= 1:
            return 0
        layout = Layout(target, 0, store.n)
        build_layout(store, layout, client=client)
        fault_point("compact-commit", len(current))
        g.attrs["ivf_layouts"] = [[layout.node, layout.lo, layout.hi]]
        _drop_stale(g, {target})
        log.info("%s: %d inverted layouts compacted into %s", path, len(current), target)
        return len(current)


def _drop_stale(g: Any, keep: set[str]) -> None:
    """Delete inverted layouts no committed state refers to (the base arrays of `ivf/` keep `ivf/counts`)."""
    if "ivf" not in keep:
        for name in ("offsets", "codes", "rows", "ids", "scatter_done", "copy_done", "checksums"):
            if name in g["ivf"]:
                del g["ivf"][name]
        g["ivf"].attrs.update({"complete": False, "starts_done": False, "n": 0})
    if "segments" in g["ivf"]:
        for name in list(g["ivf/segments"].group_keys()):
            if f"ivf/segments/{name}" not in keep:
                del g["ivf/segments"][name]
