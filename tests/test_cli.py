"""The ``opticam`` command: run (as a real subprocess, ephemeral Prefect), report, explain,
pack, demo-data, and one-line errors with exit status 2 for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tiny
from PIL import Image

from opticam import cli, store
from opticam.data import ShardReader
from opticam.demo import cache as demo_cache
from opticam.demo import generate_sample, make_shards
from opticam.errors import CLIError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    yield tiny.register(monkeypatch)


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


def run_subprocess(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``python -m opticam ARGV`` with its own ephemeral Prefect and ``tests/`` importable."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),  # its own ephemeral database
        "OPTICAM_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
    }
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "opticam", *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.e2e
def test_run_end_to_end_from_a_job_file_with_flags_over_it(
    shards: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "runs"
    job = tmp_path / "job.yaml"
    job.write_text(
        f"""
data: "{Path(shards[0]).parent}/demo-*.tar"
output: "{output}"
methods:
  - name: opticam
    options: {{iterations: 3}}
  - gradcam
  - fakecam
metrics: {{steps: 4, save_curves: false}}
device: cpu
batch_size: 2
target: label
"""
    )
    # The flags override the file: batch size, target, steps (save_curves stays).
    argv = ["run", "--config", str(job), "--batch-size", "4", "--target", "predicted"]
    proc = run_subprocess([*argv, "--steps", "5"], tmp_path)
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
    rows = store.read_rows(str(run), ["key", "method", "iterations", "insertion_curve"])
    assert rows.num_rows == 8 * 3
    assert {i for i in rows.column("iterations").to_pylist() if i is not None} == {3}
    assert set(rows.column("insertion_curve").to_pylist()) == {None}  # from the file
    config = store.read_run_json(str(run))["config"]  # type: ignore[index]
    assert (config["batch_size"], config["target"]) == (4, "predicted")  # from the flags
    assert config["metrics"]["steps"] == 5 and config["metrics"]["save_curves"] is False
    assert not (tmp_path / "cache").exists()  # data given: no demo data generated

    # `opticam report` re-aggregates the finished run without Prefect.
    code, out, err = run_main(["report", str(run)], capsys)
    assert code == 0, err
    assert f"report: {index}" in out and "opticam" in out


@pytest.mark.e2e
def test_a_factory_model_runs_with_its_preprocessing_from_the_cli_alone(
    shards: list[str], tmp_path: Path
) -> None:
    output = tmp_path / "runs"
    argv = [
        *("run", "--data", shards[0], "--output", str(output), "--device", "cpu"),
        *("--model", "factory:tiny:build_plain", "--target-layer", "features"),
        *("--input-size", "48", "--resize-size", "56", "--num-classes", "10"),
        *("--mean", "0.5", "0.4", "0.3", "--std", "0.2", "0.25", "0.3"),
        *("--methods", "opticam,fakecam", "--iterations", "2", "--lr", "0.05"),
        *("--objective", "diff", "--no-insertion-deletion", "--target", "predicted"),
    ]
    proc = run_subprocess(argv, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = list(output.iterdir())
    rows = store.read_rows(str(run), ["method", "input_height", "input_width", "target_layer"])
    assert rows.num_rows == 4 * 2
    assert set(rows.column("input_height").to_pylist()) == {48}
    assert set(rows.column("input_width").to_pylist()) == {48}
    assert set(rows.column("target_layer").to_pylist()) == {"features", None}
    model = store.read_run_json(str(run))["config"]["model"]  # type: ignore[index]
    assert model["mean"] == [0.5, 0.4, 0.3] and model["std"] == [0.2, 0.25, 0.3]
    assert (model["input_size"], model["resize_size"]) == (48, 56)
    methods = store.read_run_json(str(run))["config"]["methods"]  # type: ignore[index]
    assert methods[0] == {
        "name": "opticam",
        "options": {"iterations": 2, "lr": 0.05, "objective": "diff"},
    }


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


def test_explain_refuses_an_explicit_option_that_a_preset_would_replace(
    tmp_path: Path, tiny_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    image, _, _, _ = generate_sample(0, 2)
    path = tmp_path / "img0.jpg"
    image.save(path)
    code, _, err = run_main(
        [
            *("explain", str(path), "--model", tiny_model, "--method", "opticam"),
            *("--preset", "fast", "--iterations", "100", "--out", str(tmp_path / "o")),
            *("--device", "cpu"),
        ],
        capsys,
    )
    assert code == 2
    assert err.count("\n") == 1
    assert "preset 'fast' sets iterations=32, which conflicts with the iterations=100" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["run", "--data", "{tmp}/none-*.tar", "--device", "cpu"], "none-*.tar"),
        (["run", "--data", "{shard}", "--methods", "gradcam+"], "unknown method 'gradcam+'"),
        (["run", "--data", "{shard}", "--executor", "deployments"], "needs pool"),
        (["run", "--data", "{shard}", "--device", "tpu"], "unknown device 'tpu'"),
        (["run", "--data", "{shard}", "--model", "resnet"], "unknown model source 'resnet'"),
        (["run", "--data", "{shard}", "--storage-option", "novalue"], "not KEY=VALUE"),
        (
            ["run", "--data", "{shard}", "--methods", "gradcam", "--target-layer", "nope"],
            "unknown target layer 'nope'",
        ),
        (["run", "--batch-size", "0"], "batch_size: Input should be greater than or equal to 1"),
        (["frobnicate"], "invalid choice"),
        (["explain", "{tmp}/missing.png", "--out", "{tmp}/o"], "missing.png"),
        (["explain", "{tmp}/script.jpg", "--out", "{tmp}/o"], "the bytes are EPS, not one of"),
        (["explain", "{tmp}/thin.png", "--out", "{tmp}/o"], "aspect ratio of 400.0:1, beyond"),
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
    (tmp_path / "script.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 6\n")
    Image.new("RGB", (1, 400)).save(tmp_path / "thin.png")
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
    with pytest.raises(CLIError):
        cli.parse_storage_options(["=x"])
    with pytest.raises(CLIError, match="conflicts"):
        cli.parse_storage_options(["a=1", "a.b=2"])


def test_demo_data_is_generated_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPTICAM_CACHE", str(tmp_path / "cache"))
    folder = demo_cache.demo_cache_dir()
    assert folder == tmp_path / "cache" / demo_cache.DEMO_VERSION
    pattern = demo_cache.ensure_demo_data(shards=2, per_shard=2)
    assert pattern == f"{folder}/demo-*.tar"
    files = sorted(folder.glob("demo-*.tar"))
    assert len(files) == 2 and (folder / ".complete").exists()
    mtimes = [f.stat().st_mtime_ns for f in files]
    demo_cache.ensure_demo_data(shards=2, per_shard=2)
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [demo_cache.DEMO_VERSION]


def test_demo_run_config_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTICAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_cache, "ensure_demo_data", lambda: f"{tmp_path}/cache/demo-*.tar")
    args = cli.build_parser().parse_args(["run"])
    config = cli.config_from_args(args)
    assert [m.name for m in config.methods] == demo_cache.DEMO_METHODS.split(",")
    assert config.metrics.steps == demo_cache.DEMO_STEPS and config.model.source == "demo"
    assert config.output == "./opticam-runs" and config.executor == "local"
    flagged = cli.config_from_args(
        cli.build_parser().parse_args(
            ["run", "--iterations", "7", "--s3-endpoint", "http://e", "--max-images", "9"]
        )
    )
    assert flagged.methods[0].options == {"iterations": 7}
    assert flagged.max_images == 9
    assert flagged.data_options() == {"client_kwargs": {"endpoint_url": "http://e"}}


@pytest.mark.e2e
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


# A value other than the default for every flag made from a config field, as typed on
# the command line, and what the field then holds.
SAMPLES: dict[tuple[str, str], tuple[list[str], Any]] = {
    ("run", "data"): (["a.tar", "b.tar"], ["a.tar", "b.tar"]),
    ("run", "output"): (["/tmp/elsewhere"], "/tmp/elsewhere"),
    ("run", "methods"): (["gradcam,opticam"], ["gradcam", "opticam"]),
    ("run", "target"): (["predicted"], "predicted"),
    ("run", "batch_size"): (["7"], 7),
    ("run", "device"): (["cpu"], "cpu"),
    ("run", "map_format"): (["full_png"], "full_png"),
    ("run", "max_images"): (["9"], 9),
    ("run", "max_pixels"): (["4000000"], 4_000_000),
    ("run", "pool"): (["gpu-a100"], "gpu-a100"),
    ("run", "max_in_flight"): (["8"], 8),
    ("run", "shard_attempts"): (["2"], 2),
    ("run", "start_timeout"): (["45"], 45.0),
    ("model", "source"): (["torchvision:resnet18"], "torchvision:resnet18"),
    ("model", "checkpoint"): (["s3://b/c.pt"], "s3://b/c.pt"),
    ("model", "trust_checkpoint"): ([], True),
    ("model", "target_layer"): (["layer3"], "layer3"),
    ("model", "input_size"): (["160"], 160),
    ("model", "resize_size"): (["180"], 180),
    ("model", "interpolation"): (["bicubic"], "bicubic"),
    ("model", "resize_mode"): (["squash"], "squash"),
    ("model", "num_classes"): (["7"], 7),
    ("model", "mean"): (["0.1", "0.2", "0.3"], (0.1, 0.2, 0.3)),
    ("model", "std"): (["0.4", "0.5", "0.6"], (0.4, 0.5, 0.6)),
    ("model", "relu_features"): ([], True),
    ("metrics", "insertion_deletion"): ([], False),
    ("metrics", "steps"): (["16"], 16),
    ("metrics", "blur_sigma"): (["2.5"], 2.5),
    ("metrics", "blur_kernel"): (["7"], 7),
    ("metrics", "deletion_baseline"): (["0.5"], 0.5),
    ("metrics", "save_curves"): ([], False),
    ("metrics", "localization"): ([], False),
    ("opticam", "relu_features"): ([], True),
    ("opticam", "normalization"): (["sigmoid"], "sigmoid"),
    ("opticam", "iterations"): (["12"], 12),
    ("opticam", "lr"): (["0.02"], 0.02),
    ("opticam", "objective"): (["diff"], "diff"),
    ("opticam", "score"): (["probability"], "probability"),
    ("opticam", "tolerance"): (["0.001"], 0.001),
    ("opticam", "amp_dtype"): (["bf16"], "bf16"),
    ("opticam", "preset"): (["fast"], "fast"),
    ("opticam", "lr_decay"): (["cosine"], "cosine"),
    ("opticam", "start"): (["gradcam"], "gradcam"),
    ("opticam", "prior_per_class"): (["3"], 3),
    ("opticam", "prior_fallback"): (["mean"], "mean"),
    ("opticam", "patience"): (["5"], 5),
    ("opticam", "plateau_rtol"): (["0.001"], 0.001),
    ("opticam", "plateau_atol"): (["0.01"], 0.01),
    ("opticam", "channels_last"): ([], True),
    ("opticam", "compile"): ([], True),
    ("cam", "relu_features"): ([], True),
    ("cam", "normalization"): (["max"], "max"),
    ("cam", "batch_size"): (["3"], 3),
}


def _field_value(config: Any, group: str, field: str) -> Any:
    if group == "run":
        value = getattr(config, field)
        return [m.name for m in value] if field == "methods" else value
    if group in ("model", "metrics"):
        return getattr(getattr(config, group), field)
    methods = {m.name: m.options for m in config.methods}
    return methods["opticam" if group == "opticam" else "gradcam"].get(field)


@pytest.mark.parametrize(
    ("words", "expected"),
    [(["--compile"], True), (["--compile", "auto"], "auto"), (["--compile", "False"], False)]
    + [(["--no-compile"], False), (["--compile", "yes"], True), ([], None)],
)
def test_the_compile_flag_is_a_switch_that_also_takes_auto(words: list[str], expected: Any) -> None:
    argv = ["config", "--methods", "opticam", "--data", "x.tar", *words]
    config = cli.config_from_args(cli.build_parser().parse_args(argv))
    assert _field_value(config, "opticam", "compile") == expected


def test_the_compile_flag_refuses_other_words(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["config", "--compile", "sometimes"])
    assert "expected one of auto, true, false, got 'sometimes'" in capsys.readouterr().err


def test_every_config_field_has_a_flag() -> None:
    from opticam.config import CAMOptions, MetricsOptions, ModelSpec, OptiCAMOptions, RunConfig

    fields = {("run", n) for n, f in RunConfig.model_fields.items() if not f.exclude} - {
        ("run", "model"),
        ("run", "metrics"),
        ("run", "executor"),
    }
    for group, model in (
        ("model", ModelSpec),
        ("metrics", MetricsOptions),
        ("opticam", OptiCAMOptions),
        ("cam", CAMOptions),
    ):
        fields |= {(group, n) for n in model.model_fields}
    assert fields == set(SAMPLES)  # a new field needs a flag (and a sample here)
    assert {(f.group, f.field) for f in cli.FLAGS} == fields | {("run", "executor")}


@pytest.mark.parametrize("flag", [f for f in cli.FLAGS if (f.group, f.field) in SAMPLES])
def test_each_flag_sets_its_field(flag: cli.Flag) -> None:
    words, expected = SAMPLES[(flag.group, flag.field)]
    option = flag.option
    if not words and expected is False:
        option = "--no-" + option.removeprefix("--")
    argv = ["config", "--methods", "opticam,gradcam"] if flag.field != "methods" else ["config"]
    if flag.field != "data":
        argv += ["--data", "x.tar"]
    args = cli.build_parser().parse_args([*argv, option, *words])
    config = cli.config_from_args(args)
    assert _field_value(config, flag.group, flag.field) == expected
    # ...and nothing else moved from its default.
    plain = argv if flag.field != "data" else [*argv, "--data", "x.tar"]
    defaults = cli.config_from_args(cli.build_parser().parse_args(plain))
    for other in SAMPLES:
        if other not in ((flag.group, flag.field), ("run", "data")):
            assert _field_value(config, *other) == _field_value(defaults, *other), other


def test_config_example_is_a_valid_job_and_runs_the_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from opticam.config import RunConfig

    code, example, err = run_main(["config", "--example"], capsys)
    assert code == 0, err
    assert example.count("# ") > 30  # every field is commented
    parsed = RunConfig.model_validate(yaml.safe_load(example))
    # The example spells out the defaults: the same job (run id) as giving none of them.
    assert parsed.run_id == RunConfig(data=parsed.data).run_id
    job = tmp_path / "job.yaml"
    job.write_text(example)
    flags = ["--iterations", "7", "--batch-size", "3", "--steps", "8", "--model", "demo"]
    code, out, err = run_main(["config", "--config", str(job), *flags], capsys)
    assert code == 0, err
    shown = yaml.safe_load(out)
    # Flags win over the file, group by group; the rest of the file stays.
    assert shown["methods"][0]["options"]["iterations"] == 7
    assert shown["methods"][0]["options"]["lr"] == 0.1
    assert shown["batch_size"] == 3 and shown["output"] == parsed.output
    assert shown["metrics"]["steps"] == 8 and shown["metrics"]["save_curves"] is True
    assert shown["data"] == parsed.data
    assert out.startswith("# run id: ")


def test_a_job_file_in_json_and_the_demo_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo_cache, "ensure_demo_data", lambda: f"{tmp_path}/demo-*.tar")
    job = tmp_path / "job.json"
    job.write_text('{"methods": [{"name": "gradcam", "options": {"batch_size": 4}}, "fakecam"]}')
    args = cli.build_parser().parse_args(["run", "--config", str(job), "--methods", "gradcam"])
    config = cli.config_from_args(args)
    # Methods named again on the command line keep their options from the file.
    assert [(m.name, m.options) for m in config.methods] == [("gradcam", {"batch_size": 4})]
    assert config.data == f"{tmp_path}/demo-*.tar"  # no data anywhere: the demo
    assert config.metrics.steps == demo_cache.DEMO_STEPS


@pytest.mark.parametrize(
    ("content", "extra", "fragment"),
    [
        (None, [], "job file '{job}' not found"),
        ("- a\n- b\n", [], "must hold a mapping of RunConfig fields, got list"),
        ("data: [unclosed\n", [], "is not valid YAML/JSON"),
        ("data: x.tar\nstorage_options: {key: AKIA}\n", [], "credentials are not read"),
        ("data: x.tar\nbatch: 3\n", [], "batch: Extra inputs are not permitted"),
        ("data: x.tar\nmethods: [gradcam]\n", ["--iterations", "3"], "--iterations set options"),
        ("data: x.tar\n", ["--cam-batch-size", "0"], "batch_size: Input should be greater"),
        # An explicit value is never replaced by a preset's, also the paper's own value.
        (
            "data: x.tar\nmethods: [{name: opticam, options: {preset: fast, iterations: 100}}]\n",
            [],
            "preset 'fast' sets iterations=32, which conflicts with the iterations=100 given",
        ),
        (
            "data: x.tar\nmethods: [opticam]\n",
            ["--preset", "fast", "--lr", "0.1"],
            "preset 'fast' sets lr=0.5, which conflicts with the lr=0.1 given",
        ),
    ],
)
def test_bad_job_files_and_flags_are_one_line_errors(
    content: str | None,
    extra: list[str],
    fragment: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job = tmp_path / "job.yaml"
    if content is not None:
        job.write_text(content)
    code, _, err = run_main(["config", "--config", str(job), *extra], capsys)
    assert code == 2
    assert err.count("\n") == 1 and fragment.format(job=job) in err, err


def test_a_bug_keeps_its_traceback(
    shards: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import opticam.pipeline

    def buggy(config: Any) -> None:
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr(opticam.pipeline, "preflight", buggy)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["run", "--data", shards[0]])
    monkeypatch.setattr(opticam.pipeline, "preflight", lambda c: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["run", "--data", shards[0]])


@pytest.mark.e2e  # the run's lifeline watchdog is a process
@pytest.mark.parametrize(
    ("incomplete", "failed", "status", "line"),
    [
        ([], {}, 0, None),
        (["/d/cut.tar"], {}, 1, "incomplete shard /d/cut.tar: the tar is truncated in storage"),
        ([], {"/d/x.tar": "ShardNotATarError: no tar"}, 1, "failed shard /d/x.tar: ShardNotATar"),
    ],
)
def test_exit_status_says_whether_images_were_lost(
    incomplete: list[str],
    failed: dict[str, str],
    status: int,
    line: str | None,
    shards: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import contextlib
    import types

    def fake_run(config: Any) -> dict[str, Any]:
        # What run_dataset returns: the run's summary, whatever its final state.
        return {
            "run_id": config.run_id, "shards_processed": 2, "shards_skipped": 0,
            "shards_failed": len(failed), "failed": failed, "shards_held": 1,
            "held": {"/d/h.tar": "host:1:x"}, "incomplete": incomplete, "images": 8,
            "errors": 0, "summary": [], "report_url": str(tmp_path / "index.html"),
            "not_run": [], "shards_not_run": 0, "server_lost": None, "storage_failed": None,
        }  # fmt: skip

    # A stand-in for flows.explain: importing Prefect here, under capsys, would bind its
    # log handlers to this test's captured stream and break later tests' logging.
    fake = types.ModuleType("opticam_flows.explain")
    fake.run_dataset = fake_run  # type: ignore[attr-defined]
    fake.progress_listener = lambda fn: contextlib.nullcontext()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "opticam_flows.explain", fake)
    argv = ["run", "--data", shards[0], "--output", str(tmp_path), "--methods", "fakecam"]
    code, out, err = run_main(argv, capsys)
    assert code == status, err
    assert "1 held by another run" in out
    if line is not None:
        assert line in err


@pytest.mark.e2e
def test_a_disk_that_fills_up_mid_run_ends_it_in_one_line_with_the_summary(
    tmp_path: Path,
) -> None:
    shards = make_shards(str(tmp_path / "data"), 3, 2, seed=4)
    output = tmp_path / "runs"
    argv = [
        "run", "--data", f"{tmp_path}/data/demo-*.tar", "--output", str(output),
        "--model", tiny.FACTORY, "--methods", "fakecam", "--device", "cpu",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), str(REPO / "tests/faults")]),
        # Two output probes (the command's and the flow's), run.json, then the errors and
        # rows files of the first shard; then the disk is full.
        "OPTICAM_TEST_ENOSPC_AFTER": "5",
    }
    env.pop("PREFECT_API_URL", None)
    full = subprocess.run(
        [sys.executable, "-m", "opticam", *argv],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert full.returncode == cli.EXIT_STORAGE_FAILED, full.stderr
    assert "Traceback" not in full.stderr + full.stdout
    errors = [line for line in full.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "no space left on device" in errors[0], full.stderr
    assert "rerun the same command" in errors[0]
    assert "1 shards processed" in full.stdout and "report: not written" in full.stdout
    assert len(full.stderr.splitlines()) + len(full.stdout.splitlines()) < 25
    [run] = output.iterdir()
    assert len(list((run / "rows").iterdir())) == 1  # the first shard is kept whole
    assert not [p for p in (run / "rows").iterdir() if p.name.startswith(".")]

    del env["OPTICAM_TEST_ENOSPC_AFTER"]
    again = run_subprocess_env(argv, tmp_path, env)
    assert again.returncode == 0, again.stderr
    assert "3 shards, 1 already done" in again.stderr
    assert len(list((run / "rows").iterdir())) == 3 and len(shards) == 3


def run_subprocess_env(
    argv: list[str], tmp_path: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "opticam", *argv],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


ALIAS_BOMB = """\
a: &a ["xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
{field}: [*e, *e, *e, *e, *e, *e, *e, *e, *e]
"""


@pytest.mark.parametrize(
    "job",
    [
        ALIAS_BOMB.format(field="methods"),
        ALIAS_BOMB.format(field="data"),
        ALIAS_BOMB.format(field="device"),
        ALIAS_BOMB.format(field="model"),
        "methods:\n  - name: opticam\n    options: {iterations: '" + "9" * 100_000 + "'}\n",
        "methods:\n  - name: opticam\n    options: {" + "k" * 100_000 + ": 1}\n",
        "data: '" + "/x" * 100_000 + ".tar'\n",
        "output: {" + ", ".join(f"k{i}: 1" for i in range(20_000)) + "}\n",
    ],
    ids=["bomb-methods", "bomb-data", "bomb-device", "bomb-model", "long-value", "long-key",
         "long-data", "many-keys"],
)  # fmt: skip
def test_messages_quote_a_job_file_value_in_a_few_hundred_characters(
    job: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: str
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(job)
    assert path.stat().st_size < 1_000_000
    code, out, err = run_main(["run", "--config", str(path), "--model", tiny_model], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and len(err) < 2_100, err[:300]
    assert err.startswith("opticam run: error: ")


def test_library_errors_quote_values_in_a_few_hundred_characters() -> None:
    from pydantic import ValidationError

    from opticam.config import MethodSpec, RunConfig
    from opticam.data import expand_shards
    from opticam.errors import MAX_QUOTED_CHARS, UserError, short_repr

    huge = "q" * 1_000_000
    shared: list[Any] = ["x" * 100] * 10
    for _ in range(5):
        shared = [shared] * 10  # 10^6 leaves, a few kilobytes in memory
    with pytest.raises(UserError) as caught:
        expand_shards([huge])
    assert len(str(caught.value)) < 2 * MAX_QUOTED_CHARS + 200
    for bad in (huge, shared, 10**5000):
        with pytest.raises((ValidationError, ValueError)) as failed:
            RunConfig(data="d.tar", device=bad)
        assert len(str(failed.value)) < 3_000
        with pytest.raises((ValidationError, ValueError)) as failed:
            key = bad if isinstance(bad, str | int) else "k"
            RunConfig(data="d.tar", methods=[MethodSpec(name="opticam", options={key: bad})])
        assert len(str(failed.value)) < 3_000
    assert len(short_repr(shared)) <= MAX_QUOTED_CHARS + 60
    assert short_repr(10**5000) == "<an integer of 16610 bits>"
    assert len(str(UserError(huge))) < 2_100


@pytest.mark.e2e
@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["run", "--help"],
        ["run", "--config", "{typo}"],
        ["run", "--methods", "nosuch"],
        ["run", "--batch-size", "zero"],
        ["config", "--config", "{typo}"],
        ["explain", "--help"],
        ["report", "--help"],
        ["deploy", "--help"],
        ["worker", "--help"],
    ],
)
def test_help_and_mistakes_load_neither_torch_nor_prefect(argv: list[str], tmp_path: Path) -> None:
    # A fresh interpreter: this one has imported both long ago.
    typo = tmp_path / "typo.yaml"
    typo.write_text("data: x.tar\nmethdos: [opticam]\n")
    argv = [a.format(typo=typo) for a in argv]
    code = (
        "import sys\n"
        "from opticam import cli\n"
        "try:\n"
        f"    status = cli.main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    status = exc.code or 0\n"
        "heavy = [m for m in ('torch', 'prefect', 'torchvision') if m in sys.modules]\n"
        "print('HEAVY', heavy, 'STATUS', status)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert "HEAVY [] STATUS" in done.stdout, done.stdout + done.stderr
    assert done.stdout.rsplit("STATUS ", 1)[1].strip() in ("0", "2"), done.stdout + done.stderr


def test_overlays_are_a_library_call(tmp_path: Path) -> None:
    from opticam.errors import UserError
    from opticam.overlays import write_overlays

    image, *_ = generate_sample(3, 7)
    path = tmp_path / "shape.png"
    image.save(path)
    written = write_overlays([str(path)], tmp_path / "out", methods=["fakecam", "gradcam"],
                             target_class=2, device="cpu")  # fmt: skip
    assert [(w.path.name, w.method, w.target) for w in written] == [
        ("shape-fakecam.png", "fakecam", 2),
        ("shape-gradcam.png", "gradcam", 2),
    ]
    assert all(w.path.is_file() and 0 <= w.probability <= 1 for w in written)
    with pytest.raises(UserError, match="out of range"):
        write_overlays([str(path)], tmp_path / "out", methods=["fakecam"], target_class=99)
    with pytest.raises(UserError, match="not found"):
        write_overlays([str(tmp_path / "nope.png")], tmp_path / "out")
