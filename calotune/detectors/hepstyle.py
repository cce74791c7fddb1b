"""The HEP plot style of the detectors' reference-vs-generated plots (mplhep, scikit-hep).

mplhep's ROOT style (ticks inside on all four sides, minor ticks, TeX Gyre Heros fonts,
step histograms) with the font scaled to the small figures calotune writes (mplhep's sizes
are for 10 x 10 inch figures), and the experiment label ("calotune Simulation", as mplhep draws it).
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
    """"calotune Simulation" above the axes' left corner and ``right`` above its right corner.

    The layout of mplhep's ``exp_label`` (bold name, italic "Simulation", text on the right),
    placed here with plain ``ax.text``/``ax.annotate``: mplhep measures its texts with a
    full draw of the figure per label (0.2 s each, 3.5 s of a tiny search's 18 s), while an
    annotation anchored to the name's box is placed once, when the figure is saved.
    """
    name = ax.text(0.0, 1.01, "calotune", transform=ax.transAxes, ha="left", va="bottom",
                   fontsize="small", fontweight="bold")
    ax.annotate(" Simulation", xy=(1.0, 0.0), xycoords=name, ha="left", va="bottom",
                fontsize="small", fontstyle="italic")
    if right:
        ax.text(1.0, 1.01, right, transform=ax.transAxes, ha="right", va="bottom", fontsize="small")


def fixed_margins(fig: Any, *, left: float = 0.95, right: float = 0.2, bottom: float = 0.7, top: float = 0.4,
                  wspace: float = 0.3, hspace: float = 0.45) -> None:
    """Lay out ``fig``'s subplot grid with fixed margins, in inches, instead of a layout engine.

    Constrained layout measures every tick label of every axis at each draw: with the ROOT
    style's minor ticks on four sides that is about 40 % of drawing a small figure, and the
    plots after a search are most of its fixed cost. The defaults leave room for two lines
    of tick labels and axis label on the left and at the bottom (13 pt, 5-character ticks)
    and for :func:`hep_label`'s line above the axes; ``wspace``/``hspace`` are matplotlib's
    (fractions of the mean axes width/height).
    """
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, wspace=wspace, hspace=hspace)
