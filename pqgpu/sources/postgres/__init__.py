"""PostgreSQL <-> pqgpu: export a table (or query) to Parquet shards, and write PQ codes back.

One topic per module:

- `connect`: psycopg import, connections, error translation, DSN redaction (`redact_dsn`);
- `copy_rows`: one binary COPY read with psycopg's reader and pgvector's loaders, checked, into float32 blocks;
- `shards`: the background thread that writes decoded blocks as Parquet shards;
- `manifest`: the export's resume record (``_manifest.json``);
- `export`: `export_postgres`, table or query -> Parquet shards, resumable;
- `writeback`: `write_codes_postgres`, code store -> a bytea column, matched by id;
- `written`: which generations of a store a write-back still owes a table (the record in the store's attrs).

psycopg 3 is imported lazily (``pip install 'pqgpu[postgres]'``).
"""

from .connect import redact_dsn
from .export import ExportResult, export_postgres
from .manifest import MANIFEST_NAME
from .writeback import write_codes_postgres
from .written import WriteBackResult

__all__ = ["ExportResult", "WriteBackResult", "export_postgres", "write_codes_postgres", "redact_dsn",
           "MANIFEST_NAME"]
