"""The pymysql control path against a real MariaDB: discovery, preflight, checksums."""

from __future__ import annotations

import re
import ssl

import pytest

from agent.engines.mysql_connect import MySQLParams, connect
from agent.engines.mysql_inspect import discover_databases, preflight, table_checksums
from common.errors import DumpError
from tests.integration.loopback import free_port
from tests.integration.mariadb_server import MariaDBServer
from tests.integration.sample_data import create_sample_databases
from tests.integration.sample_data import table_checksums as checksum_table

pytestmark = pytest.mark.integration

BACKUP_GRANTS = "SELECT, SHOW VIEW, TRIGGER, EVENT, LOCK TABLES ON `tricky`.*"
SECRET = "Pa55#'\"wörd with spaces\\"


@pytest.fixture(scope="module")
def server(mariadb: MariaDBServer) -> MariaDBServer:
    create_sample_databases(mariadb)
    return mariadb


def tcp_params(
    server: MariaDBServer, user: str = "root", password: str | None = None
) -> MySQLParams:
    if password is None and user == "root":
        password = server.root_password
    return MySQLParams(
        host="127.0.0.1", port=server.port, socket=None, user=user, password=password
    )


def socket_params(server: MariaDBServer) -> MySQLParams:
    return MySQLParams(
        host="localhost", port=0, socket=server.socket, user="root", password=server.root_password
    )


def test_params_repr_never_shows_the_password() -> None:
    params = MySQLParams("db.example", 3306, None, "backup", SECRET)
    assert SECRET not in repr(params)
    assert "***" in repr(params)
    assert "backup" in repr(params)


@pytest.mark.parametrize(("host", "sock", "local"), [
    ("127.0.0.1", None, True),
    ("127.3.2.1", None, True),
    ("::1", None, True),
    ("LocalHost", None, True),
    ("db.example", "/run/mysqld/mysqld.sock", True),
    ("192.0.2.7", None, False),
    ("2001:db8::7", None, False),
    ("db.example", None, False),
    ("localhost.example", None, False),
])
def test_a_server_is_on_this_host_by_its_socket_or_a_loopback_address(
    host: str, sock: str | None, local: bool,
) -> None:
    assert MySQLParams(host, 3306, sock, "backup", None).on_this_host is local


@pytest.mark.parametrize("how", ["tcp", "socket"])
def test_a_connection_on_this_host_neither_tries_tls_nor_loads_the_ca_bundle(
    server: MariaDBServer, how: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    contexts: list[object] = []
    real = ssl.create_default_context

    def counted(*args: object, **kwargs: object) -> ssl.SSLContext:
        contexts.append(args)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ssl, "create_default_context", counted)
    params = tcp_params(server) if how == "tcp" else socket_params(server)
    with connect(params) as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
        assert cur.connection.ssl is False
    assert contexts == []


def test_discovery_lists_user_databases_and_skips_system_schemas(server: MariaDBServer) -> None:
    names = discover_databases(tcp_params(server))
    assert {"tricky", "my-db"} <= set(names)
    assert not {"information_schema", "performance_schema", "mysql", "sys"} & set(names)


def test_discovery_works_over_the_unix_socket(server: MariaDBServer) -> None:
    assert "my-db" in discover_databases(socket_params(server))


def test_preflight_describes_server_and_database(server: MariaDBServer) -> None:
    result = preflight(tcp_params(server), "tricky")
    assert re.match(r"\d+\.\d+\.\d+-MariaDB", result.server_version)
    assert result.engine_flavor == "mariadb"
    assert result.tables == ["attachments", "audit", "customers", "order", "select"]
    assert result.views == ["customer_summary"]
    assert result.non_innodb_tables == []
    assert result.size_estimate > 300_000  # the 300 kB random BLOB alone
    assert result.warnings == []


def test_preflight_reports_myisam_tables_as_not_innodb(server: MariaDBServer) -> None:
    result = preflight(socket_params(server), "my-db")
    assert result.non_innodb_tables == ["legacy_log"]
    assert result.tables == ["items", "legacy_log"]
    assert any("legacy_log" in warning for warning in result.warnings)


def test_preflight_records_binlog_file_position_and_gtid(server: MariaDBServer) -> None:
    before = preflight(tcp_params(server), "tricky").binlog
    assert before is not None
    (file, position, *_rest) = server.query("SHOW MASTER STATUS")[0]
    assert before["file"] == file
    assert before["position"] == position
    assert str(before["gtid_current_pos"]).startswith("0-1-")
    server.execute("INSERT INTO `select` (`where`, `group`) VALUES (100, 'x')", "tricky")
    try:
        after = preflight(tcp_params(server), "tricky").binlog
    finally:
        server.execute("DELETE FROM `select` WHERE `where` = 100", "tricky")
    assert after is not None
    assert int(after["position"]) > int(before["position"])


def test_preflight_without_binlog_privilege_records_none(server: MariaDBServer) -> None:
    """Lacking BINLOG MONITOR must not fail the backup; the position is just not recorded."""
    server.create_user("nobinlog", SECRET, [BACKUP_GRANTS, "SELECT ON mysql.proc"])
    result = preflight(tcp_params(server, "nobinlog", SECRET), "tricky")
    assert result.binlog is None
    assert any("binlog" in warning for warning in result.warnings)


def test_preflight_with_binary_logging_off_records_none() -> None:
    with MariaDBServer(log_bin=False) as plain:
        plain.create_database("empty")
        result = preflight(tcp_params(plain), "empty")
    assert result.binlog is None
    assert result.warnings == []
    assert result.tables == []


def test_wrong_password_is_a_dump_error_that_hides_the_password(server: MariaDBServer) -> None:
    server.create_user("wrongpw", "the-right-one", BACKUP_GRANTS)
    with pytest.raises(DumpError) as info:
        preflight(tcp_params(server, "wrongpw", SECRET), "tricky")
    message = str(info.value)
    assert SECRET not in message
    assert f"127.0.0.1:{server.port}" in message
    assert "wrongpw" in message
    assert "\n" not in message


def test_unknown_database_is_a_dump_error(server: MariaDBServer) -> None:
    with pytest.raises(DumpError, match="'no_such_db' does not exist"):
        preflight(tcp_params(server), "no_such_db")


def test_unreachable_server_is_a_dump_error_naming_the_endpoint() -> None:
    port = free_port()
    params = MySQLParams("127.0.0.1", port, None, "root", SECRET)
    with pytest.raises(DumpError, match=f"cannot connect .*127.0.0.1:{port}") as info:
        discover_databases(params)
    assert SECRET not in str(info.value)


def test_user_without_access_to_the_database_is_refused(server: MariaDBServer) -> None:
    server.create_user("elsewhere", SECRET, "SELECT ON `my-db`.*")
    with pytest.raises(DumpError, match="no access to database 'tricky'"):
        preflight(tcp_params(server, "elsewhere", SECRET), "tricky")


def test_missing_dump_privileges_are_listed(server: MariaDBServer) -> None:
    server.create_user("selectonly", SECRET, "SELECT ON `tricky`.*")
    with pytest.raises(DumpError) as info:
        preflight(tcp_params(server, "selectonly", SECRET), "tricky")
    message = str(info.value)
    assert "SHOW VIEW on `customer_summary`" in message
    assert "TRIGGER on `attachments`" in message
    assert "EVENT" in message
    assert SECRET not in message


def test_missing_select_on_one_table_is_reported(server: MariaDBServer) -> None:
    grants = [
        "SHOW VIEW, TRIGGER, EVENT ON `my-db`.*",
        "SELECT ON `my-db`.`items`",
    ]
    server.create_user("partial", SECRET, grants)
    with pytest.raises(DumpError, match="SELECT on `legacy_log`"):
        preflight(tcp_params(server, "partial", SECRET), "my-db")


def test_unreadable_routine_definitions_fail_preflight(server: MariaDBServer) -> None:
    """EXECUTE shows a routine but not its body; the dump tool would fail on it."""
    server.create_user("executor", SECRET, BACKUP_GRANTS.replace("LOCK TABLES", "EXECUTE"))
    with pytest.raises(DumpError, match="stored routines `add_customer`, `customer_count`"):
        preflight(tcp_params(server, "executor", SECRET), "tricky")


def test_invisible_routines_are_a_warning(server: MariaDBServer) -> None:
    server.create_user("noproc", SECRET, BACKUP_GRANTS)
    result = preflight(tcp_params(server, "noproc", SECRET), "tricky")
    assert any("stored routine" in warning for warning in result.warnings)


def test_documented_backup_grants_pass_without_routine_warning(server: MariaDBServer) -> None:
    server.create_user("backup", SECRET, [BACKUP_GRANTS, "SELECT ON mysql.proc"])
    result = preflight(tcp_params(server, "backup", SECRET), "tricky")
    assert not any("routine" in warning for warning in result.warnings)
    assert result.tables == preflight(tcp_params(server), "tricky").tables


def test_table_checksums_count_rows_and_match_checksum_table(server: MariaDBServer) -> None:
    result = table_checksums(tcp_params(server), "tricky")
    expected = checksum_table(server, "tricky")
    assert {name: value["checksum"] for name, value in result.items()} == expected
    assert result["customers"]["rows"] == 5  # four inserted, one added by the procedure
    assert result["attachments"]["rows"] == 5
    assert result["audit"]["rows"] == 1  # written by the trigger
    assert "customer_summary" not in result


def test_table_checksums_of_unknown_database_is_a_dump_error(server: MariaDBServer) -> None:
    with pytest.raises(DumpError):
        table_checksums(tcp_params(server), "no_such_db")
