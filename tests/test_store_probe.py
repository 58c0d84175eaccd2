"""opticam.store.probe: an output that cannot be written is one line and exit 2, before any work.

Each failing case runs the real command line (``opticam.cli.main``) and checks four
things: exit status 2, exactly one line on stderr naming the output and the problem, a
bounded time, and that nothing was computed (the model was never loaded) or written.
"""

from __future__ import annotations

import errno
import http.server
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest

import opticam.models
from opticam import cli, pipeline
from opticam.config import RunConfig
from opticam.demo import make_shards
from opticam.errors import OutputError, UserError
from opticam.store import probe

#: A failed check must not wait on retries with backoff (the probe gives up after 15 s at most).
MAX_SECONDS = 30.0

#: Every place botocore looks for credentials besides the two files and the metadata service.
AWS_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path`` as the current folder, so a URL mistaken for a relative path shows up."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def shard(workdir: Path) -> str:
    """One demo shard of two images, in ``<workdir>/data``."""
    return make_shards(str(workdir / "data"), 1, 2, seed=3)[0]


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every model load during the test (the first piece of compute a run does)."""
    calls: list[str] = []
    real = opticam.models.load_model

    def spy(spec: Any, device: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(device)
        return real(spec, device, *args, **kwargs)

    pipeline.clear_model_cache()
    monkeypatch.setattr(opticam.models, "load_model", spy)
    yield calls
    pipeline.clear_model_cache()


def closed_port() -> int:
    """A loopback port with nothing listening (bound, read, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Refused(Protocol):
    """Runs ``opticam run`` on the demo shard and asserts that it was refused."""

    def __call__(self, output: str, *flags: str, expect: Sequence[str]) -> str: ...


@pytest.fixture
def refused(shard: str, loads: list[str], capsys: pytest.CaptureFixture[str]) -> Refused:
    """``refused(output, *flags, expect=words)`` -> the one stderr line, after checking it.

    Checks exit status 2, exactly one line naming ``output`` and every word of ``expect``,
    less than :data:`MAX_SECONDS`, and no model loaded (nothing computed).
    """

    def run(output: str, *flags: str, expect: Sequence[str]) -> str:
        argv = ["run", "--data", shard, "--output", output, "--device", "cpu"]
        argv += ["--methods", "fakecam", "--steps", "2", *flags]
        capsys.readouterr()
        start = time.monotonic()
        status = cli.main(argv)
        seconds = time.monotonic() - start
        lines = capsys.readouterr().err.splitlines()
        assert status == 2, lines
        assert len(lines) == 1, lines
        line = lines[0]
        assert line.startswith(f"opticam run: error: output {output!r}: "), line
        for word in expect:
            assert word in line, line
        assert seconds < MAX_SECONDS, f"took {seconds:.1f}s: {line}"
        assert loads == [], "the model was loaded before the output was checked"
        return line

    return run


def only_data_in(workdir: Path, *also: str) -> None:
    """Nothing was written in the working folder besides the demo data (and ``also``)."""
    assert sorted(os.listdir(workdir)) == sorted(["data", *also])
    assert [p.name for p in (workdir / "data").iterdir()] == ["demo-000000.tar"]


def bucket_keys(bucket: str, options: dict[str, Any]) -> list[str]:
    """Every key in a bucket, listed straight from the server (no listing cache)."""
    import s3fs

    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    reply = fs.call_s3("list_objects_v2", Bucket=bucket.removeprefix("s3://"))
    return [item["Key"] for item in reply.get("Contents", [])]


# --------------------------------------------------------------------------- local output


def test_output_under_a_regular_file(workdir: Path, refused: Refused) -> None:
    (workdir / "somefile").write_text("not a folder")
    output = str(workdir / "somefile" / "runs")

    line = refused(output, expect=["is a file, not a folder"])
    assert f"{str(workdir / 'somefile')!r} is a file" in line
    assert (workdir / "somefile").read_text() == "not a folder"
    only_data_in(workdir, "somefile")


def test_output_that_is_a_regular_file(workdir: Path, refused: Refused) -> None:
    (workdir / "runs").write_text("not a folder")

    refused(str(workdir / "runs"), expect=["is a file, not a folder"])
    assert (workdir / "runs").read_text() == "not a folder"


def test_output_in_a_read_only_folder(workdir: Path, refused: Refused) -> None:
    locked = workdir / "locked"
    locked.mkdir(mode=0o555)
    try:
        try:
            (locked / "canary").touch()
        except PermissionError:
            pass
        else:
            pytest.skip("this user writes into read-only folders (root); see the next test")
        refused(str(locked / "runs"), expect=["permission denied", repr(str(locked))])
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.EACCES, ["permission denied writing in", "(make it writable or choose another"]),
        (errno.EROFS, ["is on a read-only file system"]),
        (errno.ENOSPC, ["no space left on the device of", "(free some space or choose"]),
    ],
)
def test_output_the_system_refuses(
    code: int,
    words: list[str],
    workdir: Path,
    refused: Refused,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What the kernel raises for such a folder, also under root (who may write anywhere).
    def refuse(url: str, data: bytes, storage_options: Any = None) -> None:
        raise OSError(code, os.strerror(code), url)

    monkeypatch.setattr(probe, "atomic_write_bytes", refuse)
    (workdir / "out").mkdir()

    line = refused(str(workdir / "out"), expect=words)
    assert repr(str(workdir / "out")) in line.split(": ", 2)[2]
    assert list((workdir / "out").iterdir()) == []


# --------------------------------------------------------------------------- S3 output


def test_s3_endpoint_that_does_not_answer(workdir: Path, refused: Refused) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"

    refused(
        "s3://bucket/runs",
        "--s3-endpoint",
        endpoint,
        expect=[f"cannot reach the S3 endpoint {endpoint!r}", "check --s3-endpoint"],
    )
    only_data_in(workdir)


@pytest.mark.e2e
def test_s3_endpoint_that_accepts_and_never_answers(
    workdir: Path, refused: Refused, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A PUT to such an endpoint waits for "100 Continue" with no limit of botocore's own;
    # the probe's overall bound must end it (shortened here to keep the test quick).
    monkeypatch.setattr(probe, "CALL_TIMEOUT_S", 2)
    monkeypatch.setattr(probe, "READ_TIMEOUT_S", 1)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        refused(
            "s3://bucket/runs",
            "--s3-endpoint",
            endpoint,
            expect=[f"the S3 endpoint {endpoint!r} did not answer in time"],
        )
    assert time.monotonic() - start < 10
    only_data_in(workdir)


class FakeS3Handler(http.server.BaseHTTPRequestHandler):
    """An HTTP server that answers every request with ``status`` and ``body``."""

    protocol_version = "HTTP/1.1"  # answers "Expect: 100-continue" as botocore's PUT asks
    status = 404
    body = b""

    def answer(self) -> None:
        # Read the body first: left unread, it would be parsed as the next request.
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(self.body)
        self.close_connection = True

    do_GET = do_HEAD = do_PUT = do_DELETE = do_POST = answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def fake_s3(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a :class:`FakeS3Handler` server answering ``request.param``."""
    status, body = request.param
    handler = type("Handler", (FakeS3Handler,), {"status": status, "body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message><RequestId>1</RequestId></Error>"
)


@pytest.mark.e2e
@pytest.mark.parametrize("fake_s3", [(404, b"")], indirect=True)
def test_s3_endpoint_that_is_not_s3(workdir: Path, refused: Refused, fake_s3: str) -> None:
    # A web server (or a proxy) at the endpoint: a bare 404 is no sign of a missing bucket.
    line = refused(
        "s3://bucket/runs",
        "--s3-endpoint",
        fake_s3,
        expect=[f"the S3 endpoint {fake_s3!r} answered 404", "is it an S3 server?"],
    )
    assert "does not exist" not in line
    only_data_in(workdir)


@pytest.mark.e2e
@pytest.mark.parametrize("fake_s3", [(403, ACCESS_DENIED)], indirect=True)
def test_s3_access_denied(workdir: Path, refused: Refused, fake_s3: str) -> None:
    refused(
        "s3://bucket/runs",
        "--s3-endpoint",
        fake_s3,
        expect=["access denied to bucket 'bucket' (Access Denied)", "bucket's policy"],
    )
    only_data_in(workdir)


@pytest.mark.e2e
def test_s3_without_credentials(
    workdir: Path,
    refused: Refused,
    s3_endpoint: str,
    s3_bucket: str,
    s3_storage_options: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    import s3fs

    # An instance cached without credentials would fail later tests with the same options.
    request.addfinalizer(s3fs.S3FileSystem.clear_instance_cache)
    for name in AWS_CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(workdir / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(workdir / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    refused(
        f"{s3_bucket}/runs",
        "--s3-endpoint",
        s3_endpoint,
        expect=["no AWS credentials", "set AWS_ACCESS_KEY_ID"],
    )
    assert bucket_keys(s3_bucket, s3_storage_options) == []
    only_data_in(workdir)


@pytest.mark.e2e
def test_s3_bucket_that_does_not_exist(
    workdir: Path, refused: Refused, s3_endpoint: str, s3_storage_options: dict[str, Any]
) -> None:
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"

    line = refused(
        f"s3://{bucket}/runs",
        "--s3-endpoint",
        s3_endpoint,
        expect=[f"bucket {bucket!r} does not exist"],
    )
    assert line.endswith("(create it or choose another --output)")
    import s3fs

    fs = s3fs.S3FileSystem(**s3_storage_options, skip_instance_cache=True)
    assert bucket not in {b.rstrip("/") for b in fs.ls("", detail=False)}
    only_data_in(workdir)


# --------------------------------------------------------------------------- the check itself


def test_writable_local_output_passes_and_leaves_no_probe(tmp_path: Path) -> None:
    output = tmp_path / "new" / "runs"
    probe.check_output(str(output), {})
    # The folder the run will write in now exists; the probe object is gone.
    assert output.is_dir() and list(output.iterdir()) == []
    probe.check_output(str(output), None)  # again, on an existing folder
    assert list(output.iterdir()) == []


@pytest.mark.e2e
def test_writable_bucket_passes_and_leaves_no_probe(
    s3_bucket: str, s3_storage_options: dict[str, Any]
) -> None:
    probe.check_output(f"{s3_bucket}/runs", s3_storage_options)
    probe.check_output(s3_bucket, s3_storage_options)
    assert bucket_keys(s3_bucket, s3_storage_options) == []


def test_other_filesystems_are_probed_the_same_way() -> None:
    import fsspec

    memory = fsspec.filesystem("memory")
    root = f"/opticam-{uuid.uuid4().hex[:8]}"
    try:
        probe.check_output(f"memory://{root}/runs", {})
        assert memory.ls(f"{root}/runs", detail=False) == []

        memory.pipe_file(f"{root}/file", b"not a folder")
        with pytest.raises(OutputError, match=r"a part of the path is a file, not a folder"):
            probe.check_output(f"memory://{root}/file/runs", {})
    finally:
        memory.rm(root, recursive=True)


def test_probe_options_bound_the_wait_and_keep_the_callers() -> None:
    given = {"key": "k", "config_kwargs": {"retries": {"mode": "standard"}, "read_timeout": 60}}
    options = probe.probe_options("s3://bucket/runs", given)
    assert options["config_kwargs"] == {
        "connect_timeout": probe.CONNECT_TIMEOUT_S,
        "read_timeout": 60,
        "retries": {"mode": "standard", "total_max_attempts": probe.TOTAL_ATTEMPTS},
    }
    assert options["key"] == "k"
    assert given == {
        "key": "k",
        "config_kwargs": {"retries": {"mode": "standard"}, "read_timeout": 60},
    }
    # botocore's max_attempts (retries only) is the caller's choice too.
    retries = {"config_kwargs": {"retries": {"max_attempts": 9}}}
    assert probe.probe_options("s3a://b", retries)["config_kwargs"]["retries"] == {
        "max_attempts": 9
    }
    assert probe.probe_options("/tmp/runs", given) == given


def test_preflight_finds_a_bad_output_before_loading_the_model(
    shard: str, workdir: Path, loads: list[str]
) -> None:
    (workdir / "somefile").write_text("")
    output = str(workdir / "somefile" / "runs")
    config = RunConfig.model_validate(
        {"data": shard, "output": output, "device": "cpu", "methods": ["fakecam"]}
    )
    with pytest.raises(OutputError) as caught:
        pipeline.preflight(config)
    assert isinstance(caught.value, UserError) and isinstance(caught.value, OSError)
    assert loads == []


def test_an_unknown_failure_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An error the probe has no message for is a bug (or a disk failing): never a UserError.
    def broken(url: str, data: bytes, storage_options: Any = None) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO), url)

    monkeypatch.setattr(probe, "atomic_write_bytes", broken)
    with pytest.raises(OSError) as caught:
        probe.check_output(str(tmp_path), {})
    assert not isinstance(caught.value, UserError)
    assert caught.value.errno == errno.EIO
