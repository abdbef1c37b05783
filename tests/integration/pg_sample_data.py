"""Tricky PostgreSQL sample databases and the fingerprint that compares them table by table.

``tricky`` holds what a dump most easily gets wrong: bytea with NUL bytes, arrays,
jsonb, an enum, a domain, 40-digit numerics, timestamps with time zones, identity and
generated columns, a sequence at a non-trivial value, a partitioned table, a
materialized view, a trigger with its PL/pgSQL function, a large object, pgcrypto, and
``"Sales Data"."Order"``. ``my-db`` and ``café_ünï`` test names; a role with a grant
tests the globals.
"""

from __future__ import annotations

from typing import Any

from tests.integration.postgres_server import PostgresServer

TRICKY = "tricky"
HYPHEN = "my-db"
UNICODE = "café_ünï"
READER_ROLE = "app_reader"

TRICKY_SQL = [
    "CREATE EXTENSION pgcrypto",
    "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
    "CREATE DOMAIN positive AS integer CHECK (VALUE > 0)",
    """CREATE TABLE kinds (
        id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        raw bytea, tags text[], doc jsonb, feeling mood, amount numeric(40, 0),
        exact numeric, stamp timestamptz, count positive,
        doubled integer GENERATED ALWAYS AS (count * 2) STORED,
        digest text DEFAULT encode(digest('x', 'sha256'), 'hex'))""",
    """INSERT INTO kinds (raw, tags, doc, feeling, amount, exact, stamp, count) VALUES
        ('\\x00ff00deadbeef00'::bytea, ARRAY['a', 'b,c', 'd"e', NULL], '{"k": [1, 2.5, null],
         "ü": "\\u00e9"}', 'happy', 1234567890123456789012345678901234567890,
         0.000000000000000000000000000000000000001, '2026-03-29 01:30:00+01', 7),
        ('', '{}', 'null', 'sad', -9999999999999999999999999999999999999999, 1e-20,
         '1999-12-31 23:59:59.999999-08', 1),
        (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)""",
    "CREATE SEQUENCE invoice_no START 1000 INCREMENT 7",
    "SELECT setval('invoice_no', 987654321, true)",
    "SELECT setval(pg_get_serial_sequence('kinds', 'id'), 4242, true)",
    """CREATE TABLE measurements (day date NOT NULL, value double precision)
        PARTITION BY RANGE (day)""",
    """CREATE TABLE measurements_2025 PARTITION OF measurements
        FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')""",
    """CREATE TABLE measurements_2026 PARTITION OF measurements
        FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')""",
    """INSERT INTO measurements SELECT date '2025-06-01' + g, g / 3.0
        FROM generate_series(0, 400) g""",
    """CREATE MATERIALIZED VIEW monthly AS SELECT date_trunc('month', day) AS month,
        avg(value) AS mean FROM measurements GROUP BY 1""",
    "CREATE TABLE audit (id bigserial PRIMARY KEY, what text, at timestamptz DEFAULT now())",
    """CREATE FUNCTION log_kind() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO audit (what) VALUES ('kind ' || NEW.id); RETURN NEW; END $$""",
    "CREATE TRIGGER kinds_audit AFTER INSERT ON kinds FOR EACH ROW EXECUTE FUNCTION log_kind()",
    "INSERT INTO kinds (count) VALUES (3)",
    "SELECT lo_from_bytea(424242, '\\x00010203ff'::bytea)",
    'CREATE SCHEMA "Sales Data"',
    """CREATE TABLE "Sales Data"."Order" ("Line No" integer PRIMARY KEY, "Customer"
        text, "Total" money)""",
    """INSERT INTO "Sales Data"."Order" SELECT g, 'Kunde ' || g || E' \\t ☃', g * 1.25
        FROM generate_series(1, 500) g""",
    f"GRANT SELECT ON kinds TO {READER_ROLE}",
]


def create_sample_databases(server: PostgresServer) -> list[str]:
    """(Re)create the sample databases and the reader role; returns the database names."""
    for name in (TRICKY, HYPHEN, UNICODE):
        server.execute("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    server.execute("postgres", f"DROP ROLE IF EXISTS {READER_ROLE}")
    server.execute("postgres", f"CREATE ROLE {READER_ROLE} LOGIN PASSWORD 'reader-secret' "
                               "CONNECTION LIMIT 7")
    for name in (TRICKY, HYPHEN, UNICODE):
        server.execute("postgres", f'CREATE DATABASE "{name}"')
    server.execute(TRICKY, *TRICKY_SQL)
    server.execute(HYPHEN, "CREATE TABLE t (id int PRIMARY KEY, v text)",
                   "INSERT INTO t SELECT g, repeat('x', g) FROM generate_series(1, 300) g")
    server.execute(UNICODE, 'CREATE TABLE "Zürich" (n text)',
                   "INSERT INTO \"Zürich\" VALUES ('grüezi'), ('日本')")
    return [TRICKY, HYPHEN, UNICODE]


SEQUENCE_ROW = "SELECT last_value::text || '/' || is_called::text FROM {table}"
TABLE_ROWS = ("SELECT count(*)::text || ':' || coalesce(md5(string_agg(t::text, E'\\n' "
              "ORDER BY t::text)), '') FROM {table} t")


def fingerprint(server: PostgresServer, database: str) -> dict[str, Any]:
    """An md5 over each table's ordered rows, sequences' positions, large objects,
    extensions, functions and triggers: equal fingerprints, equal databases."""
    tables = server.query(database, """
        SELECT format('%I.%I', n.nspname, c.relname), c.relkind FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'm', 'S') AND n.nspname NOT IN ('pg_catalog',
        'information_schema') AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1""")
    result: dict[str, Any] = {}
    for name, kind in tables:
        # The names come quoted from format('%I.%I') above.
        query = (SEQUENCE_ROW if kind == "S" else TABLE_ROWS).replace("{table}", name)
        result[name] = server.query(database, query)[0][0]
    result["large objects"] = server.query(database, """
        SELECT string_agg(oid::text || '=' || md5(lo_get(oid)), ',' ORDER BY oid)
        FROM pg_largeobject_metadata""")[0][0]
    result["extensions"] = server.query(database, "SELECT string_agg(extname, ',' "
                                                  "ORDER BY extname) FROM pg_extension")[0][0]
    result["functions"] = server.query(database, """SELECT string_agg(md5(prosrc), ','
        ORDER BY proname) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public' AND p.prolang = (SELECT oid FROM pg_language
        WHERE lanname = 'plpgsql')""")[0][0]
    result["triggers"] = server.query(database, "SELECT string_agg(tgname, ',' ORDER BY "
                                                "tgname) FROM pg_trigger WHERE NOT "
                                                "tgisinternal")[0][0]
    result["grants"] = server.query(database, """SELECT string_agg(grantee || ':' ||
        privilege_type, ',' ORDER BY grantee, privilege_type) FROM
        information_schema.role_table_grants WHERE grantee = 'app_reader'""")[0][0]
    return result
