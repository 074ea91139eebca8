"""Every place the app relies on Gradio behaviour that is not public API, in one module.

Written and tested for Gradio 6.31 (`TESTED_GRADIO`). Each helper says what it relies on and
what happens on a Gradio where that is gone: the app stays safe (the gateway's own checks do
not depend on anything here except `login_cookie_names` and `token_table`), at worst slower.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import gradio as gr
from packaging.version import Version

TESTED_GRADIO = ("6.31", "6.32")  # the minor versions these seams were read against
GRADIO_VERSION = Version(gr.__version__)


def is_tested_version() -> bool:
    return f"{GRADIO_VERSION.major}.{GRADIO_VERSION.minor}" in TESTED_GRADIO


def enforce_upload_origin(blocks: gr.Blocks) -> None:
    """Make Gradio check that every file path an event receives is one of its own uploads.

    Gradio runs that check only once `blocks.has_launched` is true, which `launch()` sets and
    `mount_gradio_app` never does: a mounted app would copy any server path a client names in
    a `FileData` into its cache and serve it. The gateway refuses such paths before Gradio sees
    them; this turns Gradio's own check on as well.
    """
    if hasattr(blocks, "has_launched"):
        blocks.has_launched = True
    else:  # the attribute moved: the gateway's FileData check still applies
        warnings.warn(
            f"Gradio {GRADIO_VERSION}: no Blocks.has_launched; relying on prefloop's upload check",
            stacklevel=2,
        )


def upload_folder() -> Path:
    """Where Gradio keeps uploads and files it serves (`GRADIO_TEMP_DIR`, else <tmp>/gradio)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def skip_queue_analytics(blocks: gr.Blocks) -> None:
    """Gradio rebuilds a pandas summary of its last 10,000 events after every event, for a
    monitoring page this app does not serve: work that grows with traffic on each vote.
    Make it never due (Gradio's own knobs on its queue, read on each event); on an untested
    Gradio leave them alone (slower, never wrong)."""
    if not is_tested_version():
        warnings.warn(
            f"Gradio {GRADIO_VERSION} is not a tested version ({', '.join(TESTED_GRADIO)}): "
            "queue analytics stay on (slower per event)",
            stacklevel=2,
        )
        return
    queue = getattr(blocks, "_queue", None)
    if hasattr(queue, "ANAYLTICS_CACHE_FREQUENCY"):  # sic, Gradio's spelling
        queue.ANAYLTICS_CACHE_FREQUENCY = 2**62
    if hasattr(queue, "ANALYTICS_MAX_EVENTS"):
        queue.ANALYTICS_MAX_EVENTS = 1


def login_cookie_names(gradio_app) -> tuple[str, str]:
    """The two cookies Gradio's `/login` sets to the same token (Secure and plain-HTTP variants)."""
    return f"access-token-{gradio_app.cookie_id}", f"access-token-unsecure-{gradio_app.cookie_id}"


def token_table(gradio_app) -> dict[str, str]:
    """Gradio's in-memory `token -> user name` table behind its login cookie."""
    return gradio_app.tokens


def mounted_gradio_app(outer_app):
    """The Gradio app `gr.mount_gradio_app` mounted in `outer_app` (None before it ran)."""
    from gradio.routes import App as GradioApp

    for route in outer_app.routes:
        if isinstance(getattr(route, "app", None), GradioApp):
            return route.app
    return None
