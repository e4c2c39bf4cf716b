"""The shard writer: decoded blocks become Parquet row groups on a background thread.

Each shard is written to a temporary file, fsynced and renamed into place when closed, so a shard file
under its final name is always complete. Files hold the id column (int64 or string) and the vector
column as ``fixed_size_list<float32>[d]``, named as in the database, which the parquet source reads directly.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future

from ..._faults import fault_point
from ...errors import StoreError
from .copy_rows import Block


def block_rows(d: int, limit: int) -> int:
    """Rows per row group / block: about 16 MiB of float32, at least 256 rows, at most the shard."""
    return max(1, min(limit, max(256, (16 << 20) // (4 * max(d, 1)))))


class ShardWriter:
    """Background thread writing blocks as Parquet row groups, one shard file at a time.

    Messages are processed in order; block buffers come from a small pool and go back to it once
    written, so memory is bounded by the pool (not by the shard size) and the parser blocks (instead of
    growing memory) when the writer falls behind.
    """

    def __init__(self, *, d: int, block_rows: int, string_ids: bool, id_col: str, vec_col: str, pool: int = 4):
        import pyarrow as pa

        self.d, self.block_rows, self.string_ids, self.pool_size = d, block_rows, string_ids, pool
        self.schema = pa.schema([pa.field(id_col, pa.string() if string_ids else pa.int64(), nullable=False),
                                 pa.field(vec_col, pa.list_(pa.float32(), d), nullable=False)])
        self.id_col = id_col
        self.free: queue.Queue[Block] = queue.Queue()
        self.made = 0
        self.q: queue.Queue = queue.Queue()
        self.err: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="pqgpu-pg-writer", daemon=True)
        self.thread.start()

    # -- main-thread side --------------------------------------------------------------------------
    def check(self) -> None:
        if self.err is not None:
            raise self.err

    def get_block(self) -> Block:
        self.check()
        try:
            return self.free.get_nowait()
        except queue.Empty:
            pass
        if self.made < self.pool_size:
            self.made += 1
            return Block(self.block_rows, self.d, self.string_ids)
        while True:
            try:
                return self.free.get(timeout=0.5)
            except queue.Empty:
                self.check()

    def put_block(self, shard: dict, block: Block) -> None:
        self.check()
        self.q.put(("block", shard, block))

    def close_shard(self, shard: dict) -> Future:
        fut: Future = Future()
        self.q.put(("close", shard, fut))
        return fut

    def abort_shard(self, shard: dict) -> None:
        self.q.put(("abort", shard, None))

    def stop(self) -> None:
        self.q.put(None)
        self.thread.join()

    # -- writer thread -----------------------------------------------------------------------------
    def recycle(self, block: Block) -> None:
        block.n = 0
        if self.string_ids:
            block.ids = []
        self.free.put(block)

    def _run(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = None
        while True:
            item = self.q.get()
            if item is None:
                break
            kind, shard, arg = item
            try:
                if self.err is not None:
                    raise self.err
                if kind == "block":
                    block: Block = arg
                    if writer is None:
                        writer = pq.ParquetWriter(shard["tmp"], self.schema, compression="snappy",
                                                  use_dictionary=[self.id_col], write_statistics=[self.id_col])
                    n = block.n
                    ids = pa.array(block.ids, type=pa.string()) if self.string_ids else pa.array(block.ids[:n])
                    vecs = pa.FixedSizeListArray.from_arrays(pa.array(block.vecs[:n].reshape(-1)), self.d)
                    table = pa.Table.from_arrays([ids, vecs], schema=self.schema)
                    writer.write_table(table, row_group_size=max(n, 1))
                    del table, ids, vecs
                elif kind == "close":
                    if writer is not None:
                        writer.close()
                        writer = None
                    fd = os.open(shard["tmp"], os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    fault_point("pg-before-rename", _number(shard["final"]))
                    os.replace(shard["tmp"], shard["final"])
                    arg.set_result(None)
                elif kind == "abort":
                    writer = _discard(writer, shard["tmp"])
            except BaseException as exc:  # keep consuming so the main thread never blocks on the pool
                if self.err is None:
                    self.err = exc
                    if isinstance(exc, (OSError, pa.ArrowException)):
                        self.err = StoreError(f"{shard['final']}: cannot write the Parquet shard ({exc}). Check "
                                              "the free space and permissions of postgres.output, then re-run "
                                              "to resume.")
                writer = _discard(writer, shard["tmp"])
                if kind == "close" and not arg.done():
                    arg.set_exception(exc)
            finally:
                if kind == "block":
                    self.recycle(arg)


def _number(path: str) -> int:
    """The shard number of ``.../part-NNNNNN.parquet``."""
    return int(os.path.basename(path)[len("part-"):].split(".")[0])


def _discard(writer, tmp: str) -> None:
    """Close a half-written shard's writer (errors ignored: the file is being thrown away) and delete it."""
    if writer is not None:
        try:
            writer.close()
        except Exception:
            pass
    _unlink(tmp)
    return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
