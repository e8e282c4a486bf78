"""A throwaway PostgreSQL server for the distributed-search tests.

``postgres_server`` (session scope) runs ``initdb`` and ``pg_ctl`` from Debian's
``postgresql`` package in a temporary folder, listening only on 127.0.0.1 at a free port, with
password authentication (so the tests can check that passwords never reach the output), and
stops it at teardown. PostgreSQL refuses to run as root: as root, the server runs as the
``postgres`` user (or ``nobody``). Without the server binaries the tests are skipped locally,
and fail when ``AUTOML_TL_REQUIRE_POSTGRES=1`` (as ``.ci/run`` sets).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

PASSWORD = "s3cret-" + secrets.token_hex(4)  # unique, so a leak is unmistakable in any output


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    password: str

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL (with the password)."""
        import psycopg2

        name = "automl_" + uuid.uuid4().hex[:10]
        conn = psycopg2.connect(self.url())
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.url(name)

    def connections(self, database_url: str) -> int:
        """Client connections now open to the database of ``database_url``."""
        import psycopg2

        database = database_url.rsplit("/", 1)[1]
        conn = psycopg2.connect(self.url())
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )
            (count,) = cur.fetchone()
        conn.close()
        return int(count)


def _bin_dir() -> Path | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as(uid: int | None, gid: int | None):
    if uid is None:
        return None

    def demote() -> None:
        os.setgid(gid)
        os.setgroups([])
        os.setuid(uid)

    return demote


class Unavailable(Exception):
    """No PostgreSQL server can be started here (the reason is the message)."""


@contextlib.contextmanager
def running_server(password: str = PASSWORD):
    """Start a throwaway server (initdb + pg_ctl in a temp folder, loopback only, a free port,
    password auth); yield a :class:`PostgresServer`; stop it and delete its files after."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise Unavailable("initdb/pg_ctl were not found in /usr/lib/postgresql/*/bin or on PATH")
    try:
        import psycopg2  # noqa: F401
    except ImportError as exc:
        raise Unavailable("psycopg2 is not installed (pip install -e '.[dev]')") from exc
    uid = gid = None
    if os.geteuid() == 0:  # the server refuses to run as root
        for name in ("postgres", "nobody"):
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            uid, gid = entry.pw_uid, entry.pw_gid
            break
        else:
            raise Unavailable("running as root and there is no 'postgres' or 'nobody' user")
    folder = Path(tempfile.mkdtemp(prefix="automl-tl-pg-"))
    try:
        data = folder / "data"
        pwfile = folder / "pw"
        pwfile.write_text(password + "\n")
        if uid is not None:
            os.chown(folder, uid, gid)
            os.chown(pwfile, uid, gid)
        demote = _run_as(uid, gid)
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        pg = {"preexec_fn": demote, "env": env, "cwd": folder, "capture_output": True, "text": True}
        initdb = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--pwfile", str(pwfile)]
            + ["--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync"],
            **pg,
        )
        if initdb.returncode != 0:
            raise Unavailable(f"initdb failed: {initdb.stdout}{initdb.stderr}")
        port = _free_port()
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={folder} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=100"
        )
        started = subprocess.run(
            [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log")]
            + ["-w", "-t", "60", "start"],
            **pg,
        )
        if started.returncode != 0:
            log = (folder / "log").read_text() if (folder / "log").exists() else ""
            raise Unavailable(f"pg_ctl start failed: {started.stdout}{started.stderr}\n{log}")
        try:
            yield PostgresServer("127.0.0.1", port, "postgres", password)
        finally:
            subprocess.run(
                [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], **pg
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """A server for the whole session (each test takes its own database: ``postgres_url``)."""
    try:
        with running_server() as server:
            yield server
    except Unavailable as exc:
        if os.environ.get("AUTOML_TL_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required here (AUTOML_TL_REQUIRE_POSTGRES=1) but {exc}")
        pytest.skip(f"no PostgreSQL server for this test: {exc} (install the postgresql package)")


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The URL of a fresh database on the session's server (password included)."""
    return postgres_server.new_database()
