"""Spec settings shared by the model-source tests (test_models, test_zoo)."""

#: Spec settings a source must leave to load_model (none of them builds the net).
LATER = {
    "mean": (0.1, 0.2, 0.3),
    "std": (0.5, 0.6, 0.7),
    "input_size": 96,
    "resize_size": 99,
    "interpolation": "nearest",
    "resize_mode": "squash",
    "target_layer": "nope",
    "relu_features": False,
}
