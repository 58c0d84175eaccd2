"""The paper's headline result, reproduced on the bundled demo classifier.

METHOD.md section 5: Opti-CAM far below Grad-CAM on Average Drop and far above it on
Average Gain and Average Increase; Fake-CAM with a small drop but a gain near zero.
Held-out images use a seed the classifier never saw in training. Kept small for the quick
test run (50 images, Opti-CAM at 30 iterations: about 4 s on 2 CPU cores, against a minute
for 200 images at the paper's 100); measured margins at this size: Opti-CAM's AD is 0.19 of
Grad-CAM's (the bound is 0.5), its AG 6.7 times Grad-CAM's (the bound is 2).
"""

from __future__ import annotations

import pytest
import torch

from opticam.demo import load_model
from opticam.demo.train import HELDOUT_SEED, TRAIN_SEED, VAL_SEED, load_images
from opticam.methods import get_explainer
from opticam.metrics import average_drop, average_gain, average_increase, faithfulness_terms

N_IMAGES = 50
#: Opti-CAM's Adam steps (the paper's 100 gives the same ordering with wider margins).
ITERATIONS = 30
# Far from the seeds used for training, validation and the reported held-out numbers.
ORDERING_SEED = 31337


@pytest.fixture(scope="module")
def scores() -> dict[str, dict[str, float]]:
    assert ORDERING_SEED not in (TRAIN_SEED, VAL_SEED, HELDOUT_SEED)
    torch.manual_seed(0)
    model = load_model()
    images_u8, labels, _ = load_images(ORDERING_SEED, N_IMAGES)
    images = images_u8.float() / 255.0
    out: dict[str, dict[str, float]] = {}
    for method in ("opticam", "gradcam", "fakecam"):
        options = {"iterations": ITERATIONS} if method == "opticam" else {}
        explainer = get_explainer(method, model, **options)
        p_clean, p_masked = [], []
        for start in range(0, N_IMAGES, 50):
            x, y = images[start : start + 50], labels[start : start + 50]
            terms = faithfulness_terms(model, x, explainer(x, y).maps, y)
            p_clean.append(terms["p_clean"])
            p_masked.append(terms["p_masked"])
        p, o = torch.cat(p_clean), torch.cat(p_masked)
        out[method] = {
            "AD": average_drop(p, o),
            "AG": average_gain(p, o),
            "AI": average_increase(p, o),
        }
    return out


def test_opticam_beats_gradcam_as_in_the_paper(scores: dict[str, dict[str, float]]) -> None:
    opti, grad = scores["opticam"], scores["gradcam"]
    assert opti["AD"] < 0.5 * grad["AD"], scores
    assert opti["AG"] > 2.0 * grad["AG"], scores
    assert opti["AI"] > grad["AI"], scores


def test_fakecam_has_small_drop_and_no_gain(scores: dict[str, dict[str, float]]) -> None:
    fake = scores["fakecam"]
    assert fake["AD"] < 5.0, scores
    assert fake["AG"] < 5.0, scores
