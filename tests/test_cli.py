"""The ``opticam`` command: run (as a real subprocess, ephemeral Prefect), report, explain,
pack, demo-data, and one-line errors with exit status 2 for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from opticam import cli, store
from opticam.data import ShardReader
from opticam.demo import generate_sample, make_shards

REPO = Path(__file__).resolve().parents[1]


class TinyNet(nn.Module):
    """64x64 input, 8x8 feature maps, fixed random weights."""

    default_target_layer = "features"
    input_size = 64

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=8, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


@pytest.fixture
def tiny_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    module = types.ModuleType("opticam_cli_tiny")
    module.build = TinyNet  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "opticam_cli_tiny", module)
    yield "factory:opticam_cli_tiny:build"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return make_shards(str(tmp_path_factory.mktemp("demo")), 2, 4, seed=21)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_run_end_to_end_in_a_subprocess_with_ephemeral_prefect(
    shards: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),  # its own ephemeral database
        "OPTICAM_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(REPO),
    }
    env.pop("PREFECT_API_URL", None)
    output = tmp_path / "runs"
    argv = [
        *("run", "--data", f"{Path(shards[0]).parent}/demo-*.tar", "--output", str(output)),
        *("--methods", "opticam,gradcam,fakecam", "--iterations", "3", "--steps", "4"),
        *("--device", "cpu", "--batch-size", "4", "--target", "predicted"),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "opticam", *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert {"method", "opticam", "gradcam", "fakecam"} <= table  # the summary table
    report_line = next(line for line in proc.stdout.splitlines() if line.startswith("report: "))
    index = Path(report_line.removeprefix("report: "))
    assert index.name == "index.html" and index.is_file()
    assert "INFO" not in proc.stderr  # Prefect quiet unless --verbose
    assert "Traceback" not in proc.stderr
    assert "2 shards" in proc.stderr  # plain-text progress (not a TTY)
    (run,) = list(output.iterdir())
    assert store.read_rows(str(run), ["key"]).num_rows == 8 * 3
    assert not (tmp_path / "cache").exists()  # --data given: no demo data generated

    # `opticam report` re-aggregates the finished run without Prefect.
    code, out, err = run_main(["report", str(run)], capsys)
    assert code == 0, err
    assert f"report: {index}" in out and "opticam" in out


def test_demo_data_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(
        ["demo-data", str(tmp_path / "d"), "--shards", "2", "--per-shard", "3", "--seed", "4"],
        capsys,
    )
    assert code == 0
    urls = out.split()
    assert [Path(u).name for u in urls] == ["demo-000000.tar", "demo-000001.tar"]
    reader = ShardReader(urls[1])
    samples = list(reader)
    assert len(samples) == 3 and reader.complete and samples[0].boxes


def test_pack_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for label, name in enumerate(["cat", "dog"]):
        folder = tmp_path / "src" / name
        folder.mkdir(parents=True)
        for i in range(3):
            image, _, _, _ = generate_sample(i + 10 * label, 1)
            image.save(folder / f"{name}{i}.png")
    code, out, err = run_main(
        ["pack", str(tmp_path / "src"), str(tmp_path / "out"), "--per-shard", "4"], capsys
    )
    assert code == 0, err
    urls = out.split()
    assert len(urls) == 2
    labels = [s.label for u in urls for s in ShardReader(u)]
    assert sorted(label for label in labels if label is not None) == [0, 0, 0, 1, 1, 1]
    assert None not in labels


def test_explain_command_writes_overlays(
    tmp_path: Path, tiny_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = []
    for i in range(2):
        image, _, _, _ = generate_sample(i, 2)
        path = tmp_path / f"img{i}.jpg"
        image.save(path)
        paths.append(str(path))
    out_dir = tmp_path / "overlays"
    code, out, err = run_main(
        [
            *("explain", *paths, "--model", tiny_model, "--method", "opticam,gradcam"),
            *("--iterations", "2", "--out", str(out_dir), "--device", "cpu"),
        ],
        capsys,
    )
    assert code == 0, err
    written = sorted(p.name for p in out_dir.iterdir())
    assert written == [
        "img0-gradcam.png",
        "img0-opticam.png",
        "img1-gradcam.png",
        "img1-opticam.png",
    ]
    with Image.open(out_dir / "img0-opticam.png") as img:
        assert img.size == (64, 64) and img.mode == "RGB"
    assert out.count("class ") == 4


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["run", "--data", "{tmp}/none-*.tar", "--device", "cpu"], "none-*.tar"),
        (["run", "--data", "{shard}", "--methods", "gradcam+"], "unknown method 'gradcam+'"),
        (["run", "--data", "{shard}", "--executor", "deployments"], "reserved"),
        (["run", "--data", "{shard}", "--device", "tpu"], "unknown device 'tpu'"),
        (["run", "--data", "{shard}", "--model", "resnet"], "unknown model source 'resnet'"),
        (["run", "--data", "{shard}", "--storage-option", "novalue"], "not KEY=VALUE"),
        (
            ["run", "--data", "{shard}", "--methods", "gradcam", "--target-layer", "nope"],
            "unknown target layer 'nope'",
        ),
        (["run", "--batch-size", "0"], "positive integer"),
        (["frobnicate"], "invalid choice"),
        (["explain", "{tmp}/missing.png", "--out", "{tmp}/o"], "missing.png"),
        (["pack", "{tmp}/nothing", "{tmp}/out", "--per-shard", "2"], "nothing"),
        (["report", "{tmp}/nothing"], "no opticam run"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    argv: list[str],
    fragment: str,
    shards: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    filled = [a.format(tmp=tmp_path, shard=shards[0]) for a in argv]
    code, out, err = run_main(filled, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert fragment.format(tmp=tmp_path) in lines[0]
    assert "Traceback" not in err


def test_storage_options_parsing() -> None:
    options = cli.parse_storage_options(
        ["anon=false", "client_kwargs.region_name=eu-west-1", "key=abc", "default_block_size=5"],
        s3_endpoint="http://127.0.0.1:9000",
    )
    assert options == {
        "anon": False,
        "key": "abc",
        "default_block_size": 5,
        "client_kwargs": {"region_name": "eu-west-1", "endpoint_url": "http://127.0.0.1:9000"},
    }
    with pytest.raises(cli.CLIError):
        cli.parse_storage_options(["=x"])
    with pytest.raises(cli.CLIError, match="conflicts"):
        cli.parse_storage_options(["a=1", "a.b=2"])


def test_demo_data_is_generated_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPTICAM_CACHE", str(tmp_path / "cache"))
    folder = cli.demo_cache_dir()
    assert folder == tmp_path / "cache" / cli.DEMO_VERSION
    pattern = cli.ensure_demo_data(shards=2, per_shard=2)
    assert pattern == f"{folder}/demo-*.tar"
    files = sorted(folder.glob("demo-*.tar"))
    assert len(files) == 2 and (folder / ".complete").exists()
    mtimes = [f.stat().st_mtime_ns for f in files]
    cli.ensure_demo_data(shards=2, per_shard=2)
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cli.DEMO_VERSION]


def test_demo_run_config_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTICAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "ensure_demo_data", lambda: f"{tmp_path}/cache/demo-*.tar")
    args = cli.build_parser().parse_args(["run"])
    config = cli._build_config(args)
    assert [m.name for m in config.methods] == cli.DEMO_METHODS.split(",")
    assert config.metrics.steps == cli.DEMO_STEPS and config.model.source == "demo"
    assert config.output == "./opticam-runs" and config.executor == "local"
    flagged = cli._build_config(
        cli.build_parser().parse_args(
            ["run", "--iterations", "7", "--s3-endpoint", "http://e", "--max-images", "9"]
        )
    )
    assert flagged.methods[0].options == {"iterations": 7}
    assert flagged.max_images == 9
    assert flagged.data_options() == {"client_kwargs": {"endpoint_url": "http://e"}}


def test_overlay_colours() -> None:
    image = np.zeros((3, 2, 2), dtype=np.float32)
    saliency_map = np.array([[0.0, 1.0], [0.5, 0.5]], dtype=np.float32)
    out = np.asarray(cli.overlay(image, saliency_map, alpha=1.0))
    assert tuple(out[0, 0]) == (0, 0, 128)  # jet: low values dark blue
    assert tuple(out[0, 1]) == (128, 0, 0)  # high values dark red
    assert out[1, 0, 1] == 255  # the middle is green


def test_python_dash_m_entry_point_prints_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "opticam", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0
    for command in ("run", "report", "explain", "pack", "demo-data"):
        assert command in proc.stdout
