"""Shared fixtures: a real S3 endpoint on loopback (moto's server mode) and test isolation."""

from __future__ import annotations

import os
import signal
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

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
