"""The HEP plot style of the detectors' reference-vs-generated plots (mplhep, scikit-hep).

mplhep's ROOT style (ticks inside on all four sides, minor ticks, TeX Gyre Heros fonts,
step histograms) with the font scaled to the small figures calotune writes (mplhep's sizes
are for 10 x 10 inch figures), and the experiment label ("calotune Simulation").
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_RC_LOCK = threading.RLock()  # rcParams are process-wide: one styled plot at a time


@contextmanager
def hep_style(font_size: float = 13.0) -> Iterator[None]:
    """Plot under mplhep's ROOT style; matplotlib's defaults if mplhep is not installed.

    ``rc_context`` changes matplotlib's global settings for the duration of the block and
    restores them after, so call it around both the drawing and ``savefig`` (fonts and tick
    sizes are read at draw time) and from one thread at a time (the search's driver, after
    the trials, is the only plotter; a lock serialises any others).
    """
    try:
        import mplhep
    except ImportError:
        yield
        return
    import matplotlib

    scale = font_size / 26.0  # mplhep's sizes are for 26 pt text on 10 x 10 inches
    style = {k: v for k, v in mplhep.style.ROOT.items() if k != "figure.figsize"}
    style.update({"font.size": font_size, "xtick.major.size": 12 * scale, "xtick.minor.size": 6 * scale,
                  "ytick.major.size": 12 * scale, "ytick.minor.size": 6 * scale})
    with _RC_LOCK, matplotlib.rc_context(style):
        yield


def hep_label(ax: Any, right: str = "") -> None:
    """"calotune Simulation" (data=False) above the axes' left corner and ``right`` above its right corner."""
    try:
        import mplhep
    except ImportError:
        ax.set_title(right, fontsize="small", loc="right")
        return
    mplhep.label.exp_label(exp="calotune", text="", data=False, rlabel=right, loc=0, ax=ax, fontsize="small")
