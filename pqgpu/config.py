"""Configuration: YAML -> frozen dataclasses, with unknown keys rejected and `a.b=value` overrides.

The keys are the public contract of DESIGN §4.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class SourceConfig:
    format: str = "npy"  # parquet | zarr | npy; not given: from source.path's extension (npy when no path either)
    path: str | list[str] = "data/shards"  # glob, directory, file or URL; or a list of them
    id_column: str | None = None
    vector_column: str = "embedding"


@dataclass(frozen=True)
class QuantizerConfig:
    path: str = "out/pq.faiss"
    M: int = 16
    nbits: int = 8
    opq: bool = False
    metric: str = "l2"  # l2 | ip | cosine (pqgpu.metric)
    nlist: int = 0  # > 0: IVF-PQ with nlist coarse lists (pqgpu.ivf); 0: plain PQ
    train_size: int = 262144
    niter: int = 25
    seed: int = 1234


@dataclass(frozen=True)
class EncodeConfig:
    output: str = "out/codes.zarr"
    chunk_rows: int = 65536
    backend: str = "auto"  # auto | cpu | gpu


@dataclass(frozen=True)
class ClusterConfig:
    kind: str = "local"  # local | local-cuda | address
    address: str | None = None
    n_workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str | int | None = "auto"
    processes: bool | None = None  # kind local: null = threads of this process for small runs, else processes
    dashboard: bool = True  # local kinds: serve the Dask dashboard on a free port and print its link
    start_method: str = "auto"  # local: how workers start: auto (fork when safe, else spawn) | fork | spawn | forkserver


@dataclass(frozen=True)
class PostgresConfig:
    dsn: str | None = None  # or env PQGPU_PG_DSN
    table: str | None = "items"
    query: str | None = None  # instead of table
    id_column: str = "id"
    vector_column: str = "embedding"
    output: str = "data/shards"
    rows_per_shard: int = 100000
    codes_column: str = "pq_code"
    batch_rows: int = 50000

    def resolved_dsn(self) -> str:
        dsn = self.dsn or os.environ.get("PQGPU_PG_DSN")
        if not dsn:
            raise ConfigError(
                "postgres.dsn is not set. Set it in the config or in the environment variable PQGPU_PG_DSN."
            )
        return dsn


@dataclass(frozen=True)
class Config:
    source: SourceConfig = field(default_factory=SourceConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    postgres: PostgresConfig = field(default_factory=PostgresConfig)

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    ("source", "format"): ("parquet", "zarr", "npy"),
    ("encode", "backend"): ("auto", "cpu", "gpu"),
    ("quantizer", "metric"): ("l2", "ip", "cosine"),
    ("cluster", "kind"): ("local", "local-cuda", "address"),
    ("cluster", "start_method"): ("auto", "fork", "spawn", "forkserver"),
}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` ("int", "str | None", ...), converting strings from --set."""
    allowed = [t.strip() for t in str(tp).split("|")]
    if isinstance(value, str) and value in ("null", "~", "None") and "None" in allowed:
        value = None
    if value is None:
        if "None" in allowed:
            return None
        raise ConfigError(f"{where}: expected {tp}. Got null instead.")
    if isinstance(value, str) and "str" not in allowed:
        parsed = yaml.safe_load(value)  # "--set quantizer.M=8" arrives as a string
        if not isinstance(parsed, str):
            return _coerce(parsed, tp, where)
    for t in allowed:
        if t == "list[str]" and isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return list(value)
        if t == "bool" and isinstance(value, bool):
            return value
        if t == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t == "str" and isinstance(value, str):
            return value
    if "str" in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected {tp}. Got {value!r} ({type(value).__name__}) instead.")


def _build(cls: type, data: Any, section: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config section '{section}' must be a mapping of keys to values. Got {data!r} instead.")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"Unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}. "
            f"Valid keys in '{section}': {', '.join(known)}."
        )
    hints = {f.name: f.type for f in fields(cls)}  # annotation strings, e.g. "int | None"
    values = {}
    for name, value in data.items():
        where = f"{section}.{name}"
        v = _coerce(value, hints[name], where)
        choices = _CHOICES.get((section, name))
        if choices and v not in choices:
            raise ConfigError(f"{where}: expected one of {', '.join(choices)}. Got {v!r} instead.")
        values[name] = v
    return cls(**values)


def _check(cfg: Config) -> None:
    q = cfg.quantizer
    if not 1 <= q.nbits <= 16:
        raise ConfigError(f"quantizer.nbits: expected an integer in 1..16. Got {q.nbits} instead.")
    for key, v in (("quantizer.M", q.M), ("quantizer.train_size", q.train_size), ("quantizer.niter", q.niter),
                   ("encode.chunk_rows", cfg.encode.chunk_rows), ("postgres.rows_per_shard", cfg.postgres.rows_per_shard),
                   ("postgres.batch_rows", cfg.postgres.batch_rows)):
        if v <= 0:
            raise ConfigError(f"{key}: expected a positive integer. Got {v} instead.")
    if q.nlist < 0:
        raise ConfigError(f"quantizer.nlist: expected 0 (plain PQ) or a positive number of IVF lists. Got {q.nlist} "
                          "instead.")
    if cfg.cluster.kind == "address" and not cfg.cluster.address:
        raise ConfigError("cluster.kind is 'address' but cluster.address is empty. Give the scheduler address, "
                          "e.g. tcp://10.0.0.5:8786.")


def config_from_dict(data: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = (), *,
                     updates: dict[str, dict[str, Any]] | None = None) -> Config:
    """Build a validated Config from a nested mapping, then `updates` ({section: {key: value}}, typed values
    such as the CLI's shorthand arguments), then `section.key=value` overrides (strings, as from --set)."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in (data or {}).items()}
    sections = {f.name: f.type for f in fields(Config)}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"Unknown config section(s) {', '.join(unknown)}. Valid sections: {', '.join(sections)}.")
    for section, values in (updates or {}).items():
        sec = data.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"Config section '{section}' must be a mapping.")
        sec.update(values)
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. quantizer.M=32.")
        if section not in sections:
            raise ConfigError(f"--set {item!r}: unknown section '{section}'. Valid sections: {', '.join(sections)}.")
        sec = data.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"Config section '{section}' must be a mapping.")
        sec[name] = value
    _infer_source_format(data)
    classes = {"source": SourceConfig, "quantizer": QuantizerConfig, "encode": EncodeConfig,
               "cluster": ClusterConfig, "postgres": PostgresConfig}
    cfg = Config(**{name: _build(classes[name], data.get(name), name) for name in sections})
    _check(cfg)
    return cfg


def _infer_source_format(data: dict[str, Any]) -> None:
    """source.format from source.path when only the path is given (in the file, --set or SOURCE alike)."""
    from .formats import infer_format

    src = data.get("source")
    if isinstance(src, dict) and src.get("format") is None and src.get("path") is not None:
        path = src["path"]
        if isinstance(path, (str, list, tuple)) and all(isinstance(p, str) for p in ([path] if isinstance(path, str)
                                                                                      else path)):
            src["format"] = infer_format(path, key="source.path (source.format is not given)")


def load_config(path: str | os.PathLike | dict | Config | None = None, overrides: list[str] | tuple[str, ...] = (),
                *, updates: dict[str, dict[str, Any]] | None = None) -> Config:
    """A validated Config from a YAML file (or a dict of sections, or only defaults when path is None), then
    `updates` and `section.key=value` overrides. A Config passed in comes back as it is (no overrides)."""
    if isinstance(path, Config):
        return path if not overrides and not updates else config_from_dict(path.to_dict(), overrides, updates=updates)
    if isinstance(path, dict):
        return config_from_dict(path, overrides, updates=updates)
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"Expected a path to a YAML config file, a dict of sections (source, quantizer, ...) or "
                          f"a pqgpu Config. Got {type(path).__name__} instead.")
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file {p} does not exist. Pass an existing YAML file with -c, e.g. configs/default.yaml.")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {p} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"Config file {p} must contain a mapping of sections (source, quantizer, ...).")
    try:
        return config_from_dict(data, overrides, updates=updates)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise
