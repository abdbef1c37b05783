"""Test databases with content that dump tools get wrong, and fast bulk data for size tests.

``create_tricky_database`` holds binary BLOBs (0x00, invalid UTF-8), NULLs, 4-byte UTF-8,
JSON, DECIMAL(30,10), DATETIME(6), a view, a trigger, a procedure, a function, an event
and tables named with reserved words. ``create_hyphen_database`` is ``my-db`` with a
MyISAM table (the non-InnoDB case). ``generate_bulk`` fills a table with
realistic-looking rows using set-based ``INSERT ... SELECT`` batches.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from tests.integration.mariadb_server import MariaDBServer, quote_identifier

TRICKY_DB = "tricky"
HYPHEN_DB = "my-db"

ALL_BYTES = bytes(range(256))
INVALID_UTF8 = b"\xc3\x28\xa0\xa1\xff\xfe\x00\xed\xa0\x80"
EMOJI_TEXT = "Zoë 😀🎉🚀 𠜎𠜱 ✓ 中文 \U0001d518\U0001d52b"
AWKWARD_TEXT = 'O\'Brien \\ "quoted" `tick`\n\ttab -- not a comment; DROP TABLE x; /* */'

_TRICKY_SCHEMA = [
    """CREATE TABLE customers (
        id INT AUTO_INCREMENT PRIMARY KEY,
        name VARCHAR(100) NOT NULL,
        nickname VARCHAR(100) NULL,
        notes TEXT NULL,
        created DATETIME(6) NOT NULL,
        balance DECIMAL(30,10) NULL,
        profile JSON NULL,
        updates INT NOT NULL DEFAULT 0
    ) ENGINE=InnoDB""",
    """CREATE TABLE attachments (
        id INT PRIMARY KEY,
        customer_id INT NOT NULL,
        data LONGBLOB NULL,
        tag VARBINARY(16) NULL,
        fixed BINARY(4) NULL,
        CONSTRAINT fk_attachment_customer FOREIGN KEY (customer_id) REFERENCES customers (id)
    ) ENGINE=InnoDB""",
    """CREATE TABLE audit (
        id INT AUTO_INCREMENT PRIMARY KEY,
        customer_id INT NOT NULL,
        action VARCHAR(20) NOT NULL,
        at DATETIME(6) NOT NULL
    ) ENGINE=InnoDB""",
    """CREATE TABLE `order` (
        id INT PRIMARY KEY,
        `select` VARCHAR(20) NULL,
        `from` DECIMAL(30,10) NULL,
        `desc` TEXT NULL
    ) ENGINE=InnoDB""",
    """CREATE TABLE `select` (
        `where` INT PRIMARY KEY,
        `group` VARCHAR(20) NULL
    ) ENGINE=InnoDB""",
    """CREATE VIEW customer_summary AS
        SELECT c.id, c.name, COUNT(a.id) AS attachment_count
        FROM customers c LEFT JOIN attachments a ON a.customer_id = c.id
        GROUP BY c.id, c.name""",
    """CREATE TRIGGER customers_audit AFTER UPDATE ON customers FOR EACH ROW
        INSERT INTO audit (customer_id, action, at) VALUES (NEW.id, 'update', NOW(6))""",
    """CREATE PROCEDURE add_customer(IN p_name VARCHAR(100))
        MODIFIES SQL DATA
        BEGIN
            INSERT INTO customers (name, created) VALUES (p_name, NOW(6));
        END""",
    """CREATE FUNCTION customer_count() RETURNS INT
        READS SQL DATA
        RETURN (SELECT COUNT(*) FROM customers)""",
    """CREATE EVENT purge_audit ON SCHEDULE EVERY 1 DAY
        DO DELETE FROM audit WHERE at < NOW() - INTERVAL 30 DAY""",
]

_CUSTOMERS: list[tuple[Any, ...]] = [
    (1, EMOJI_TEXT, None, AWKWARD_TEXT, "2026-11-26 13:45:12.123456",
     "12345678901234567890.0123456789", '{"emoji": "🚀", "nested": {"a": [1, 2, null]}}'),
    (2, "Null Nelly", None, None, "1000-01-01 00:00:00.000000", None, None),
    (3, "Max Time", "", "a\x00b", "9999-12-31 23:59:59.999999",
     "-0.0000000001", '{"s": "quote \\" and backslash \\\\", "n": 1e3}'),
    (4, "Zero", "zero", "", "1970-01-01 00:00:01.000001", "0.0000000000", "[]"),
]  # fmt: skip

_ATTACHMENTS: list[tuple[Any, ...]] = [
    (1, 1, ALL_BYTES, b"\x00", b"\x00\x00\x00\x00"),
    (2, 1, INVALID_UTF8, INVALID_UTF8[:8], b"\xff\x00\xfe\x01"),
    (3, 2, None, None, None),
    (4, 3, b"", b"", b"ab\x00\x00"),
    (5, 4, os.urandom(300_000), b"\x80" * 16, b"\xc3\x28\x00\x0a"),
]


def create_tricky_database(server: MariaDBServer, database: str = TRICKY_DB) -> None:
    """(Re)create ``database`` with every kind of content that is easy to dump wrongly."""
    server.create_database(database)
    with server.connection(database) as conn, conn.cursor() as cur:
        for statement in _TRICKY_SCHEMA:
            cur.execute(statement)
        cur.executemany(
            "INSERT INTO customers (id, name, nickname, notes, created, balance, profile) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)",
            _CUSTOMERS,
        )
        cur.executemany(
            "INSERT INTO attachments (id, customer_id, data, tag, fixed) "
            "VALUES (%s, %s, %s, %s, %s)",
            _ATTACHMENTS,
        )
        cur.execute("UPDATE customers SET updates = updates + 1 WHERE id = 1")
        cur.execute("CALL add_customer(%s)", ("added by procedure 🧪",))
        cur.execute(
            "INSERT INTO `order` (id, `select`, `from`, `desc`) VALUES "
            "(1, 'select', 99999999999999999999.9999999999, 'reserved'), (2, NULL, NULL, NULL)"
        )
        cur.execute("INSERT INTO `select` (`where`, `group`) VALUES (1, 'from'), (2, NULL)")
        _analyze(cur)


def _analyze(cur: Any) -> None:
    """Refresh table statistics so information_schema sizes reflect the data just written."""
    cur.execute("SHOW TABLES")
    for (table,) in cur.fetchall():
        cur.execute(f"ANALYZE TABLE {quote_identifier(table)}")
        cur.fetchall()


def create_hyphen_database(server: MariaDBServer, database: str = HYPHEN_DB) -> None:
    """(Re)create ``database`` (default ``my-db``) with an InnoDB and a MyISAM table."""
    server.create_database(database)
    with server.connection(database) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE items (id INT PRIMARY KEY, label VARCHAR(50)) ENGINE=InnoDB")
        cur.execute("CREATE TABLE legacy_log (id INT PRIMARY KEY, line TEXT) ENGINE=MyISAM")
        cur.executemany(
            "INSERT INTO items VALUES (%s, %s)", [(i, f"item-{i} ✓") for i in range(1, 51)]
        )
        cur.executemany(
            "INSERT INTO legacy_log VALUES (%s, %s)", [(i, f"line {i}") for i in range(1, 21)]
        )
        _analyze(cur)


def create_sample_databases(server: MariaDBServer) -> list[str]:
    """Create ``tricky`` and ``my-db``; returns their names."""
    create_tricky_database(server)
    create_hyphen_database(server)
    return [TRICKY_DB, HYPHEN_DB]


def base_tables(server: MariaDBServer, database: str) -> list[str]:
    """Names of the base tables (not views or sequences) of ``database``, sorted."""
    rows = server.query(
        "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s "
        "AND TABLE_TYPE IN ('BASE TABLE', 'SYSTEM VERSIONED') ORDER BY TABLE_NAME",
        args=(database,),
    )
    return [str(row[0]) for row in rows]


def table_checksums(server: MariaDBServer, database: str) -> dict[str, int]:
    """``CHECKSUM TABLE`` for every base table of ``database``."""
    result: dict[str, int] = {}
    with server.connection() as conn, conn.cursor() as cur:
        for table in base_tables(server, database):
            cur.execute(f"CHECKSUM TABLE {quote_identifier(database)}.{quote_identifier(table)}")
            row = cur.fetchone()
            result[table] = int(row[1])
    return result


def object_counts(server: MariaDBServer, database: str) -> dict[str, int]:
    """How many routines, triggers, views and events ``database`` holds."""
    counts = {}
    for what, sql in {
        "routines": "SELECT COUNT(*) FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA=%s",
        "triggers": "SELECT COUNT(*) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA=%s",
        "views": "SELECT COUNT(*) FROM information_schema.VIEWS WHERE TABLE_SCHEMA=%s",
        "events": "SELECT COUNT(*) FROM information_schema.EVENTS WHERE EVENT_SCHEMA=%s",
    }.items():
        counts[what] = int(server.query(sql, args=(database,))[0][0])
    return counts


# -- bulk data ------------------------------------------------------------------------------

_BATCH_ROWS = 50_000
_FIXED_ROW_OVERHEAD = 75  # id, amount, date, quotes and commas in the dump's INSERT text
_FIRST_NAMES = (
    "Anna Bernd Chiara Deniz Elif Farid Greta Hiroshi Ines Jonas Katja Luca Mira Noah Olga Pavel"
)
_LAST_NAMES = "Müller Schmidt Rossi García Nowak Öztürk Kowalski Dubois Jensen Silva Novak Horvat"
_CITIES = "Berlin Zürich Wien Graz Basel Lyon Porto Kraków Brno Ljubljana Tallinn Göteborg"
_DOMAINS = "example.org example.com mail.test clinic.example hospital.test"
_STATUSES = "new paid shipped cancelled refunded"
_LOREM = (
    "Patient reported mild symptoms after the second visit; follow-up scheduled. "
    "Invoice sent by post, payment expected within thirty days of receipt. "
    "Address changed on request, confirmed by phone with the account holder. "
    "Allergy note: penicillin. Prefers appointments in the morning before nine. "
    "Lab results attached to the record; values within the reference range. "
)


def _elt(words: str) -> str:
    items = words.split()
    quoted = ", ".join("'" + w + "'" for w in items)
    return f"ELT(1 + FLOOR(RAND() * {len(items)}), {quoted})"


def _bulk_select(limit: int) -> str:
    lorem = "'" + _LOREM + "'"
    return (
        # Only module constants and an int are formatted in.
        "SELECT fn, ln, CONCAT(LOWER(fn), '.', LOWER(ln), n, '@', dom), city, amount, status, "  # noqa: S608
        "created, note, token FROM (SELECT n, "
        f"{_elt(_FIRST_NAMES)} AS fn, {_elt(_LAST_NAMES)} AS ln, {_elt(_DOMAINS)} AS dom, "
        f"{_elt(_CITIES)} AS city, ROUND(RAND() * 10000, 2) AS amount, "
        f"{_elt(_STATUSES)} AS status, "
        "TIMESTAMP('2018-01-01') + INTERVAL FLOOR(RAND() * 280000000) SECOND AS created, "
        f"SUBSTRING({lorem}, 1 + FLOOR(RAND() * 150), 40 + FLOOR(RAND() * 200)) AS note, "
        "MD5(RAND()) AS token "
        f"FROM _bulk_numbers WHERE n <= {int(limit)}) AS src"
    )


def _fill_numbers(cur: Any, count: int) -> None:
    cur.execute("DROP TABLE IF EXISTS _bulk_numbers")
    cur.execute("CREATE TABLE _bulk_numbers (n INT UNSIGNED PRIMARY KEY) ENGINE=InnoDB")
    cur.execute("INSERT INTO _bulk_numbers VALUES (1)")
    have = 1
    while have < count:
        cur.execute(f"INSERT INTO _bulk_numbers SELECT n + {have} FROM _bulk_numbers")  # noqa: S608
        have *= 2


def generate_bulk(
    server: MariaDBServer, database: str, approx_bytes: int, *, table: str = "bulk"
) -> int:
    """Add about ``approx_bytes`` of dump text to ``database``.``table``; returns rows added.

    Rows are generated on the server by ``INSERT ... SELECT`` batches of 50,000 rows from
    a numbers table, with randomised names, e-mails, amounts, dates, notes and hash-like
    tokens, so the data compresses like real data rather than like repeated rows. The
    inserts are kept out of the binary log when the session may do so.
    """
    quoted_db = quote_identifier(database)
    quoted_table = quote_identifier(table)
    with server.connection() as conn, conn.cursor() as cur:
        with contextlib.suppress(Exception):
            cur.execute("SET SESSION sql_log_bin = 0")
        cur.execute(f"CREATE DATABASE IF NOT EXISTS {quoted_db} CHARACTER SET utf8mb4")
        cur.execute(f"USE {quoted_db}")
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {quoted_table} ("
            "id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY, first_name VARCHAR(32) NOT NULL, "
            "last_name VARCHAR(32) NOT NULL, email VARCHAR(96) NOT NULL, city VARCHAR(48), "
            "amount DECIMAL(12,2) NOT NULL, status VARCHAR(16) NOT NULL, "
            "created DATETIME NOT NULL, note VARCHAR(400), token CHAR(32) NOT NULL, "
            "KEY idx_created (created)) ENGINE=InnoDB"
        )
        _fill_numbers(cur, _BATCH_ROWS)
        insert = (
            f"INSERT INTO {quoted_table} (first_name, last_name, email, city, amount, status, "
            "created, note, token) "
        )
        first = min(_BATCH_ROWS, 2_000)
        cur.execute(insert + _bulk_select(first))
        cur.execute(
            "SELECT AVG(LENGTH(first_name) + LENGTH(last_name) + LENGTH(email) + LENGTH(city) "  # noqa: S608
            f"+ LENGTH(status) + LENGTH(note) + LENGTH(token)) FROM {quoted_table}"
        )
        per_row = float(cur.fetchone()[0]) + _FIXED_ROW_OVERHEAD
        target = max(first, int(approx_bytes / per_row))
        done = first
        while done < target:
            batch = min(_BATCH_ROWS, target - done)
            cur.execute(insert + _bulk_select(batch))
            done += batch
        cur.execute("DROP TABLE _bulk_numbers")
        # Fresh statistics, so information_schema size estimates match the data.
        cur.execute(f"ANALYZE TABLE {quoted_table}")
        cur.fetchall()
        return done
