"""Connecting to PostgreSQL: psycopg import, DSN redaction, error translation, table names.

psycopg 3 is imported lazily (``pip install 'pqgpu[postgres]'``). The DSN's password never appears in
logs or error messages: `redact_dsn` masks it, `run_pg` and `connect` scrub it from the server's text
and raise outside the ``except`` block, so no chained exception can carry it.
"""

from __future__ import annotations

import re
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote, unquote_plus, urlencode, urlsplit, urlunsplit

from ...errors import ConfigError, InputError, PqgpuError

INSTALL_HINT = "PostgreSQL support needs psycopg 3. Install it with: pip install 'pqgpu[postgres]'"

# key=value conninfo: password value up to the next "key=" (an unquoted value cannot hold a space, but a
# malformed one may, and libpq then echoes the fragments in its error message) or a quoted string.
_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|.*?)(?=\s+[A-Za-z_]+\s*=|\s*$)", re.S)
_URI_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/?#@]*):([^@/?#]*)@")


def redact_dsn(dsn: str | None) -> str:
    """`dsn` with any password replaced by ``***`` (URI userinfo, ``?password=``, or ``password=...``)."""
    if not dsn:
        return ""
    s = str(dsn)
    if re.match(r"^postgres(ql)?://", s, re.I):
        s = _URI_USERINFO.sub(r"\1:***@", s)
        try:
            parts = urlsplit(s)
            if parts.query:
                q = parse_qsl(parts.query, keep_blank_values=True)
                if any(k.lower() == "password" for k, _ in q):
                    q = [(k, "***" if k.lower() == "password" else v) for k, v in q]
                    s = urlunsplit(parts._replace(query=urlencode(q, safe="*/:@")))
        except ValueError:
            s = re.sub(r"([?&]password=)[^&#]*", r"\1***", s, flags=re.I)
        return s
    return _KV_PASSWORD.sub(lambda m: m.group(1) + "***", s)


def _secrets(dsn: str | None) -> list[str]:
    """Password strings (and their fragments) that must never be shown, longest first."""
    if not dsn:
        return []
    out: set[str] = set()
    s = str(dsn)
    m = _URI_USERINFO.match(s)
    if m and m.group(2):
        out.add(m.group(2))
        out.add(unquote(m.group(2)))
    for qm in re.finditer(r"[?&]password=([^&#]*)", s, re.I):
        if qm.group(1):
            out.add(qm.group(1))
            out.add(unquote_plus(qm.group(1)))
    for km in _KV_PASSWORD.finditer(s):
        v = km.group(2).strip()
        if v:
            out.add(v)
            if v.startswith("'") and v.endswith("'") and len(v) >= 2:
                v = v[1:-1].replace("\\'", "'").replace("\\\\", "\\")
                out.add(v)
            out.update(p for p in re.split(r"[\s'\"]+", v) if len(p) >= 2)
    return sorted((x for x in out if x), key=len, reverse=True)


def _scrub(text: str, dsn: str | None) -> str:
    for secret in _secrets(dsn):
        text = text.replace(secret, "***")
    return text


def import_psycopg():
    """The psycopg module; PqgpuError with the install hint when it is missing."""
    try:
        import psycopg
        from psycopg import sql  # noqa: F401
    except ImportError:
        raise PqgpuError(INSTALL_HINT) from None
    return psycopg


def _pg_message(exc: BaseException, dsn: str | None) -> str:
    """The server's primary message (and detail) when there is one, else psycopg's text; scrubbed, one line."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    if primary:
        detail = getattr(diag, "message_detail", None)
        msg = f"{primary} ({detail})" if detail else primary
    else:
        msg = str(exc).strip() or type(exc).__name__
    msg = " ".join(msg.split()).rstrip(".")
    return _scrub(msg, dsn)


def connect(dsn: str, *, autocommit: bool):
    """A psycopg connection (application_name pqgpu); PqgpuError without the password when it fails."""
    psycopg = import_psycopg()
    err: str | None = None
    try:
        return psycopg.connect(dsn, autocommit=autocommit, application_name="pqgpu")
    except psycopg.Error as exc:  # includes malformed DSNs (ProgrammingError)
        err = _pg_message(exc, dsn)
    # Raised outside the except block so no chained exception (which could hold the DSN) is attached.
    raise PqgpuError(
        f"Cannot connect to PostgreSQL at {redact_dsn(dsn)}: {err.rstrip('?')}. Check postgres.dsn (or PQGPU_PG_DSN): "
        "host, port, database, user and password, and that the server accepts connections."
    )


class _Failure(Exception):
    """Carries a scrubbed psycopg error out of an except block (so no context is chained)."""

    def __init__(self, kind: str, message: str, sqlstate: str | None):
        super().__init__(message)
        self.kind, self.message, self.sqlstate = kind, message, sqlstate


def run_pg(fn: Callable[[], Any], dsn: str, what: str) -> Any:
    """Run `fn`, turning psycopg errors into pqgpu errors whose text cannot hold the password."""
    psycopg = import_psycopg()
    failure: _Failure | None = None
    try:
        return fn()
    except psycopg.Error as exc:
        failure = _Failure(type(exc).__name__, _pg_message(exc, dsn), getattr(exc, "sqlstate", None))
    state = failure.sqlstate or ""
    text = f"PostgreSQL error while {what} ({redact_dsn(dsn)}): {failure.message}"
    if state in ("42P01", "42703", "42883", "42804", "22P02", "42601", "3F000"):
        # undefined table / column / function, datatype mismatch, bad literal, syntax, schema
        raise InputError(text + ". Check postgres.table / postgres.query and the column names in the config.")
    if state.startswith("08") or state == "57P01":
        raise PqgpuError(text + ". The connection to the server was lost; re-run to resume.")
    raise PqgpuError(text)


def split_table(name: str) -> list[str]:
    """'schema.table' -> ['schema', 'table']; double-quoted parts may contain dots ('"a.b".c')."""
    parts, cur, quoted, i = [], [], False, 0
    s = name.strip()
    while i < len(s):
        ch = s[i]
        if quoted:
            if ch == '"':
                if i + 1 < len(s) and s[i + 1] == '"':
                    cur.append('"')
                    i += 1
                else:
                    quoted = False
            else:
                cur.append(ch)
        elif ch == '"':
            quoted = True
        elif ch == ".":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    if quoted or any(p == "" for p in parts) or len(parts) > 3:
        raise ConfigError(
            f"postgres.table: cannot parse {name!r}. Give 'table' or 'schema.table'; double-quote a part "
            "that contains a dot, e.g. 'public.\"my.table\"'."
        )
    return parts




def column_types(cur, query) -> list[str]:
    """Type names (``pg_type.typname``, e.g. int8, vector, _float4) of the columns that `query` returns."""
    cur.execute(query)
    oids = [c.type_code for c in cur.description]
    cur.execute("SELECT oid::int8, typname FROM pg_type WHERE oid = ANY(%s)", (oids,))
    names = dict(cur.fetchall())
    return [names.get(o, str(o)) for o in oids]
