"""File and directory permissions on a local disk.

* By default everything a save or a prune creates honours the umask (``0o666`` / ``0o777`` less
  the umask, as ``open()`` and ``mkdir()`` give), and nothing is ever world-writable, even
  under umask 000.
* ``file_mode=0o600`` (or any mode without ``o+w``) gives every file exactly that mode and every
  directory the same plus ``x`` where ``r`` is granted (``0o700``), whatever the umask; a
  world-writable or out-of-range ``file_mode`` is a ``ValueError``.

Every file and directory under the root is checked after saves, retention and a CLI prune, and
so are the short-lived lease and lock records (observed as they are written).

And the root is a boundary: a symlink inside it that leads outside (a shard file, a step
directory) is neither read nor written through.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import shardckpt
from shardckpt.cli.main import main as cli_main
from shardckpt.storage import lease as lease_mod
from shardckpt.storage import location as location_mod
from shardckpt.storage import open_location


def state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(40, 30, generator=g), "b": torch.randn(17, generator=g),
            "step": step}


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDCKPT_LOCK_SETTLE_MS", "0")  # one process: no contenders
    monkeypatch.setenv("SHARDCKPT_FSYNC", "0")


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


@pytest.fixture
def records(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(path, mode) of every lease / lock record as it is written (they are gone by the end)."""
    seen: list[tuple[str, int]] = []
    real = lease_mod.put_record

    def put_record(location: Any, relpath: str, record: Any) -> None:
        real(location, relpath, record)
        if isinstance(location, location_mod.LocalLocation):
            path = location._path(relpath)
            seen.append((path, stat.S_IMODE(os.stat(path).st_mode)))

    monkeypatch.setattr(lease_mod, "put_record", put_record)
    return seen


def save_and_prune(root: Path, **kwargs: Any) -> None:
    """Saves (async and blocking), retention deleting old steps, a re-save over a partial
    directory, the manager's prune, and ``shardckpt prune`` from the command line."""
    policy = shardckpt.RetentionPolicy(keep_last=2)
    with shardckpt.CheckpointManager(str(root), retention=policy, **kwargs) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state(step), blocking=step == 2).wait()
        (root / "step-0000000004").mkdir(exist_ok=True)  # a crashed save's leftovers ...
        (root / "step-0000000004" / "rank00000-000.shard").write_bytes(b"partial")
        mgr.save(4, state(4)).wait()  # ... replaced by a new save
        mgr.prune()
    assert cli_main(["prune", str(root), "--keep-last", "1", "--grace", "0"]) == 0
    with shardckpt.CheckpointManager(str(root)) as mgr:
        assert mgr.steps() == [4]
        got = {"w": torch.zeros(40, 30), "b": torch.zeros(17), "step": 0}
        mgr.load(got)
        assert torch.equal(got["w"], state(4)["w"]) and got["step"] == 4


def modes(top: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Modes of every file and every directory under ``top`` (``top`` included)."""
    files, dirs = {}, {str(top): stat.S_IMODE(top.stat().st_mode)}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames:
            dirs[os.path.join(dirpath, name)] = stat.S_IMODE(os.lstat(os.path.join(dirpath,
                                                                               name)).st_mode)
        for name in filenames:
            files[os.path.join(dirpath, name)] = stat.S_IMODE(os.lstat(os.path.join(dirpath,
                                                                                name)).st_mode)
    return files, dirs


def assert_modes(top: Path, file_mode: int, dir_mode: int) -> None:
    files, dirs = modes(top)
    assert any(p.endswith(".shard") for p in files) and any(p.endswith("manifest.json")
                                                          for p in files)
    assert any(p.endswith(".shardckpt") for p in dirs)
    bad = {p: oct(m) for p, m in files.items() if m != file_mode}
    bad.update({p: oct(m) for p, m in dirs.items() if m != dir_mode})
    assert not bad, f"expected files {file_mode:#o}, dirs {dir_mode:#o}: {bad}"
    assert not any(m & 0o002 for m in [*files.values(), *dirs.values()])


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], indirect=True,
                         ids=["umask022", "umask077", "umask002"])
def test_default_modes_honour_the_umask(tmp_path: Path, umask: int,
                                        records: list[tuple[str, int]]) -> None:
    top = tmp_path / "new"  # created by the save, with its parent dirs: all checked
    save_and_prune(top / "sub" / "ckpt")
    assert_modes(top, 0o666 & ~umask, 0o777 & ~umask)
    assert records, "no lease or lock record was observed"
    assert {m for _, m in records} == {0o666 & ~umask}


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000], indirect=True,
                         ids=["umask022", "umask077", "umask000"])
@pytest.mark.parametrize(("file_mode", "dir_mode"), [(0o600, 0o700), (0o640, 0o750)],
                         ids=["0o600", "0o640"])
def test_file_mode_is_exact_whatever_the_umask(tmp_path: Path, umask: int, file_mode: int,
                                               dir_mode: int,
                                               records: list[tuple[str, int]]) -> None:
    top = tmp_path / "new"
    save_and_prune(top / "ckpt", file_mode=file_mode)
    assert_modes(top, file_mode, dir_mode)
    # Lease / lock records: file_mode from the managers, the umask's (less o+w) from the CLI
    assert records and not any(m & 0o002 for _, m in records)
    assert file_mode in {m for _, m in records}


@pytest.mark.parametrize("umask", [0o000], indirect=True, ids=["umask000"])
def test_nothing_is_world_writable_even_under_umask_000(tmp_path: Path, umask: int) -> None:
    top = tmp_path / "new"
    save_and_prune(top / "ckpt")
    assert_modes(top, 0o664, 0o775)


@pytest.mark.parametrize("umask", [0o000], indirect=True, ids=["umask000"])
def test_lease_records_follow_file_mode(tmp_path: Path, umask: int,
                                        records: list[tuple[str, int]]) -> None:
    save_and_prune(tmp_path / "ckpt", file_mode=0o600)
    # the managers' records get file_mode; `shardckpt prune` (no file_mode option) takes the
    # umask's mode less o+w
    assert records and {m for _, m in records} == {0o600, 0o664}
    assert not any(m & 0o002 for _, m in records)


def test_set_group_id_of_a_shared_folder_is_kept(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2770)
    root = shared / "ckpt"
    with shardckpt.CheckpointManager(str(root), file_mode=0o640, async_save=False) as mgr:
        mgr.save(1, state(1))
    for d in (root, root / "step-0000000001"):
        mode = d.stat().st_mode
        assert stat.S_IMODE(mode) & 0o777 == 0o750 and mode & stat.S_ISGID, oct(mode)


@pytest.mark.parametrize("bad", [0o666, 0o602, 0o777, 0o1640, -1, 0o1000, True, 6.0, "0o640"])
def test_bad_file_mode_is_refused(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ValueError, match="file_mode"):
        shardckpt.CheckpointManager(str(tmp_path / "ckpt"), file_mode=bad)
    with pytest.raises(ValueError, match="file_mode"):
        open_location(str(tmp_path / "ckpt"), file_mode=bad)
    assert not (tmp_path / "ckpt").exists()


def test_file_mode_on_an_object_store_is_validated_and_ignored() -> None:
    with pytest.raises(ValueError, match="world-writable"):
        open_location("memory://perm-test", file_mode=0o666)
    with shardckpt.CheckpointManager(f"memory://perm-{uuid.uuid4().hex}", file_mode=0o600,
                                     async_save=False) as mgr:
        mgr.save(1, state(1))
        assert mgr.steps() == [1]


def test_symlinks_out_of_the_root_are_never_followed(tmp_path: Path) -> None:
    root, outside = tmp_path / "ckpt", tmp_path / "outside"
    outside.mkdir()
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        mgr.save(1, state(1))
        mgr.save(2, state(2))
    # A shard replaced by a link to an identical copy outside the root: refused, not read.
    shard = min((root / "step-0000000001").glob("*.shard"))
    (outside / "copy.shard").write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside / "copy.shard")
    # A whole step directory that is a link to a copy outside: not listed, not loaded.
    (outside / "step2").mkdir()
    for p in (root / "step-0000000002").iterdir():
        (outside / "step2" / p.name).write_bytes(p.read_bytes())
        p.unlink()
    (root / "step-0000000002").rmdir()
    (root / "step-0000000002").symlink_to(outside / "step2")
    # A step directory about to be saved that is a link outside: nothing is written there.
    (outside / "step3").mkdir()
    (root / "step-0000000003").symlink_to(outside / "step3")
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        with pytest.warns(UserWarning, match="outside the checkpoint root"):
            assert mgr.steps() == [1]
        got = {"w": torch.zeros(40, 30), "b": torch.zeros(17), "step": 0}
        with pytest.raises(shardckpt.StorageError, match="outside the checkpoint root"):
            mgr.load(got, step=1)
        with pytest.raises(shardckpt.ShardckptError, match="outside the checkpoint root"):
            mgr.load(got, step=2)
        with pytest.raises(shardckpt.StorageError, match="outside the checkpoint root"):
            mgr.save(3, state(3))
    assert list((outside / "step3").iterdir()) == []
