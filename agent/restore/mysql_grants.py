"""Whether this MySQL/MariaDB account may restore a given dump into a given database.

Checked after the backup has proven whole and before the target is touched, so that a
restore the server would refuse half-way (a CREATE TRIGGER after a hundred tables) is
refused at the start with the missing privileges named. The account's privileges are
read from information_schema (global and database-level grants, database patterns
included); what the dump needs comes from :class:`agent.restore.sql_objects.SqlObjects`.
Blocking (pymysql); callers run it in a worker thread.
"""

from __future__ import annotations

from collections.abc import Collection

from agent.engines.mysql_connect import MySQLParams, connect

# What every mysqldump/mariadb-dump restore runs: CREATE/DROP TABLE, INSERT, the
# ALTER TABLE ... DISABLE KEYS around the data and LOCK TABLES ... WRITE.
TABLE_PRIVILEGES = ("CREATE", "DROP", "INSERT", "ALTER", "LOCK TABLES", "SELECT")
KIND_PRIVILEGES = {
    "trigger": ("TRIGGER",),
    "procedure": ("CREATE ROUTINE", "ALTER ROUTINE"),
    "function": ("CREATE ROUTINE", "ALTER ROUTINE"),
    "event": ("EVENT",),
    "view": ("CREATE VIEW",),
}
# With binary logging on, creating these needs SUPER or log_bin_trust_function_creators.
BINLOG_SENSITIVE = frozenset({"trigger", "function"})


def missing_restore_privileges(params: MySQLParams, target: str, kinds: Collection[str],
                               definers: Collection[str]) -> list[str]:
    """What the account lacks to restore a dump with ``kinds`` and ``definers``.

    Raises:
        DumpError: the server cannot be reached or queried.
    """
    with connect(params) as cur:
        cur.execute("SELECT CURRENT_USER(), @@log_bin, @@log_bin_trust_function_creators")
        current, log_bin, trusted = cur.fetchone()
        user, _, host = str(current).rpartition("@")
        grantee = f"'{user}'@'{host}'"
        cur.execute(
            "SELECT PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES WHERE GRANTEE = %s",
            (grantee,),
        )
        global_privileges = {str(row[0]) for row in cur.fetchall()}
        cur.execute(
            "SELECT PRIVILEGE_TYPE FROM information_schema.SCHEMA_PRIVILEGES "
            "WHERE GRANTEE = %s AND %s LIKE TABLE_SCHEMA",
            (grantee, target),
        )
        held = global_privileges | {str(row[0]) for row in cur.fetchall()}
    needed = list(TABLE_PRIVILEGES)
    for kind in sorted(kinds):
        needed += [p for p in KIND_PRIVILEGES.get(kind, ()) if p not in needed]
    missing = [p for p in needed if p not in held]
    super_ = "SUPER" in global_privileges
    sensitive = sorted(BINLOG_SENSITIVE & set(kinds))
    if sensitive and int(log_bin) and not int(trusted) and not super_:
        missing.append(f"SUPER or SET GLOBAL log_bin_trust_function_creators = 1 (binary "
                       f"logging is on and the dump creates {' and '.join(sensitive)}s)")
    others = sorted(d for d in definers if _account(d) != (user, host))
    if others and not super_:
        missing.append(f"SUPER (the dump's objects name DEFINER={', '.join(others)}, "
                       "another account than this one)")
    return missing


def _account(definer: str) -> tuple[str, str]:
    """`user`@`host` (or quoted with ', or bare) as (user, host)."""
    user, _, host = definer.rpartition("@")
    return _unquote(user), _unquote(host)


def _unquote(name: str) -> str:
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "`'":
        return name[1:-1].replace(name[0] * 2, name[0])
    return name
