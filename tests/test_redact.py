"""Credentials in data URLs never leave the process: not in run.json, Parquet, names, the
run id, stdout, logs, or Prefect's database.

The end-to-end test serves demo shards over HTTP with basic auth on loopback, runs
``opticam run`` as a real subprocess with its own ephemeral Prefect (INFO logs sent to
it), and then searches every byte it left behind for the password.
"""

from __future__ import annotations

import base64
import functools
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from opticam import store
from opticam.config import RunConfig
from opticam.demo import make_shards
from opticam.redact import redact_text, redact_url

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://ann:pw@host/a.tar", "https://***@host/a.tar"),
        ("https://token@host:8443/a.tar", "https://***@host:8443/a.tar"),
        ("https://h/a.tar?sig=abc&sv=2020", "https://h/a.tar?sig=***&sv=2020"),
        (
            "https://b.s3.amazonaws.com/a.tar?X-Amz-Credential=AK%2F1&X-Amz-Signature=f0&X-Amz-Date=1",
            "https://b.s3.amazonaws.com/a.tar?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=1",
        ),
        (
            "https://h/a.tar?access_token=t&api_key=k",
            "https://h/a.tar?access_token=***&api_key=***",
        ),
        ("s3://bucket/shard-{000000..000009}.tar", "s3://bucket/shard-{000000..000009}.tar"),
        ("/data/shards/a.tar", "/data/shards/a.tar"),
        ("https://h/a.tar?v=1&page=2", "https://h/a.tar?v=1&page=2"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_text_finds_urls_in_messages() -> None:
    text = "ClientResponseError: 401 for 'http://ann:pw@127.0.0.1:9/a.tar', see https://x/y"
    assert redact_text(text) == (
        "ClientResponseError: 401 for 'http://***@127.0.0.1:9/a.tar', see https://x/y"
    )


def test_run_id_and_names_do_not_depend_on_the_password() -> None:
    one = RunConfig(data="https://ann:first@host/ds/a.tar")
    two = RunConfig(data="https://ann:second@host/ds/a.tar")
    assert one.run_id == two.run_id
    assert store.shard_name("https://ann:first@h/a.tar") == store.shard_name("https://x:y@h/a.tar")
    dumped = one.model_dump_json() + str(one.public_dict()) + str(one.job_description())
    assert "first" not in dumped
    assert one.data == "https://ann:first@host/ds/a.tar"  # the reader still gets it


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[str]:
    """Demo shards (and a file that is not a tar) behind HTTP basic auth on loopback."""
    folder = tmp_path / "served"
    make_shards(str(folder), 2, 3, seed=5)
    (folder / "broken.tar").write_bytes(b"this is not a tar archive at all" * 40)
    expected = "Basic " + base64.b64encode(f"ann:{PASSWORD}".encode()).decode()

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.end_headers()
                return
            super().do_GET()

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://ann:{PASSWORD}@127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.e2e
def test_a_password_in_data_urls_is_written_nowhere(auth_server: str, tmp_path: Path) -> None:
    output = tmp_path / "runs"
    prefect_home = tmp_path / "prefect"
    env = {
        **os.environ,
        "PREFECT_HOME": str(prefect_home),
        "OPTICAM_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(REPO),
    }
    env.pop("PREFECT_API_URL", None)
    data = [f"{auth_server}/demo-00000{i}.tar" for i in range(2)] + [f"{auth_server}/broken.tar"]
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "opticam", "run", "--data", *data),
            *("--output", str(output), "--device", "cpu", "--methods", "gradcam,fakecam"),
            *("--steps", "2", "--verbose"),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # The file that is not a tar is a failed shard: exit status 1, named without secret.
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "failed shard http://***@127.0.0.1:" in proc.stderr and "broken.tar" in proc.stderr
    (run,) = list(output.iterdir())
    rows = store.read_rows(str(run), ["shard", "key"])
    assert rows.num_rows == 2 * 3 * 2  # the two good shards were read with the password
    assert set(rows.column("shard").to_pylist()) == {
        redact_url(u) for u in data[:2]
    }  # ...and stored without it
    leaks = [str(p) for p in (*output.rglob("*"), *prefect_home.rglob("*")) if PASSWORD in str(p)]
    for path in (*output.rglob("*"), *prefect_home.rglob("*")):
        if path.is_file() and PASSWORD.encode() in path.read_bytes():
            leaks.append(str(path))
    assert leaks == []
    assert PASSWORD not in proc.stdout and PASSWORD not in proc.stderr
    assert "ann:" not in proc.stdout + proc.stderr
