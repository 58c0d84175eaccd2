"""What several commands share: Prefect's logging settings, and paths as people type them."""

from __future__ import annotations

import os

__all__ = ["quiet_prefect", "shown_path"]


def quiet_prefect(verbose: bool) -> None:
    """Set Prefect's logging through its environment variables, before it is imported.

    Args:
        verbose: show Prefect's own INFO records on the console (``--verbose``).
    """
    # Must happen before prefect is imported: its settings are read at import. Records at
    # INFO are always made, so that the flow and shard runs' logs reach the Prefect API
    # (the UI's Logs tab); without --verbose only the console handler drops them.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    server_level = "INFO" if verbose else "WARNING"
    os.environ.setdefault("PREFECT_LOGGING_SERVER_LEVEL", server_level)
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", server_level)
    # The ephemeral server's telemetry logs an ERROR on every run without a network.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:
        import warnings

        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        warnings.filterwarnings("ignore", module="prefect")


def shown_path(url: str) -> str:
    """A ``file://`` URL as the plain path people type; other URLs unchanged."""
    return url[len("file://") :] if url.startswith("file://") else url
