"""A database with every table shape a real application has, and a content fingerprint to compare copies.

``make_shapes(conn)`` fills an empty database (connected as a superuser, autocommit) with partitioned
tables (range, list, hash, sub-partitioned, DEFAULT partitions), classic inheritance, an UNLOGGED table,
a materialized view, a foreign table, generated and identity columns, odd identifiers (spaces, quotes,
upper case, non-ASCII), large objects, sequences with advanced values and awkward values (bytea, jsonb,
arrays, NULLs, control characters, backslashes, time zones). Its data stays well under 2 MB.

``fingerprint(conn)`` describes the contents of a whole database so that a source and its restored
copy can be compared with ``==``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from psycopg import sql

# Odd identifiers: spaces, double quotes, upper case and non-ASCII characters.
ODD_SCHEMA = 'Ünïcode "Schema"'
ODD_TABLE = 'My "Quoted" Table'
UBER_TABLE = "ÜberTabelle"
ODD_SEQUENCE = 'Seq "Odd" ñ'

# Relations make_shapes creates (schema, name), by shape, for tests to assert on.
PARTITIONED_PARENTS = [("public", "events"), ("public", "events_2024"), ("audit", "log")]
LEAF_PARTITIONS = [
    ("public", "events_2023"), ("public", "events_2024_click"), ("public", "events_2024_other"),
    ("public", "events_default"), ("audit", "log_p0"), ("audit", "log_p1"), ("audit", "log_p2"),
]
INHERITANCE = [("public", "vehicles"), ("public", "cars")]  # parent, child
UNLOGGED = [("public", "cache")]
MATVIEWS = [("public", "event_counts")]
FOREIGN_TABLES = [("public", "host_name")]
ODD_TABLES = [(ODD_SCHEMA, ODD_TABLE), (ODD_SCHEMA, UBER_TABLE)]
LARGE_OBJECT_MIN_BYTES = 1_200_000  # size of the big large object

_SYSTEM_SCHEMA_FILTER = "n.nspname <> 'information_schema' AND left(n.nspname, 3) <> 'pg_'"


def qualified(schema: str, name: str, conn: Any) -> str:
    """``"schema"."name"``, quoted the way ``fingerprint`` keys are."""
    return sql.Identifier(schema, name).as_string(conn)


def make_shapes(conn: Any) -> None:
    """Create every table shape with some rows in the (empty) database ``conn`` is connected to."""
    _partitioned(conn)
    _inheritance_unlogged_matview_foreign(conn)
    _generated_identity(conn)
    _odd_names(conn)
    _large_objects(conn)
    _kitchen_sink(conn)
    _sequences(conn)
    conn.execute("ANALYZE")


def _partitioned(conn: Any) -> None:
    conn.execute("""
        CREATE TABLE public.events (
            id bigserial,
            at timestamptz NOT NULL,
            kind text NOT NULL,
            payload jsonb,
            PRIMARY KEY (id, at, kind)
        ) PARTITION BY RANGE (at);
        CREATE TABLE public.events_2023 PARTITION OF public.events
            FOR VALUES FROM ('2023-01-01 00:00+00') TO ('2024-01-01 00:00+00');
        CREATE TABLE public.events_2024 PARTITION OF public.events
            FOR VALUES FROM ('2024-01-01 00:00+00') TO ('2025-01-01 00:00+00') PARTITION BY LIST (kind);
        CREATE TABLE public.events_2024_click PARTITION OF public.events_2024 FOR VALUES IN ('click');
        CREATE TABLE public.events_2024_other PARTITION OF public.events_2024 DEFAULT;
        CREATE TABLE public.events_default PARTITION OF public.events DEFAULT;
        CREATE INDEX events_kind_idx ON public.events (kind);
    """)
    conn.execute("""
        INSERT INTO public.events (at, kind, payload)
        SELECT timestamptz '2023-03-01 12:00+00' + g * interval '3 days',
               (ARRAY['click', 'view', 'buy'])[1 + g % 3],
               jsonb_build_object('n', g, 'tags', jsonb_build_array('a', g % 7), 'ok', g % 2 = 0)
        FROM generate_series(0, 299) g
    """)  # 2023-03 .. 2025-09: rows land in events_2023, both 2024 sub-partitions and DEFAULT
    conn.execute("""
        CREATE SCHEMA audit;
        CREATE TABLE audit.log (id bigint NOT NULL, actor text, action text, at timestamptz DEFAULT now(),
                                PRIMARY KEY (id)) PARTITION BY HASH (id);
        CREATE TABLE audit.log_p0 PARTITION OF audit.log FOR VALUES WITH (MODULUS 3, REMAINDER 0);
        CREATE TABLE audit.log_p1 PARTITION OF audit.log FOR VALUES WITH (MODULUS 3, REMAINDER 1);
        CREATE TABLE audit.log_p2 PARTITION OF audit.log FOR VALUES WITH (MODULUS 3, REMAINDER 2);
        INSERT INTO audit.log (id, actor, action, at)
        SELECT g, 'user' || g % 5, CASE WHEN g % 4 = 0 THEN NULL ELSE 'act-' || g END,
               timestamptz '2024-06-01 08:00+02' + g * interval '1 hour'
        FROM generate_series(1, 120) g;
    """)


def _inheritance_unlogged_matview_foreign(conn: Any) -> None:
    conn.execute("""
        CREATE TABLE public.vehicles (id int PRIMARY KEY, name text NOT NULL);
        CREATE TABLE public.cars (doors int NOT NULL) INHERITS (public.vehicles);
        INSERT INTO public.vehicles SELECT g, 'vehicle ' || g FROM generate_series(1, 20) g;
        INSERT INTO public.cars SELECT g, 'car ' || g, 2 + g % 3 FROM generate_series(101, 115) g;

        CREATE UNLOGGED TABLE public.cache (key text PRIMARY KEY, value jsonb, expires timestamptz);
        INSERT INTO public.cache SELECT 'k' || g, jsonb_build_object('v', g), timestamptz '2030-01-01 00:00+00'
        FROM generate_series(1, 40) g;

        CREATE MATERIALIZED VIEW public.event_counts AS
            SELECT kind, count(*) AS n, min(at) AS first_at FROM public.events GROUP BY kind
            WITH DATA;
        CREATE UNIQUE INDEX event_counts_kind ON public.event_counts (kind);

        CREATE EXTENSION file_fdw;
        CREATE SERVER local_files FOREIGN DATA WRAPPER file_fdw;
        CREATE FOREIGN TABLE public.host_name (line text) SERVER local_files
            OPTIONS (filename '/etc/hostname', format 'text');
    """)


def _generated_identity(conn: Any) -> None:
    conn.execute("""
        CREATE TABLE public.measurements (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            alt_id int GENERATED BY DEFAULT AS IDENTITY (START WITH 500 INCREMENT BY 5),
            celsius numeric(6, 2),
            fahrenheit numeric GENERATED ALWAYS AS (celsius * 9 / 5 + 32) STORED,
            label text,
            label_upper text GENERATED ALWAYS AS (upper(label)) STORED
        );
        INSERT INTO public.measurements (celsius, label)
        SELECT (g - 20) * 1.25, CASE WHEN g % 6 = 0 THEN NULL ELSE 'sensor ' || g END
        FROM generate_series(1, 60) g;
        INSERT INTO public.measurements (alt_id, celsius, label) VALUES (7, 36.6, 'explicit alt id');
        DELETE FROM public.measurements WHERE id % 10 = 3;  -- gaps: identity values are not renumbered
    """)


def _odd_names(conn: Any) -> None:
    schema = sql.Identifier(ODD_SCHEMA)
    odd = sql.Identifier(ODD_SCHEMA, ODD_TABLE)
    uber = sql.Identifier(ODD_SCHEMA, UBER_TABLE)
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
    conn.execute(sql.SQL("""
        CREATE TABLE {odd} (
            "ID" serial PRIMARY KEY,
            "Column With Spaces" text,
            "say ""hi"" now" text,
            "Größe" numeric,
            "UPPER" boolean,
            "semi;colon" text
        )""").format(odd=odd))
    conn.execute(sql.SQL("""
        INSERT INTO {odd} ("Column With Spaces", "say ""hi"" now", "Größe", "UPPER", "semi;colon")
        SELECT 'row ' || g, 'he said "hi" ' || g, g * 1.5, g % 2 = 0, 'a;b;' || g FROM generate_series(1, 25) g
    """).format(odd=odd))
    conn.execute(sql.SQL("""
        CREATE TABLE {uber} ("Nummer" serial PRIMARY KEY, "Straße" text, "日本語" text, ref int REFERENCES {odd} ("ID"))
    """).format(uber=uber, odd=odd))
    conn.execute(sql.SQL("""
        INSERT INTO {uber} ("Straße", "日本語", ref)
        SELECT 'Hauptstraße ' || g, 'テスト' || g, 1 + g % 25 FROM generate_series(1, 30) g
    """).format(uber=uber))
    conn.execute(sql.SQL("CREATE SEQUENCE {} START 10").format(sql.Identifier(ODD_SCHEMA, ODD_SEQUENCE)))
    conn.execute("SELECT setval(%s::regclass, 9001, true)", (qualified(ODD_SCHEMA, ODD_SEQUENCE, conn),))


def _large_objects(conn: Any) -> None:
    conn.execute("CREATE TABLE public.documents (id serial PRIMARY KEY, title text NOT NULL, content oid)")
    # > 1 MB of binary data: concatenated md5 digests (16 bytes each), covering every byte value.
    big = conn.execute(
        "SELECT lo_from_bytea(0, string_agg(decode(md5(g::text), 'hex'), ''::bytea ORDER BY g))"
        " FROM generate_series(1, %s) g", (LARGE_OBJECT_MIN_BYTES // 16 + 1,)).fetchone()[0]
    small = conn.execute("SELECT lo_from_bytea(0, %s)", (b"small large object\x00\x01\xff\n\\",)).fetchone()[0]
    conn.execute("COMMENT ON LARGE OBJECT %s IS 'the big one'" % int(big))
    conn.execute(
        "INSERT INTO public.documents (title, content) VALUES ('big', %s), ('small', %s), ('none', NULL)",
        (big, small))


def _kitchen_sink(conn: Any) -> None:
    conn.execute("""
        CREATE TABLE public.kitchen_sink (
            id serial PRIMARY KEY,
            raw bytea,
            doc jsonb,
            ints int[],
            words text[],
            body text,
            at timestamptz,
            local_at timestamp,
            money_amount numeric(12, 4),
            flag boolean,
            dropped_later text
        )
    """)
    rows = [
        (b"\x00\x01\x02\xfe\xff binary", '{"a": [1, 2, {"b": null}], "u": "\\u00fc\\n"}', [1, None, 3],
         ["x", "with space", 'quote"d', "comma,", None], "line1\nline2\ttab\\backslash\r\ncrlf",
         "2024-02-29 23:59:59.123456+05:30", "2024-02-29 23:59:59", "12345678.1234", True),
        (b"", "[]", [], [], "", "1970-01-01 00:00:00+00", "1970-01-01 00:00:00", "0", False),
        (None, None, None, None, None, None, None, None, None),
        (b"\\N", '"\\\\N"', [0], ["\\N", "NULL"], "\\N", "infinity", "-infinity", "-0.0001", None),
        (bytes(range(256)), '{"emoji": "\U0001f418", "nested": {"deep": {"x": 1.5e300}}}', [2147483647, -2147483648],
         ["ÄÖÜ", "日本語", "\U0001f418"], "unicode: ÄÖÜ 日本語 \U0001f418 and a \x01 control char",
         "2038-01-19 03:14:08-08", "2038-01-19 03:14:08", "99999999.9999", True),
    ]
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO public.kitchen_sink (raw, doc, ints, words, body, at, local_at, money_amount, flag)"
            " VALUES (%s, %s::jsonb, %s::int[], %s::text[], %s, %s::timestamptz, %s::timestamp, %s::numeric, %s)",
            rows)
    conn.execute("ALTER TABLE public.kitchen_sink DROP COLUMN dropped_later")  # a dropped column in the tuple


def _sequences(conn: Any) -> None:
    conn.execute("""
        CREATE SEQUENCE public.invoice_no START 1000;
        SELECT setval('public.invoice_no', 4242, true);
        CREATE SEQUENCE public.ticket_no INCREMENT BY 10 START 100;
        SELECT setval('public.ticket_no', 770, false);
        SELECT setval(pg_get_serial_sequence('public.documents', 'id'), 500, true);
        SELECT setval(pg_get_serial_sequence('public.kitchen_sink', 'id'), 64, false);
        SELECT setval(pg_get_serial_sequence('public.measurements', 'id'), 1000, true);
    """)


def fingerprint(conn: Any, exclude_schemas: Iterable[str] = ()) -> dict[str, Any]:
    """The contents of the whole database ``conn`` is connected to, for comparing a source with a copy.

    ``{"relations": {'"schema"."table"': {"rows": n, "digest": md5} | {"foreign": True}},
    "large_objects": {oid: md5}, "sequences": {'"schema"."seq"': (last_value, is_called)}}``.
    Ordinary tables and inheritance parents are read with ONLY (children are counted on their own);
    a partitioned parent is read whole (all its partitions), each partition also on its own.
    Rows are ordered by their text form in the "C" collation, so the digest does not depend on
    physical order or the database's collation. System schemas and ``exclude_schemas`` are skipped.
    """
    excluded = list(exclude_schemas)
    relations: dict[str, Any] = {}
    rels = conn.execute(f"""
        SELECT n.nspname, c.relname, c.relkind
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'm', 'f') AND {_SYSTEM_SCHEMA_FILTER}
          AND NOT n.nspname = ANY(%s::text[])
        ORDER BY n.nspname, c.relname
    """, (excluded,)).fetchall()
    for schema, name, kind in rels:
        key = qualified(schema, name, conn)
        if kind == "f":
            relations[key] = {"foreign": True}
            continue
        only = sql.SQL("ONLY ") if kind == "r" else sql.SQL("")
        rows, digest = conn.execute(sql.SQL(
            "SELECT count(*), md5(coalesce(string_agg(ROW(fp_row.*)::text, E'\\n'"
            " ORDER BY ROW(fp_row.*)::text COLLATE \"C\"), '')) FROM {only}{rel} AS fp_row"
        ).format(only=only, rel=sql.Identifier(schema, name))).fetchone()
        relations[key] = {"rows": rows, "digest": digest}

    large_objects = dict(conn.execute(
        "SELECT oid::bigint, md5(lo_get(oid)) FROM pg_largeobject_metadata ORDER BY oid").fetchall())

    sequences: dict[str, tuple[int, bool]] = {}
    seqs = conn.execute(f"""
        SELECT n.nspname, c.relname
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'S' AND {_SYSTEM_SCHEMA_FILTER} AND NOT n.nspname = ANY(%s::text[])
        ORDER BY n.nspname, c.relname
    """, (excluded,)).fetchall()
    for schema, name in seqs:
        last_value, is_called = conn.execute(
            sql.SQL("SELECT last_value, is_called FROM {}").format(sql.Identifier(schema, name))).fetchone()
        sequences[qualified(schema, name, conn)] = (last_value, is_called)

    return {"relations": relations, "large_objects": large_objects, "sequences": sequences}
