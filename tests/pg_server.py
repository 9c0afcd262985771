"""A real PostgreSQL server for the tests, started by the suite itself.

`postgres_server` (session): `initdb` + `pg_ctl start` in a temp dir, listening on
127.0.0.1 on a free port (trust auth, loopback only, fsync off), stopped and deleted at
the end. initdb refuses to run as root, so under root the cluster belongs to `nobody`
and the server binaries run through `runuser -u nobody` (util-linux); as any other user
they run directly. Without the binaries (PATH, or /usr/lib/postgresql/*/bin) every
PostgreSQL case skips with the reason; CI installs them (Debian: postgresql).

`pg_url` (per test): a fresh database on that server, dropped afterwards.
`db_target` (per test, parametrized): a SQLite path or a PostgreSQL URL for
bot.storage.open_database, so one storage test runs against both backends.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

_names = itertools.count(1)


def pg_bin_dir() -> Path | None:
    """The folder holding initdb and pg_ctl, or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return versions[-1].parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    bin_dir: Path
    base: Path
    port: int
    as_user: list[str]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def tool(self, name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.as_user, str(self.bin_dir / name), *args],
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def start(self) -> None:
        """pg_ctl start (again, after stop()); waits until it accepts connections.
        fsync off is safe while the machine itself does not crash; synchronous_commit stays
        on, or an immediate stop would lose the last commits."""
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        log = self.base / "log"
        started = self.tool(
            "pg_ctl", "-D", str(self.base / "data"), "-l", str(log), "-o", options, "-w",
            "-t", "60", "start",
        )  # fmt: skip
        if started.returncode:
            tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {started.stderr.strip()[-300:]} {tail}")

    def stop(self) -> None:
        """pg_ctl stop -m immediate: every connection is cut at once (a crash, for clients)."""
        self.tool("pg_ctl", "-D", str(self.base / "data"), "-m", "immediate", "-w", "stop")

    def admin(self, sql: str) -> None:
        """Run one statement as the postgres role (in a thread: a test's event loop may be
        running or about to be)."""

        async def go() -> None:
            conn = await asyncpg.connect(self.url(), timeout=30)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, go()).result(timeout=60)


def start_server() -> PgServer:
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL's initdb/pg_ctl not found")
    base = Path(tempfile.mkdtemp(prefix="sitcom-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(base, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    server = PgServer(bin_dir, base, _free_port(), as_user)
    init = server.tool(
        "initdb", "-D", str(base / "data"), "-U", "postgres", "-A", "trust", "-E", "UTF8",
        "--locale=C", "--no-sync",
    )  # fmt: skip
    if init.returncode:
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {init.stderr.strip()[-500:]}")
    try:
        server.start()
    except RuntimeError:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return server


def stop_server(server: PgServer) -> None:
    server.stop()
    shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    if pg_bin_dir() is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
            "/usr/lib/postgresql/*/bin; install the postgresql package to run these cases"
        )
    server = start_server()
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def pg_url(postgres_server: PgServer):
    """A fresh, empty database for one test."""
    name = f"t{os.getpid()}_{next(_names)}"
    postgres_server.admin(f"CREATE DATABASE {name}")
    yield postgres_server.url(name)
    postgres_server.admin(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_target(request, tmp_path) -> str | Path:
    """Where bot.storage.open_database opens the store: a SQLite file, or a fresh PostgreSQL
    database; reopening the same target finds the same data."""
    if request.param == "sqlite":
        return tmp_path / "a.db"
    return request.getfixturevalue("pg_url")
