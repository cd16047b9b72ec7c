"""The embedded PostgreSQL (the `pgserver` wheel's binaries, what a machine without PostgreSQL uses) runs as
the unprivileged server user even when the virtualenv lies under a folder that user cannot traverse."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import asyncpg
import pytest

from app.local.ports import free_port
from app.local.postgres import Cluster, ensure_pg_user, find_pg_bin, first_untraversable_parent


def _wheel_install() -> Path:
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the embedded-pg extra (pgserver) is not installed: run `bash ci/bootstrap.sh`")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


@pytest.mark.skipif(os.geteuid() != 0, reason="as another user the server runs as that user: nothing to hide")
async def test_the_wheels_binaries_hidden_in_a_private_folder_are_copied_where_the_server_user_runs_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, work_dir: Path
) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    # The wheel's layout: the package's binaries, and its shared libraries beside the package.
    install = _wheel_install()
    shutil.copytree(install, private / "pgserver" / "pginstall", symlinks=True)
    shutil.copytree(install.parent.parent / "pgserver.libs", private / "pgserver.libs", symlinks=True)
    monkeypatch.setenv("TXROUTE_PG_BIN", str(private / "pgserver" / "pginstall" / "bin"))
    run_as = ensure_pg_user()
    bin_dir = find_pg_bin()
    try:
        assert not bin_dir.is_relative_to(private), f"expected a copy outside the private folder, got {bin_dir}"
        assert first_untraversable_parent(bin_dir / "postgres", run_as) is None, bin_dir
        assert find_pg_bin() == bin_dir, "expected the copy made once and reused"
        cluster = Cluster(work_dir / "embedded", free_port(), run_as, bin_dir)
        cluster.init(fsync=False)
        cluster.start()
        try:
            connection = await asyncpg.connect(cluster.dsn("postgres"))
            try:
                assert str(await connection.fetchval("show server_version")).startswith("16"), "expected pgserver's 16"
            finally:
                await connection.close()
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(bin_dir.parents[2], ignore_errors=True)
