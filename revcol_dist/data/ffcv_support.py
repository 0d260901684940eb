"""Whether FFCV can be used here, and the one-line warning when it cannot."""

from __future__ import annotations

import os
import warnings

INSTALL_HINT = (
    "FFCV is not installed: using the torch DataLoader fallback (slower). To use FFCV: "
    "apt-get install -y libopencv-dev libturbojpeg0-dev pkg-config && pip install 'revcol-dist[ffcv]'"
)


def ffcv_available() -> bool:
    if os.environ.get("REVCOL_DISABLE_FFCV") == "1":  # force the fallback (tests, debugging)
        return False
    try:
        import ffcv  # noqa: F401
        import ffcv.loader  # noqa: F401
    except Exception:
        return False
    return True


def warn_fallback() -> None:
    warnings.warn(INSTALL_HINT, RuntimeWarning, stacklevel=3)
