"""Names shared by the configuration and the library, importable without torch."""

from __future__ import annotations

__all__ = ["KNOWN_METHODS"]

# The registry in opticam.methods serves exactly these; a config (e.g. validated in the
# Prefect UI's process) checks against them without importing torch.
KNOWN_METHODS: tuple[str, ...] = (
    "opticam",
    "gradcam",
    "gradcampp",
    "xgradcam",
    "scorecam",
    "ablationcam",
    "layercam",
    "hirescam",
    "fakecam",
)
