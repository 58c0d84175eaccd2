"""Shared fixtures: a real S3 endpoint on loopback (moto's server mode) and test isolation;
the check that keeps the ``e2e`` mark true."""

from __future__ import annotations

import contextlib
import multiprocessing.process
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Generator, Iterator
from typing import Any

import pytest

#: ``pytester`` runs a small suite under this file's hooks (tests/test_e2e_mark.py).
pytest_plugins = ["pytester"]

# A shell that starts the tests in the background (`make test &`) leaves SIGINT ignored,
# and an ignored signal stays ignored in every process they start, so the tests that
# interrupt `opticam run` or `opticam worker` would wait for nothing. Caught signals are
# reset to the default in a started process.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Tests never touch real AWS: fake credentials before boto/s3fs are imported anywhere.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start moto's S3 server on a free loopback port for the whole session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_storage_options(s3_endpoint: str) -> dict[str, Any]:
    """fsspec/s3fs options reaching the loopback S3 server (no listing cache)."""
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
        "use_listings_cache": False,
    }


@pytest.fixture
def s3_bucket(s3_endpoint: str, s3_storage_options: dict[str, Any]) -> str:
    """A fresh, empty bucket; returns its ``s3://`` URL (no trailing slash)."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(**s3_storage_options)
    # mkdir would send LocationConstraint=us-east-1, which S3 (and moto) reject.
    fs.call_s3("create_bucket", Bucket=name)
    fs.invalidate_cache()
    return f"s3://{name}"


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A fresh bucket (created without a LocationConstraint, which moto rejects for
    us-east-1; the shared ``s3_bucket`` fixture passes one through s3fs)."""
    import boto3

    name = f"store-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


# The synthetic run of tests/report_run.py and its report, shared by the report's tests
# (summary, build, page, gallery): written once per session.


@pytest.fixture(scope="session")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, Any]]]:
    from report_run import make_synthetic_run

    return make_synthetic_run(str(tmp_path_factory.mktemp("full")))


@pytest.fixture(scope="session")
def full_report(full_run: tuple[str, list[dict[str, Any]]]) -> Any:
    from opticam.report import build_report

    return build_report(full_run[0], n_boot=200, seed=0)


# --------------------------------------------------------------------------- the e2e mark
# `make check` runs `pytest -m "not e2e"`, so a test that starts a server or a process
# without the mark would make the quick run slow. The hooks below fail such a test:
# before its setup when it uses a fixture that starts a server, and after its setup or
# call when a process was started or a socket listened meanwhile (recorded, not
# prevented, so that a library that catches errors cannot hide the attempt).

#: Fixtures that start a server: ``s3_endpoint`` above (moto) and ``harness`` in
#: test_flows.py (Prefect's test server). A test that uses one, itself or through another
#: fixture (``s3_bucket``, ``bucket``, ``flows``), must be marked e2e.
SERVER_FIXTURES = frozenset({"s3_endpoint", "harness"})

#: Processes that these standard modules start are lookups, not a test's work:
#: ctypes.util.find_library runs ``ldconfig -p`` (opticam.allocator looks up libc once),
#: platform.architecture runs ``file`` on the interpreter.
LOOKUPS = (os.path.join("ctypes", "util.py"), os.sep + "platform.py")


def _is_e2e(item: pytest.Item) -> bool:
    return item.get_closest_marker("e2e") is not None


def _called_from(files: tuple[str, ...], depth: int = 4) -> bool:
    """Whether one of the ``depth`` callers of the caller is in a file ending in ``files``
    (subprocess.run and check_output call Popen themselves)."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_filename.endswith(files):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def _record_started(started: list[str]) -> Iterator[None]:
    """Append to ``started`` a line for each process that this process starts meanwhile
    (``subprocess`` and what is built on it, such as asyncio and os.popen, and
    ``multiprocessing``) and for each socket that starts listening (any server, from
    moto's to a stand-in on a thread)."""
    real_popen = subprocess.Popen.__init__
    real_start = multiprocessing.process.BaseProcess.start
    real_listen = socket.socket.listen

    def popen(self: subprocess.Popen[Any], args: Any, *more: Any, **options: Any) -> None:
        if not _called_from(LOOKUPS):
            started.append(f"a subprocess {str(args)[:120]}")
        real_popen(self, args, *more, **options)

    def start(self: multiprocessing.process.BaseProcess) -> None:
        started.append(f"a multiprocessing process {self.name!r}")
        real_start(self)

    def listen(self: socket.socket, *backlog: int) -> None:
        started.append(f"a server listening on {self.getsockname()}")
        real_listen(self, *backlog)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", popen)
        patch.setattr(multiprocessing.process.BaseProcess, "start", start)
        patch.setattr(socket.socket, "listen", listen)
        yield


def _fail_if_it_starts_anything(item: pytest.Item) -> Generator[None, object, object]:
    if _is_e2e(item):
        return (yield)
    started: list[str] = []
    with _record_started(started):
        result = yield
    if started:
        more = f" and {len(started) - 1} more" if len(started) > 1 else ""
        pytest.fail(
            f"{item.nodeid} started {started[0]}{more} without the e2e mark: add "
            "@pytest.mark.e2e, or start nothing",
            pytrace=False,
        )
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    servers = sorted(SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())))
    if servers and not _is_e2e(item):
        pytest.fail(
            f"{item.nodeid} uses the fixture {', '.join(servers)}, which starts a server, "
            "without the e2e mark: add @pytest.mark.e2e",
            pytrace=False,
        )
    return (yield from _fail_if_it_starts_anything(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _fail_if_it_starts_anything(item))


@pytest.fixture
def tiny_factory(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``factory:tiny:build`` resolves to the suite's TinyNet (tests/tiny.py); the model
    cache is cleared afterwards, so no other test sees that model."""
    import tiny

    from opticam import pipeline

    tiny.register(monkeypatch)
    yield
    pipeline.clear_model_cache()
