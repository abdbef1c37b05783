"""Streaming dumps from the real mariadb-dump against a real MariaDB server.

Every dump is read as the agent reads it: by the pump (:mod:`agent.stream.compress_thread`),
compressed with zstd, into a ``send`` that stands for the link to the collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import stat
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.engines.mysql_connect import MySQLParams
from agent.engines.mysql_dump import (
    MySQLDump,
    client_option_file,
    dump_arguments,
    find_client_tool,
    find_dump_tool,
    option_value,
)
from agent.engines.mysql_inspect import table_checksums
from agent.engines.tool_dump import buffered_command
from agent.stream.compress_thread import CHUNK, DEPTH, pump
from common.compression import make_compressor
from common.errors import DumpError
from tests.integration.mariadb_server import MariaDBServer
from tests.integration.sample_data import create_sample_databases, generate_bulk
from tests.integration.sample_data import table_checksums as checksum_table
from tests.waiting import parked, wait_for

pytestmark = pytest.mark.integration

# Every character the option-file parser treats specially, plus non-ASCII.
AWKWARD_PASSWORD = "p#ss 'w\"o\\rd; ü €\\ "
BACKUP_USER = "backup"
BULK_DB = "bulk_dump"
DASH_DB = "-dash-db"


@pytest.fixture(scope="module")
def server(mariadb: MariaDBServer) -> MariaDBServer:
    create_sample_databases(mariadb)
    # Larger than what the pump and the pipes hold while a link holds a send (about
    # 7.5 MB), so a held dump tool is still running.
    generate_bulk(mariadb, BULK_DB, 16_000_000)
    mariadb.create_database(DASH_DB)
    mariadb.execute("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(10))", DASH_DB)
    mariadb.execute("INSERT INTO t VALUES (1, 'dash-ok')", DASH_DB)
    mariadb.create_user(
        BACKUP_USER,
        AWKWARD_PASSWORD,
        ["SELECT, SHOW VIEW, TRIGGER, EVENT ON *.*", "SELECT ON mysql.proc"],
    )
    return mariadb


class Link:
    """What the pump sends, decompressed again as it arrives: the dump's SQL.

    While ``moving`` is clear every send waits, as on a link that has stopped moving
    (``held`` starts it so); ``arrived`` is set by the first bytes.
    """

    def __init__(self, *, held: bool = False) -> None:
        self.sql = bytearray()
        self.arrived = asyncio.Event()
        self.moving = asyncio.Event()
        if not held:
            self.moving.set()
        self._zstd = zstandard.ZstdDecompressor().decompressobj()

    async def send(self, out: bytes) -> None:
        self.sql += self._zstd.decompress(out)
        self.arrived.set()
        await self.moving.wait()


async def stream(dump: MySQLDump, link: Link) -> None:
    """The dump through the agent's pump into ``link``, to its end."""
    await pump(dump, make_compressor("zstd"), link.send)


@contextlib.asynccontextmanager
async def streaming_held(dump: MySQLDump) -> AsyncIterator[Link]:
    """The pump streams ``dump`` into a link that holds every send; entered once the
    first bytes have arrived. Leaving stops the pump, as a failed link does."""
    link = Link(held=True)
    task = asyncio.create_task(stream(dump, link))
    try:
        await wait_for(lambda: link.arrived.is_set() or task.done(), "the first bytes", 60)
        if task.done():
            task.result()  # the dump failed before sending anything: say how
        yield link
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def pump_thread() -> threading.Thread:
    (thread,) = [t for t in threading.enumerate() if t.name == "backhaul-dump-pump"]
    return thread


def blocked_writing_its_output(pid: int) -> bool:
    """Whether process ``pid`` is blocked in write(2) on its stdout (fd 1), a full pipe."""
    try:
        syscall = Path(f"/proc/{pid}/syscall").read_text().split()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False
    return len(syscall) > 1 and syscall[1] == "0x1" and "pipe_write" in wchan


def backup_params(server: MariaDBServer, *, via_socket: bool = False) -> MySQLParams:
    if via_socket:
        return MySQLParams("localhost", 0, server.socket, BACKUP_USER, AWKWARD_PASSWORD)
    return MySQLParams("127.0.0.1", server.port, None, BACKUP_USER, AWKWARD_PASSWORD)


def root_params(server: MariaDBServer) -> MySQLParams:
    return MySQLParams("127.0.0.1", server.port, None, "root", server.root_password)


async def dump_bytes(params: MySQLParams, database: str) -> bytes:
    link = Link()
    async with MySQLDump(params, database) as dump:
        await stream(dump, link)
    data = bytes(link.sql)
    assert dump.bytes_read == len(data)
    assert dump.returncode == 0
    assert dump.tool is not None and Path(dump.tool).name == "mariadb-dump"
    return data


def restore(server: MariaDBServer, database: str, sql: bytes) -> None:
    server.create_database(database)
    subprocess.run(
        [find_client_tool(), f"--defaults-file={server.defaults_file}", database],
        input=sql,
        check=True,
        capture_output=True,
        timeout=60,
    )


def schema_objects(server: MariaDBServer, database: str) -> dict[str, set[str]]:
    def names(sql: str) -> set[str]:
        return {str(row[0]) for row in server.query(sql, args=(database,))}

    return {
        "views": names("SELECT TABLE_NAME FROM information_schema.VIEWS WHERE TABLE_SCHEMA = %s"),
        "triggers": names(
            "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = %s"
        ),
        "routines": names(
            "SELECT CONCAT(ROUTINE_TYPE, ' ', ROUTINE_NAME) FROM information_schema.ROUTINES "
            "WHERE ROUTINE_SCHEMA = %s"
        ),
        "events": names("SELECT EVENT_NAME FROM information_schema.EVENTS WHERE EVENT_SCHEMA = %s"),
    }


def proc_bytes(pid: int, name: str) -> bytes:
    return Path(f"/proc/{pid}/{name}").read_bytes()


def process_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


# -- arguments and option file -----------------------------------------------------------------


def test_arguments_start_with_the_option_file_and_end_with_the_database() -> None:
    args = dump_arguments(Path("/x/client.cnf"), "-rf")
    assert args[0] == "--defaults-extra-file=/x/client.cnf"
    assert args[-2:] == ["--", "-rf"]
    assert "--single-transaction" in args
    assert "--databases" not in args
    assert "--all-databases" not in args


def test_option_value_escapes_quotes_backslashes_and_newlines() -> None:
    assert option_value('a"b\\c\nd#e') == '"a\\"b\\\\c\\nd#e"'
    with pytest.raises(DumpError):
        option_value("nul\0byte")


def _print_defaults(path: Path) -> str:
    tool = shutil.which("my_print_defaults")
    assert tool, "my_print_defaults (mariadb-client) is needed to check option-file quoting"
    result = subprocess.run(
        [tool, f"--defaults-file={path}", "client"],
        capture_output=True,
        check=True,
        env={"PATH": os.defpath},
    )
    return result.stdout.decode("utf-8")


@settings(max_examples=150, deadline=None)
@given(
    password=st.text(
        st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=40
    )
)
def test_option_file_round_trips_any_password_through_the_real_parser(password: str) -> None:
    """What my_print_defaults (the same parser the dump tool uses) reads back is the password."""
    params = MySQLParams("127.0.0.1", 3306, None, "u", password)
    with client_option_file(params) as path:
        output = _print_defaults(path)
    # The file's order is user, password, protocol: cut the value out between them.
    before, _, rest = output.partition("--password=")
    value, _, after = rest.rpartition("\n--protocol=tcp\n")
    assert before == "--user=u\n"
    assert after.startswith("--host=127.0.0.1\n")
    assert value == password


# -- successful dumps --------------------------------------------------------------------------


async def test_dump_restores_into_another_database_with_identical_checksums(
    server: MariaDBServer,
) -> None:
    """BLOBs, NULLs, emoji, JSON, DECIMAL, DATETIME(6), views, triggers, routines, events."""
    data = await dump_bytes(backup_params(server), "tricky")
    assert b"CREATE DATABASE" not in data
    assert not any(line.startswith(b"USE ") for line in data.splitlines())
    restore(server, "tricky_restored", data)
    assert checksum_table(server, "tricky_restored") == (
        checksum_table(server, "tricky")
    )
    assert table_checksums(root_params(server), "tricky_restored") == (
        table_checksums(root_params(server), "tricky")
    )
    objects = schema_objects(server, "tricky_restored")
    assert objects == schema_objects(server, "tricky")
    assert objects["routines"] == {"PROCEDURE add_customer", "FUNCTION customer_count"}
    assert objects["events"] == {"purge_audit"}
    assert server.query("SELECT `tricky_restored`.customer_count()") == [(5,)]
    original = server.query("SELECT data FROM attachments ORDER BY id", "tricky")
    assert server.query("SELECT data FROM attachments ORDER BY id", "tricky_restored") == original


async def test_dump_of_hyphenated_database_with_myisam_table_restores(
    server: MariaDBServer,
) -> None:
    data = await dump_bytes(backup_params(server, via_socket=True), "my-db")
    restore(server, "my-db-restored", data)
    assert checksum_table(server, "my-db-restored") == (
        checksum_table(server, "my-db")
    )


async def test_database_name_starting_with_dash_is_not_an_option(server: MariaDBServer) -> None:
    data = await dump_bytes(backup_params(server), DASH_DB)
    assert b"dash-ok" in data
    assert b"CREATE TABLE `t`" in data


def test_find_tools_prefer_mariadb_names_and_fail_clearly(tmp_path: Path) -> None:
    assert Path(find_dump_tool()).name == "mariadb-dump"
    assert Path(find_client_tool()).name == "mariadb"
    with pytest.raises(DumpError, match="neither mariadb-dump nor mysqldump found on PATH"):
        find_dump_tool(str(tmp_path))
    with pytest.raises(DumpError, match="neither mariadb nor mysql found on PATH"):
        find_client_tool(str(tmp_path))
    (tmp_path / "mysqldump").symlink_to(find_dump_tool())
    assert find_dump_tool(str(tmp_path)) == str(tmp_path / "mysqldump")


def test_the_dump_tool_runs_behind_stdbuf_when_coreutils_has_it(tmp_path: Path) -> None:
    tool = find_dump_tool()
    assert buffered_command(tool, str(tmp_path)) == [tool], "no stdbuf: the tool as it is"
    stdbuf = shutil.which("stdbuf")
    assert stdbuf is not None, "coreutils' stdbuf is on every Debian system"
    (tmp_path / "stdbuf").symlink_to(stdbuf)
    assert buffered_command(tool, str(tmp_path)) == [
        str(tmp_path / "stdbuf"), "--output=256K", tool
    ]


async def test_the_dump_tool_writes_through_a_256_kib_buffer(server: MariaDBServer) -> None:
    """One write per 256 KiB instead of one per 4 KiB page: the pipe's reader wakes less."""
    async with MySQLDump(backup_params(server), BULK_DB) as dump, streaming_held(dump):
        assert dump.pid is not None
        assert Path(proc_bytes(dump.pid, "cmdline").split(b"\0")[0].decode()).name == \
            "mariadb-dump", "stdbuf has exec'd the tool: same pid, the tool's own status"
        assert b"_STDBUF_O=262144" in proc_bytes(dump.pid, "environ").split(b"\0")


# -- secrets -----------------------------------------------------------------------------------


async def test_credentials_stay_in_a_private_option_file_removed_once_read(
    server: MariaDBServer,
) -> None:
    secret = AWKWARD_PASSWORD.encode()
    async with MySQLDump(backup_params(server), BULK_DB) as dump:
        option_file = dump.option_file
        assert option_file is not None and dump.pid is not None
        assert stat.S_IMODE(option_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(option_file.parent.stat().st_mode) == 0o700
        assert option_file.stat().st_uid == os.geteuid()
        assert b"password=" in option_file.read_bytes()
        async with streaming_held(dump):
            assert not option_file.exists(), "the tool has read its options once it writes"
            cmdline = proc_bytes(dump.pid, "cmdline")
            environ = proc_bytes(dump.pid, "environ")
        assert cmdline, "the dump process should still be running (blocked on the pipe)"
        assert cmdline.split(b"\0")[1] == f"--defaults-extra-file={option_file}".encode()
        assert secret not in cmdline
        assert secret not in environ
        assert b"PWD" not in environ
        assert b"HOME=" not in environ
    assert not option_file.parent.exists()


async def test_option_file_is_removed_after_a_complete_dump(server: MariaDBServer) -> None:
    async with MySQLDump(backup_params(server), "tricky") as dump:
        await stream(dump, Link())
        assert dump.option_file is not None
        assert not dump.option_file.exists()


# -- back-pressure and early exit ----------------------------------------------------------------


async def test_slow_link_blocks_the_dump_tool(server: MariaDBServer) -> None:
    """A link that stops moving stops the pump, then the dump tool on its full pipe."""
    async with MySQLDump(backup_params(server), BULK_DB) as dump, streaming_held(dump):
        assert dump.pid is not None
        pid, thread = dump.pid, pump_thread()
        await wait_for(lambda: parked(thread) and blocked_writing_its_output(pid),
                       "the pump and the dump tool to wait for the link", 30)
        assert dump.returncode is None
        # What the pump may hold while the link holds its first send (see test_pump).
        assert dump.bytes_read <= (DEPTH + 2) * CHUNK


async def test_leaving_early_kills_and_reaps_the_process(server: MariaDBServer) -> None:
    async with MySQLDump(backup_params(server), BULK_DB) as dump, streaming_held(dump):
        pass
    assert dump.returncode is not None and dump.returncode < 0
    assert dump.pid is not None
    assert not process_exists(dump.pid)
    assert dump.option_file is not None and not dump.option_file.exists()


async def test_cancellation_kills_the_process_and_removes_the_option_file(
    server: MariaDBServer,
) -> None:
    link = Link(held=True)
    holder: list[MySQLDump] = []

    async def consume() -> None:
        async with MySQLDump(backup_params(server), BULK_DB) as dump:
            holder.append(dump)
            await stream(dump, link)

    task = asyncio.create_task(consume())
    await asyncio.wait_for(link.arrived.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    dump = holder[0]
    assert dump.returncode is not None
    assert dump.option_file is not None and not dump.option_file.exists()


async def test_consumer_error_propagates_and_kills_the_process(server: MariaDBServer) -> None:
    async def send(out: bytes) -> None:
        _ = 1 / 0

    with pytest.raises(ZeroDivisionError):
        async with MySQLDump(backup_params(server), BULK_DB) as dump:
            await pump(dump, make_compressor("zstd"), send)
    assert dump.returncode is not None


# -- failures ------------------------------------------------------------------------------------


async def test_unknown_database_fails_with_exit_status_and_stderr(server: MariaDBServer) -> None:
    with pytest.raises(DumpError) as info:
        await dump_bytes(backup_params(server), "no_such_db")
    error = info.value
    assert error.returncode == 2
    assert "Unknown database" in error.stderr
    assert "mariadb-dump exited with status 2" in str(error)
    assert "'no_such_db'" in str(error)
    assert "\n" not in str(error)


async def test_wrong_password_fails_without_revealing_it(server: MariaDBServer) -> None:
    params = MySQLParams("127.0.0.1", server.port, None, BACKUP_USER, "Wrong#Secret 42")
    with pytest.raises(DumpError) as info:
        await dump_bytes(params, "tricky")
    assert "Access denied" in str(info.value)
    assert "Wrong#Secret 42" not in str(info.value)
    assert "Wrong#Secret 42" not in info.value.stderr


async def test_missing_tool_is_a_dump_error(server: MariaDBServer, tmp_path: Path) -> None:
    with pytest.raises(DumpError, match="cannot start"):
        async with MySQLDump(backup_params(server), "tricky", tool=str(tmp_path / "nope")):
            pass


async def test_a_stdbuf_that_cannot_start_is_named_in_the_error(
    server: MariaDBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken stdbuf is reported as such, not as a missing dump tool; nothing is left."""
    tool = shutil.which("mariadb-dump") or shutil.which("mysqldump")
    assert tool is not None
    broken = tmp_path / "bin" / "stdbuf"
    broken.parent.mkdir()
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    monkeypatch.setenv("PATH", f"{broken.parent}{os.pathsep}{os.environ['PATH']}")
    dump = MySQLDump(backup_params(server), "tricky", tool=tool)
    with pytest.raises(DumpError, match=r"^cannot start stdbuf: No such file or directory$"):
        async with dump:
            pass
    assert dump.option_file is None or not dump.option_file.exists()


async def test_dump_tool_killed_by_a_signal_is_a_dump_error(server: MariaDBServer) -> None:
    killed = False

    async def send(out: bytes) -> None:
        nonlocal killed
        # Once only: the child is reaped before asyncio records its exit status, so a
        # second kill could find no such process.
        if not killed and dump.pid is not None:
            os.kill(dump.pid, signal.SIGKILL)
            killed = True

    with pytest.raises(DumpError, match="mariadb-dump was killed by SIGKILL") as info:
        async with MySQLDump(backup_params(server), BULK_DB) as dump:
            await pump(dump, make_compressor("zstd"), send)
    assert info.value.returncode == -signal.SIGKILL


async def test_server_killed_mid_dump_is_a_dump_error(mariadb_fresh: MariaDBServer) -> None:
    generate_bulk(mariadb_fresh, "big", 24_000_000)
    params = root_params(mariadb_fresh)
    link = Link()

    async def send(out: bytes) -> None:
        if not link.arrived.is_set():
            mariadb_fresh.kill()
        await link.send(out)

    with pytest.raises(DumpError) as info:
        async with MySQLDump(params, "big") as dump:
            await pump(dump, make_compressor("zstd"), send)
    assert info.value.returncode not in (0, None)
    assert "Lost connection" in str(info.value) or "gone away" in str(info.value)
    assert len(link.sql) < 24_000_000
