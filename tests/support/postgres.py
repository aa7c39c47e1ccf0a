"""A throw-away PostgreSQL server on a free loopback port, for tests."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.peers import free_port, need_binary

PG_BIN = "/usr/lib/postgresql/*/bin"


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb refuses to run as root: run the server as the `postgres` user then."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server in a fresh folder; yields a ``postgresql://`` URL; stops and removes it."""
    # Not under pytest's tmp_path: that is mode 0700 and the server runs as `postgres`.
    tmp = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
    tmp.chmod(0o755)
    initdb = need_binary("initdb", PG_BIN)
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    data = tmp / "pgdata"
    sock = tmp / "pgsock"
    data.mkdir(mode=0o700)
    sock.mkdir()
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for p in (tmp, data, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    subprocess.run(_as_postgres([initdb, "-D", str(data), "-U", "node", "--auth=trust",
                                 "-E", "UTF8", "--no-sync"]),
                   check=True, capture_output=True)
    port = free_port()
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-o", opts, "-l",
                                 str(tmp / "pg.log"), "-w", "start"]),
                   check=True, capture_output=True)
    try:
        createdb = shutil.which("createdb") or str(Path(initdb).with_name("createdb"))
        for _ in range(50):
            r = subprocess.run([createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "node",
                                "dicomnode"], capture_output=True)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"createdb failed: {r.stderr.decode()}")
        yield f"postgresql://node@127.0.0.1:{port}/dicomnode"
    finally:
        subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
