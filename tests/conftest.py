"""Shared fixtures: a loopback S3 (moto) server and a throttling proxy in front of it; how
``harness.run_ranks`` starts its ranks; Hypothesis's settings."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import harness
import pytest
from hypothesis import settings
from s3_server import TEST_ENV, UNSET_ENV, MotoServer, ThrottlingProxy

# Hypothesis's default 200 ms deadline per example is a wall-clock threshold that a loaded
# 2-core machine trips: none, for every property test of the suite.
settings.register_profile("shardckpt", deadline=None)
settings.load_profile("shardckpt")

_servers: list[MotoServer] = []


def _clear_s3fs_instances() -> None:
    if "s3fs" in sys.modules:  # never import s3fs just for this
        sys.modules["s3fs"].S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3() -> Iterator[MotoServer]:
    """A moto S3 server on 127.0.0.1, one per session (see :class:`s3_server.MotoServer`).

    Tests share it: use ``s3.new_bucket()`` / ``s3.new_root()`` for isolation. A test that
    ``kill()``s it gets it restarted (empty) before the next test. Sets fake AWS credentials in
    the environment for the session, so that nothing looks for real ones.
    """
    mp = pytest.MonkeyPatch()
    for name in UNSET_ENV:
        mp.delenv(name, raising=False)
    for name, value in TEST_ENV.items():
        mp.setenv(name, value)
    server = MotoServer()
    try:
        server.start()
        _servers.append(server)
        yield server
    finally:
        if server in _servers:
            _servers.remove(server)
        server.stop()
        _clear_s3fs_instances()
        mp.undo()


@pytest.fixture(autouse=True)
def _fresh_s3fs() -> Iterator[None]:
    """No s3fs instance (and its listing cache or dead connections) outlives a test; a killed
    session server is brought back for the next one."""
    _clear_s3fs_instances()
    yield
    _clear_s3fs_instances()
    for server in _servers:
        if not server.alive():
            server.restart()


@pytest.fixture
def throttling_proxy(s3: MotoServer) -> Iterator[ThrottlingProxy]:
    """A :class:`s3_server.ThrottlingProxy` in front of ``s3``, passing everything through until
    ``configure(every=N)`` / ``configure(fraction=p)`` is called."""
    with ThrottlingProxy(s3.endpoint_url) as proxy:
        yield proxy


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "spawn_ranks: run_ranks starts each rank as a fresh interpreter (spawn)")


@pytest.fixture(scope="session", autouse=True)
def _forked_ranks() -> Iterator[None]:
    """``run_ranks`` forks its ranks from a fork server with torch and shardckpt imported (see
    ``harness.start_method``): a fresh process per rank, started in a fraction of the time."""
    with harness.start_method("forkserver"):
        yield


@pytest.fixture(autouse=True)
def _spawned_ranks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests marked ``spawn_ranks`` get fresh interpreters: where that is what is tested."""
    if request.node.get_closest_marker("spawn_ranks") is None:
        yield
        return
    with harness.start_method("spawn"):
        yield
