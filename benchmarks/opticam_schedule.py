"""Opti-CAM schedules: quality (AD / AG / AI) against passes per image on held-out demo data.

Runs the paper's setting (Adam, lr 0.1, 100 iterations from the uniform start), the same
setting cut at fewer iterations (the quality/passes curve), a grid of cheaper schedules
(higher learning rate, learning-rate decay, plateau stop, Grad-CAM start), and the class
prior (``start="prior"``: calibration sets of N images per class, drawn from another
seed and explained at the paper's setting, then the scored images started from their
class's prior), all on the bundled demo classifier, CPU (``--device`` for another), and
prints one table:

    python benchmarks/opticam_schedule.py                   # 200 images, seed 4242
    python benchmarks/opticam_schedule.py --images 400 --grid full
    python benchmarks/opticam_schedule.py --prior-per-class 3 --seed 4343

A prior row's passes per image spread the calibration images' own passes over the job
(scored and calibration images together); a second table projects them to a
50,000-image, 1,000-class job. The "fallback check" rows score the images of the classes
a half-class prior never saw, with each fallback.

A pass is one forward (+ backward) of an image's masked copy, or Grad-CAM's backward
(the ``passes`` diagnostic of :class:`opticam.methods.OptiCAM`); the paper's setting
costs 101 per image (100 steps and the forward that scores the last ``u``). A schedule
meets the target when its AD and AG are within 1 point (percentage points) of the
paper's setting with at most a third of its passes (<= 33.3 per image).

The images are drawn with a seed the classifier never saw (it was trained on seeds 1000
and 1001), go through JPEG like the demo shards, and are preprocessed and scored the way
the pipeline does it: the ground-truth class is explained, ``p_clean`` is the softmax of
the clean logits, and AD / AG / AI come from :func:`opticam.metrics.faithfulness_terms`
and :func:`opticam.metrics.faithfulness.average_drop` & co. Pass counts and scores do
not depend on the machine's load; the seconds column does.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import torch

from opticam.config import ModelSpec
from opticam.data import Preprocess, decode_image
from opticam.demo.generate import encode_jpeg, generate_sample
from opticam.methods import OptiCAM, get_explainer, upsample_normalize
from opticam.methods.prior import ClassPrior
from opticam.metrics import faithfulness_terms
from opticam.metrics.faithfulness import average_drop, average_gain, average_increase
from opticam.models import load_model
from opticam.names import OPTICAM_PRESETS

PAPER = "paper (lr 0.1, 100 it)"
#: The paper's run is also scored cut at these iterations (the quality/passes curve).
CUTS = (5, 10, 20, 32, 50)
#: Schedules run from the class prior: (name, options); start="prior" is added.
PRIOR_SCHEDULES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("fast (32 it, lr 0.5)", {"preset": "fast"}),
    ("24 it, lr 0.5", {"iterations": 24, "lr": 0.5}),
    ("paper (100 it, lr 0.1)", {}),
)
#: The whole-dataset job the passes are projected to: images and classes.
JOB_IMAGES, JOB_CLASSES = 50_000, 1_000
#: At most this many mean passes per image, and AD / AG within this many points.
MAX_PASSES = 100 / 3
MAX_POINTS = 1.0


@dataclass
class Result:
    name: str
    options: dict[str, Any]
    passes: float = 0.0
    ad: float = 0.0
    ag: float = 0.0
    ai: float = 0.0
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def _data(count: int, seed: int, size: Any, resize: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` demo images through JPEG and the pipeline's preprocessing, and labels."""
    return _data_at(list(range(count)), seed, size, resize)


class Recorder(OptiCAM):
    """Opti-CAM that keeps every step's ``u`` and objective, to cut the run afterwards.

    With a constant learning rate, ``iterations=N`` is exactly the first ``N`` steps of a
    longer run (the step-N forward is the one that scores the last ``u``), so the maps of
    every cut come from one run: the best ``u`` of steps ``0..N``, first best on ties,
    as Opti-CAM picks it. Needs every image active at every step (the paper's stop rule
    did not fire); :meth:`cut` raises otherwise.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.us: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.feats: torch.Tensor | None = None

    def _saliency(self, u: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if u.requires_grad or len(self.us) < self.iterations + 1:
            self.us.append(u.detach().clone())
            self.feats = feats
        return OptiCAM._saliency(u, feats)

    def _objective(
        self, masked_logits: torch.Tensor, targets: torch.Tensor, clean: torch.Tensor
    ) -> torch.Tensor:
        objective = super()._objective(masked_logits, targets, clean)
        self.values.append(objective.detach().clone())
        return objective

    def cut(self, iterations: int, size: tuple[int, int]) -> torch.Tensor | None:
        """Maps (B,1,H,W) of the run cut at ``iterations`` steps; None when an image stopped
        early (the batch is then run again with fewer iterations)."""
        values = self.values[: iterations + 1]
        shapes = {v.shape for v in self.values} | {u.shape[:1] for u in self.us}
        if self.feats is None or len(shapes) != 1:
            return None
        stacked = torch.stack(values)  # (N+1, B)
        best = stacked.argmax(dim=0)  # first maximum
        us = torch.stack(self.us[: iterations + 1])  # (N+1, B, K)
        u = us[best, torch.arange(us.shape[1], device=us.device)]
        maps, _ = upsample_normalize(OptiCAM._saliency(u, self.feats), size, self.normalization)
        return maps

    def reset(self) -> None:
        self.us, self.values, self.feats = [], [], None


def _schedules(grid: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, Opti-CAM options) of every schedule run after the paper's setting."""
    rows: list[tuple[str, dict[str, Any]]] = []
    rows.append((f"preset fast {OPTICAM_PRESETS['fast']}", {"preset": "fast"}))
    candidates: list[dict[str, Any]] = [
        {"iterations": 32, "lr": 0.4},
        {"iterations": 31, "lr": 0.5, "start": "gradcam"},
        {"iterations": 40, "lr": 0.5, "patience": 5, "plateau_rtol": 1e-3},
    ]
    if grid == "full":
        candidates.append({"iterations": 100, "lr": 0.1, "patience": 5, "plateau_rtol": 1e-3})
        for iterations in (16, 24, 32):
            for lr in (0.3, 0.5, 0.7, 1.0):
                for decay in ("none", "cosine"):
                    for start in ("uniform", "gradcam"):
                        its = iterations - 1 if start == "gradcam" else iterations
                        candidates.append(
                            {"iterations": its, "lr": lr, "lr_decay": decay, "start": start}
                        )
        for patience in (3, 5, 10):
            for rtol in (1e-3, 1e-2):
                candidates.append(
                    {
                        "iterations": 60,
                        "lr": 0.3,
                        "lr_decay": "cosine",
                        "patience": patience,
                        "plateau_rtol": rtol,
                    }
                )
    seen = set()
    for options in candidates:
        name = ", ".join(f"{k} {v}" for k, v in options.items())
        if name not in seen:
            seen.add(name)
            rows.append((name, options))
    return rows


def _evaluate(
    loaded: Any,
    images: torch.Tensor,
    targets: torch.Tensor,
    p_clean: torch.Tensor,
    name: str,
    options: dict[str, Any],
    batch: int,
    cuts: tuple[int, ...] = (),
    prior: ClassPrior | None = None,
) -> list[Result]:
    """Run one schedule over all images; with ``cuts``, also the paper run cut short.

    With ``prior``, every image starts from the class prior (``start="prior"``).
    """
    explainer: OptiCAM
    if prior is not None:
        explainer = OptiCAM(
            loaded.model,
            loaded.target_layer,
            relu_features=loaded.relu_features,
            reshape_transform=loaded.reshape_transform,
            prior=prior,
            **{**options, "start": "prior"},
        )
    elif cuts:
        explainer = Recorder(
            loaded.model, loaded.target_layer, relu_features=loaded.relu_features, **options
        )
    else:
        explainer = get_explainer("opticam", loaded, **options)  # type: ignore[assignment]
    maps, passes = [], []
    cut_maps: dict[int, list[torch.Tensor]] = {n: [] for n in cuts}
    start = time.perf_counter()
    for i in range(0, images.shape[0], batch):
        explanation = explainer(images[i : i + batch], targets[i : i + batch])
        maps.append(explanation.maps.detach())
        passes.append(explanation.diagnostics["passes"])
        if isinstance(explainer, Recorder):
            for n in cuts:
                cut = explainer.cut(n, tuple(images.shape[-2:]))  # type: ignore[arg-type]
                if cut is None:
                    rerun = get_explainer("opticam", loaded, **{**options, "iterations": n})
                    cut = rerun(images[i : i + batch], targets[i : i + batch]).maps.detach()
                cut_maps[n].append(cut)
            explainer.reset()
    seconds = time.perf_counter() - start
    results = [_score(loaded, images, targets, p_clean, name, options, torch.cat(maps))]
    results[0].passes = float(torch.cat(passes).double().mean())
    results[0].seconds = seconds / images.shape[0]
    for n in cuts:
        scored = _score(
            loaded,
            images,
            targets,
            p_clean,
            f"paper cut at {n} it",
            {"iterations": n},
            torch.cat(cut_maps[n]),
        )
        scored.passes = n + 1.0  # n steps and the forward that scores the last u
        scored.seconds = float("nan")
        results.append(scored)
    return results


def _calibrate(
    loaded: Any,
    per_class: int,
    seed: int,
    classes: int,
    batch: int,
    fast: dict[str, Any],
    keep: set[int] | None = None,
) -> tuple[ClassPrior, int]:
    """A class prior from the first ``per_class`` images of each class of another seed.

    The calibration images are drawn with ``seed`` (never the scored images' seed) and
    explained at the paper's setting for their label, as a run's calibration stage would.
    ``keep`` limits the prior to those classes (the others are unseen: the fallback).
    Returns the prior and the number of calibration images.
    """
    wanted = set(range(classes)) if keep is None else keep
    chosen: list[int] = []
    counts = dict.fromkeys(wanted, 0)
    index = 0
    while any(c < per_class for c in counts.values()):
        _image, label, _box, _mask = generate_sample(index, seed)
        if label in counts and counts[label] < per_class:
            counts[label] += 1
            chosen.append(index)
        index += 1
    images, labels = _data_at(chosen, seed, loaded.input_size, loaded.resize_size)
    images, labels = images.to(_device(loaded)), labels.to(_device(loaded))
    explainer = get_explainer("opticam", loaded, **fast)
    prior = ClassPrior.empty(
        loaded.num_classes,
        _channels(loaded),
        model=loaded.name,
        layer=loaded.target_layer_name,
    )
    for i in range(0, images.shape[0], batch):
        explanation = explainer(images[i : i + batch], labels[i : i + batch])
        assert explanation.channel_weights is not None
        prior.update(explanation.channel_weights, labels[i : i + batch])
    return prior, len(chosen)


def _device(loaded: Any) -> torch.device:
    """The device of the model's weights."""
    return next(loaded.model.parameters()).device


def _channels(loaded: Any) -> int:
    """The target layer's channel count, from one forward of a blank image."""
    from opticam.methods.opticam import capture_features

    with torch.no_grad():
        feats, _ = capture_features(
            loaded.model,
            loaded.target_layer,
            torch.zeros(1, 3, *loaded.input_size, device=_device(loaded)),
            reshape_transform=loaded.reshape_transform,
        )
    return int(feats.shape[1])


def _data_at(
    indices: list[int], seed: int, size: Any, resize: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo images of ``indices`` (of ``seed``), preprocessed as in :func:`_data`."""
    preprocess = Preprocess(size, resize)
    images, labels = [], []
    for index in indices:
        image, label, _box, _mask = generate_sample(index, seed)
        pixels, _ = preprocess(decode_image(encode_jpeg(image)), [])
        images.append(pixels)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def _score(
    loaded: Any,
    images: torch.Tensor,
    targets: torch.Tensor,
    p_clean: torch.Tensor,
    name: str,
    options: dict[str, Any],
    maps: torch.Tensor,
) -> Result:
    """AD / AG / AI of ``maps`` as the pipeline computes them."""
    terms = faithfulness_terms(loaded.model, images, maps, targets, p_clean=p_clean)
    return Result(
        name=name,
        options=options,
        ad=average_drop(terms["p_clean"], terms["p_masked"]),
        ag=average_gain(terms["p_clean"], terms["p_masked"]),
        ai=average_increase(terms["p_clean"], terms["p_masked"]),
    )


def _prior_rows(
    loaded: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    p_clean: torch.Tensor,
    per_class: list[int],
    seed: int,
    batch: int,
    fast: dict[str, Any],
    paper: Result,
) -> list[tuple[Result, int]]:
    """The class-prior rows, with the calibration images each prior cost.

    A row's ``passes`` spread the calibration images' own passes (explained at the
    paper's setting, ``paper.passes`` each) over the job: the scored images and the
    calibration images together. ``extra["scored"]`` keeps the scored images' own mean.
    The last two rows measure the fallback: a prior of the first half of the classes,
    scored on the images of the other half, with each fallback.
    """
    rows: list[tuple[Result, int]] = []
    classes = loaded.num_classes
    for n in per_class:
        prior, calibration = _calibrate(loaded, n, seed, classes, batch, fast)
        for name, options in PRIOR_SCHEDULES:
            r = _evaluate(
                loaded, images, labels, p_clean, "", {**options, **fast}, batch, prior=prior
            )[0]
            r.name = f"prior {n}/class, {name}"
            r.options = {**options, "start": "prior", "per_class": n}
            r.extra["scored"] = r.passes
            total = images.shape[0] + calibration
            r.passes = (r.passes * images.shape[0] + paper.passes * calibration) / total
            rows.append((r, n))
            print(
                f"  ran {r.name}: passes {r.passes:.1f} (scored {r.extra['scored']:.1f}), "
                f"AD {r.ad:.2f}, AG {r.ag:.2f}",
                flush=True,
            )
    if per_class:
        half = set(range(classes // 2))
        unseen = (labels >= classes // 2).nonzero().squeeze(1)
        n = 3 if 3 in per_class else per_class[0]
        partial, _ = _calibrate(loaded, n, seed, classes, batch, fast, keep=half)
        sub = images[unseen], labels[unseen], p_clean[unseen]
        base = _evaluate(loaded, *sub, "", {**PRIOR_SCHEDULES[0][1], **fast}, batch)[0]
        base.name = f"fallback check: unseen classes, uniform start ({len(unseen)} images)"
        rows.append((base, 0))
        for fallback in ("mean", "uniform"):
            partial.fallback = fallback  # type: ignore[assignment]
            r = _evaluate(
                loaded, *sub, "", {**PRIOR_SCHEDULES[0][1], **fast}, batch, prior=partial
            )[0]
            r.name = f"fallback check: unseen classes, fallback {fallback} ({len(unseen)} images)"
            r.options = {"fallback": fallback}
            rows.append((r, 0))
    return rows


def _print_projection(rows: list[tuple[Result, int]], paper: Result) -> None:
    """Passes per image of a whole-dataset job, from the measured scored passes."""
    print()
    print(
        f"Projected to a {JOB_IMAGES:,}-image, {JOB_CLASSES:,}-class job (calibration at "
        f"{paper.passes:.1f} passes per image, the paper's setting is {paper.passes:.1f}):"
    )
    print()
    print(
        "| prior row | calibration images | passes / image | job size for <= 1/3 of the paper's passes |"
    )
    print("| --- | ---: | ---: | ---: |")
    third = paper.passes / 3
    for r, n in rows:
        if not n:
            continue
        scored = r.extra["scored"]
        calibration = n * JOB_CLASSES
        passes = (calibration * paper.passes + (JOB_IMAGES - calibration) * scored) / JOB_IMAGES
        if scored >= third:
            needed = "never"
        else:
            needed = f"{calibration * (paper.passes - scored) / (third - scored):,.0f}"
        print(f"| {r.name} | {calibration:,} | {passes:.1f} | {needed} |")


def _meets(result: Result, paper: Result) -> bool:
    return (
        result.passes <= MAX_PASSES
        and result.ad - paper.ad <= MAX_POINTS
        and paper.ag - result.ag <= MAX_POINTS
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="held-out demo images")
    parser.add_argument("--seed", type=int, default=4242, help="demo data seed (not 1000/1001)")
    parser.add_argument("--batch", type=int, default=50, help="images per Opti-CAM call")
    parser.add_argument("--grid", choices=("small", "full"), default="small")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run every schedule with channels_last=True (same maps up to rounding; "
        "about twice as fast on CPU for the demo model)",
    )
    parser.add_argument(
        "--prior-per-class",
        default="1,3,5,10",
        help="calibration images per class of the class-prior rows, comma-separated "
        "(empty: no prior rows)",
    )
    parser.add_argument(
        "--calibration-seed",
        type=int,
        default=None,
        help="demo seed of the calibration images (default: --seed + 1)",
    )
    parser.add_argument(
        "--check-cut",
        type=int,
        default=5,
        help="also run this many iterations for real and check it matches the cut (0: no)",
    )
    args = parser.parse_args()
    if args.seed in (1000, 1001):
        parser.error("seeds 1000 and 1001 are the classifier's training data")
    calibration_seed = args.seed + 1 if args.calibration_seed is None else args.calibration_seed
    if calibration_seed in (1000, 1001, args.seed):
        parser.error("the calibration seed must differ from --seed and from 1000/1001")
    per_class = [int(n) for n in args.prior_per_class.split(",") if n.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(ModelSpec(source="demo"), torch.device(args.device))
    images, labels = _data(args.images, args.seed, loaded.input_size, loaded.resize_size)
    images, labels = images.to(args.device), labels.to(args.device)
    with torch.no_grad():
        probs = torch.softmax(loaded.model(images).float(), dim=1)
    # The pipeline's default target: the ground-truth class.
    p_clean = probs.gather(1, labels.view(-1, 1)).squeeze(1)
    accuracy = float((probs.argmax(1) == labels).double().mean()) * 100

    # Eager throughout (compile=auto could switch mid-run): the seconds compare schedules.
    fast = {"compile": False, **({"channels_last": True} if args.channels_last else {})}
    results: list[Result] = []
    runs = [(PAPER, {}, CUTS), *((n, o, ()) for n, o in _schedules(args.grid))]
    for name, options, cuts in runs:
        done = _evaluate(
            loaded, images, labels, p_clean, name, {**options, **fast}, args.batch, cuts
        )
        for r in done:
            r.options = options
            print(
                f"  ran {r.name}: passes {r.passes:.1f}, AD {r.ad:.2f}, AG {r.ag:.2f}, "
                f"AI {r.ai:.1f}, {r.seconds * 1000:.0f} ms/image",
                flush=True,
            )
        results += done
    paper = results[0]
    prior_rows = _prior_rows(
        loaded, images, labels, p_clean, per_class, calibration_seed, args.batch, fast, paper
    )
    results += [r for r, _ in prior_rows]
    if args.check_cut:
        # The cut maps equal a real run with fewer iterations.
        real = _evaluate(
            loaded,
            images,
            labels,
            p_clean,
            "check",
            {"iterations": args.check_cut, **fast},
            args.batch,
        )[0]
        cut = next(r for r in results if r.name == f"paper cut at {args.check_cut} it")
        assert abs(real.ad - cut.ad) < 1e-6 and abs(real.ag - cut.ag) < 1e-6, (real, cut)
        print(f"  checked: a real {args.check_cut}-iteration run gives the cut's AD and AG")

    print()
    print(
        f"Opti-CAM schedules on {args.images} held-out demo images (seed {args.seed}, "
        f"label targets, classifier accuracy {accuracy:.1f}%), {platform.machine()} {args.device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}"
    )
    print()
    header = "| schedule | passes / image | AD | AG | AI | ΔAD | ΔAG | target | ms / image |"
    print(header)
    print("|" + " --- |" * header.count(" | ") + " --- |")
    for r in results:
        mark = "paper" if r is paper else ("yes" if _meets(r, paper) else "no")
        if r.name.startswith("fallback check"):
            mark = "—"  # scored on another set of images than the paper's row
        print(
            f"| {r.name} | {r.passes:.1f} | {r.ad:.2f} | {r.ag:.2f} | {r.ai:.1f} | "
            f"{r.ad - paper.ad:+.2f} | {r.ag - paper.ag:+.2f} | {mark} | "
            f"{r.seconds * 1000:.0f} |"
        )
    if prior_rows:
        _print_projection(prior_rows, paper)
    meeting = [
        r
        for r in results[1:]
        if _meets(r, paper) and "preset" not in r.options and not r.name.startswith("fallback")
    ]
    print()
    if meeting:
        best = min(meeting, key=lambda r: (r.passes, r.ad - r.ag))
        print(
            f"Cheapest schedule within {MAX_POINTS:g} point of the paper's AD and AG with "
            f"<= {MAX_PASSES:.1f} passes: {best.name} ({best.passes:.1f} passes, "
            f"AD {best.ad:.2f}, AG {best.ag:.2f})"
        )
    else:
        print(
            f"No schedule is within {MAX_POINTS:g} point of the paper's AD and AG at <= "
            f"{MAX_PASSES:.1f} passes per image."
        )


if __name__ == "__main__":
    main()
