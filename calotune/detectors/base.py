"""What every detector provides: geometry, synthetic reference showers, file I/O, scores.

The search, trainer, promotion and generation code only talk to this interface, so a new
detector is one new package plus one registry line. Every detector package has the same
modules: ``geometry``, ``synthesis``, ``io``, ``evaluation``, ``plots`` (and ``detector``,
re-exported by its ``__init__``), and passes ``tests/test_conformance_detectors.py`` and
``tests/test_streamed_scoring.py``.

Shower kinds: a "grid" detector holds :class:`~calotune.showers.ShowerSet` (fixed cells);
a "points" detector holds :class:`~calotune.pointclouds.PointCloudSet` (variable-length
hits). A grid detector that gives its cell centres (:meth:`Detector.cell_centres`) and
the inverse map (:meth:`Detector.locate`) converts both ways, so point-cloud models can
be trained on, and scored against, grid data with the grid's own metrics.

Streamed scoring: every score and plot is computed from a :class:`Summary` of each sample
(per-event features, and the few pooled per-hit values a spectrum needs), which a
detector builds batch by batch (:meth:`Detector.summarise`): summaries of consecutive
batches concatenate (:meth:`Summary.concat`, :class:`SummaryBuilder`) into the summary of
the whole sample, so :func:`calotune.sampling.score_streamed` never holds a generated
sample, and the reference's summary is computed once for every model and plot.
:meth:`Detector.scores` and :meth:`Detector.plot` are the whole-sample wrappers
(summarise both, then :meth:`Detector.scores_from` / :meth:`Detector.plot_from`).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from calotune.showers import ShowerSet

if TYPE_CHECKING:
    from calotune.pointclouds import PointCloudSet


@dataclass
class Summary:
    """What a detector's scores and plots need of one sample, reduced event by event.

    events: name -> array whose first axis is the event (N rows): per-event features.
    pooled: name -> 1-D array of a variable number of values per event, in event order
        (e.g. every hit's energy for a spectrum): the concatenation over batches equals the
        whole sample's array.
    meta: facts that are the same for every batch of one detector (layer ids, the
        detector's identity :attr:`Detector.summary_key`); checked equal on concatenation.
    heavy: names in ``events`` that are as large as the cells (CaloChallenge's low-level
        classifier inputs): needed by the scores only, dropped by :meth:`for_plots` so a
        summary kept for plotting is small.

    A summary of N events concatenated from batches has exactly the arrays of the
    summary of the N events at once (the features are computed per row), which
    ``tests/test_streamed_scoring.py`` checks for every detector.
    """

    n_events: int
    events: dict[str, np.ndarray]
    pooled: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    heavy: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        bad = {k: len(v) for k, v in self.events.items() if len(v) != self.n_events}
        if bad:
            raise ValueError(f"Summary of {self.n_events} events has per-event arrays of other lengths: {bad}")

    def __len__(self) -> int:
        return self.n_events

    @property
    def nbytes(self) -> int:
        """Bytes of every array (the memory a kept summary costs)."""
        return sum(int(v.nbytes) for v in (*self.events.values(), *self.pooled.values()))

    def for_plots(self) -> Summary:
        """The summary without its ``heavy`` arrays (cell-sized score inputs); shares the rest."""
        if not self.heavy:
            return self
        return replace(self, events={k: v for k, v in self.events.items() if k not in self.heavy},
                       heavy=frozenset())

    @staticmethod
    def concat(pieces: Sequence[Summary]) -> Summary:
        """The summaries of consecutive batches as the summary of the batches together."""
        builder = SummaryBuilder()
        for piece in pieces:
            builder.add(piece)
        return builder.result()


class SummaryBuilder:
    """Concatenates batch summaries as they come, into preallocated per-event arrays when
    the total is known (``n_events``): the result is then built without a second copy of
    its largest arrays (a list of pieces plus their concatenation would be two)."""

    def __init__(self, n_events: int | None = None) -> None:
        self.n_total = n_events
        self.n = 0
        self._events: dict[str, Any] = {}
        self._pooled: dict[str, list[np.ndarray]] = {}
        self._first: Summary | None = None

    def add(self, piece: Summary) -> None:
        """Append the summary of the next batch (its events follow the previous ones)."""
        if self._first is None:
            self._first = piece
            self._pooled = {k: [] for k in piece.pooled}
            for name, value in piece.events.items():
                if self.n_total is None:
                    self._events[name] = []
                else:
                    self._events[name] = np.empty((self.n_total, *value.shape[1:]), value.dtype)
        first = self._first
        if set(piece.events) != set(first.events) or set(piece.pooled) != set(first.pooled):
            raise ValueError("batch summaries of one sample must have the same arrays")
        if piece.meta != first.meta:
            raise ValueError(f"batch summaries disagree on {sorted(set(piece.meta) ^ set(first.meta)) or 'meta'}")
        lo, hi = self.n, self.n + piece.n_events
        if self.n_total is not None and hi > self.n_total:
            raise ValueError(f"more than the announced {self.n_total} events")
        for name, value in piece.events.items():
            if self.n_total is None:
                self._events[name].append(value)
            else:
                self._events[name][lo:hi] = value
        for name, value in piece.pooled.items():
            self._pooled[name].append(value)
        self.n = hi

    def result(self) -> Summary:
        """The summary of every event added; refused if fewer than announced arrived."""
        if self._first is None:
            raise ValueError("no batch summary was added")
        if self.n_total is not None and self.n != self.n_total:
            raise ValueError(f"{self.n} events summarised, {self.n_total} announced")
        first = self._first
        events = ({k: v for k, v in self._events.items()} if self.n_total is not None
                  else {k: np.concatenate(v) for k, v in self._events.items()})
        pooled = {k: (v[0] if len(v) == 1 else np.concatenate(v)) for k, v in self._pooled.items()}
        return Summary(self.n, events, pooled, dict(first.meta), first.heavy)


class Detector(ABC):
    """A calorimeter: its cell layout, a synthetic shower source, its file layout, metrics."""

    #: registry name, e.g. "zdc"; also the MLflow registered-model name.
    name: str
    #: condition names in ShowerSet.conditions, "energy" first.
    conditions: tuple[str, ...]
    #: part names in ShowerSet.cells, with their widths in :attr:`part_sizes`.
    parts: tuple[str, ...]
    #: "grid": samples are ShowerSets; "points": PointCloudSets (calotune.pointclouds).
    shower_kind: Literal["grid", "points"] = "grid"

    @property
    @abstractmethod
    def part_sizes(self) -> dict[str, int]:
        """part -> number of cells. A "points" detector returns ``{"hits": 4 * max hits per
        event}``: an upper bound of the values per event, which the disk and memory checks
        of ``generate`` and the synthetic cache use unchanged."""

    @abstractmethod
    def geometry_dict(self) -> dict[str, Any]:
        """JSON-safe geometry, enough to rebuild this detector with :meth:`from_geometry`."""

    @classmethod
    @abstractmethod
    def from_geometry(cls, geometry: dict[str, Any]) -> Detector:
        """Inverse of :meth:`geometry_dict`."""

    @abstractmethod
    def synthesize(self, n_events: int, seed: int, **options: Any) -> ShowerSet:
        """Synthetic reference showers (parametrised, GFlash, hep-ex/0001020)."""

    @abstractmethod
    def read(self, path: Path, max_events: int | None = None) -> ShowerSet:
        """Read and validate an HDF5 file (its first ``max_events`` rows if given); raise
        UserError naming file and key. Files are untrusted: use calotune.data.hdf5's checked
        path, which bounds memory and turns every h5py failure into a UserError."""

    @abstractmethod
    def read_conditions(self, path: Path, max_events: int | None = None) -> dict[str, np.ndarray]:
        """Only the conditions of a file (``generate --conditions`` needs no cells)."""

    @abstractmethod
    def write(self, path: Path, showers: ShowerSet) -> None:
        """Write an HDF5 file in this detector's documented layout, atomically."""

    @abstractmethod
    def write_stream(self, path: Path, batches: Iterable[ShowerSet], attrs: dict[str, Any] | None = None) -> int:
        """Write batches as they come (memory bounded by one batch), atomically; the file is
        read back by :meth:`read` exactly as :meth:`write` would have written it. Returns
        the number of events written."""

    @abstractmethod
    def objectives(self) -> dict[str, str]:
        """Score names :meth:`scores` returns -> optimisation mode ("min" or "max")."""

    # ------------------------------------------------------------------ scores

    @abstractmethod
    def summarise(self, showers: ShowerSet | PointCloudSet) -> Summary:
        """Per-event features of ``showers`` (and pooled per-hit values) that
        :meth:`scores_from` and :meth:`plot_from` need; computed row by row, so summaries
        of consecutive batches concatenate into the whole sample's summary."""

    @abstractmethod
    def scores_from(self, reference: Summary, generated: Summary) -> dict[str, float]:
        """Physics scores (keys of objectives()) from the two samples' summaries."""

    @abstractmethod
    def plot_from(self, reference: Summary, generated: Summary, out_dir: Path) -> list[Path]:
        """Reference-vs-generated distribution plots (PNG files in ``out_dir``) from summaries."""

    @property
    def summary_key(self) -> str:
        """This detector's identity in a :class:`Summary`'s meta: name and geometry, so a
        reference summary made by another geometry is never scored against."""
        return f"{self.name}:{json.dumps(self.geometry_dict(), sort_keys=True, default=str)}"

    def as_summary(self, sample: ShowerSet | PointCloudSet | Summary) -> Summary:
        """``sample`` summarised, or itself if it already is a summary of this detector."""
        if isinstance(sample, Summary):
            key = sample.meta.get("detector")
            if key is not None and key != self.summary_key:
                raise ValueError(f"a summary made by {key.split(':')[0]!r} with another geometry "
                                 f"cannot be scored by {self.name!r}")
            return sample
        return self.summarise(sample)

    def scores(self, reference: ShowerSet | PointCloudSet | Summary,
               generated: ShowerSet | PointCloudSet | Summary) -> dict[str, float]:
        """Physics scores of ``generated`` against ``reference`` (keys of objectives()).

        Either side may be a sample or its :class:`Summary` (a reference summarised once
        is reused for every model); the numbers are those of :meth:`scores_from`.
        """
        return self.scores_from(self.as_summary(reference), self.as_summary(generated))

    def plot(self, reference: ShowerSet | PointCloudSet | Summary,
             generated: ShowerSet | PointCloudSet | Summary, out_dir: Path) -> list[Path]:
        """Reference-vs-generated distribution plots as PNG files in ``out_dir`` (either side
        a sample or its :class:`Summary`, as :meth:`scores`)."""
        return self.plot_from(self.as_summary(reference), self.as_summary(generated), Path(out_dir))

    def default_objective(self) -> tuple[str, str]:
        """(metric, mode) a search optimises when its spec names none; one of :meth:`objectives`.

        The generic spec must not default to one detector's metric; this default (the
        first declared objective) is overridden by detectors with a better single number.
        """
        metric, mode = next(iter(self.objectives().items()))
        return metric, mode

    # ------------------------------------------------------------- point clouds

    def cell_centres(self) -> dict[str, np.ndarray]:
        """part -> (n_cells, 3) cell-centre (x, y, z) in mm, in file order (grid detectors)."""
        raise NotImplementedError(f"{self.name} has no point-cloud geometry")

    def locate(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position of the part in :attr:`parts`, or -1 outside the grid; flat cell index)
        of points (H, 3) in mm; the inverse of :meth:`cell_centres` (grid detectors)."""
        raise NotImplementedError(f"{self.name} has no point-cloud geometry")

    def to_point_cloud(self, showers: ShowerSet) -> PointCloudSet:
        """One hit per non-zero cell at the cell centre (:func:`calotune.pointclouds.grid_to_point_cloud`)."""
        from calotune.pointclouds import grid_to_point_cloud

        return grid_to_point_cloud(showers, self.cell_centres())

    def voxelise(self, cloud: PointCloudSet) -> ShowerSet:
        """Hits summed into this detector's cells, so its grid metrics apply unchanged;
        ``voxelise(to_point_cloud(s))`` gives back the cell energies of ``s`` exactly."""
        from calotune.pointclouds import grid_voxelise

        return grid_voxelise(cloud, {p: self.part_sizes[p] for p in self.parts}, self.locate)
