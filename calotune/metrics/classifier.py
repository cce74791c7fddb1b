"""Classifier two-sample test of the CaloChallenge 2022 (arXiv 2410.21611).

A binary classifier is trained to tell reference (label 1) from generated (label 0)
showers; its calibrated ROC AUC on a held-out split (0.5 = indistinguishable) and
JSD = (ln 2 - BCE) / ln 2 are reported (CaloChallenge community paper arXiv 2410.21611,
section 4; CaloChallenge ``evaluate.py``). The procedure follows the challenge:

- equal numbers of events per class (the larger sample is subsampled);
- each class split 60 / 20 / 20 into train / test / validation;
- Adam on BCE-with-logits; after every epoch the test accuracy is measured and the
  best epoch's weights are kept (training stops early at accuracy 1);
- the network's sigmoid outputs are calibrated with isotonic regression fitted on the
  test split (``y_min=1e-6, y_max=1-1e-6``, clipped outside the fitted range);
- AUC and BCE (hence JSD) are computed on the validation split, after calibration.

Two settings: :data:`CHALLENGE` (in -> 2048 -> 2048 -> 2048 -> 1 with LeakyReLU, Adam
2e-4, batch 1000, 50 epochs, inputs exactly as the challenge builds them) for final
reports, and :data:`FAST` (two 128-wide layers, batch 64, 20 epochs) for scores inside
search trials, where minutes per trial would dominate the search. The fast setting sees
high-level energies relative to E_inc and standardised features (see
:func:`high_level_inputs`): with a few thousand events and ten epochs an MLP does not
find the small difference log10 E_tot - log10 E_inc between two large, correlated
inputs, and missed a 10 % energy-scale error (AUC 0.51 instead of ~0.85) without them.
Low-level inputs are never standardised per voxel: that amplifies the noise of
nearly-empty voxels and hid the same error (AUC 0.61 vs 0.78). On ~1,000 training events
the low-level network's test accuracy plateaus for several epochs before it finds the
response difference, so early stopping (``patience``) is off in both settings. Both run
on CPU by default, seeded and deterministic.

scikit-learn is not a calotune dependency, so isotonic regression (pool adjacent
violators, with sklearn's handling of tied inputs) and ROC AUC (Mann-Whitney U with
mid-ranks for ties, equal to sklearn's ``roc_auc_score``) are implemented here.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from calotune.metrics.hlf import HighLevelFeatures, apply_threshold

__all__ = [
    "CHALLENGE",
    "FAST",
    "ClassifierConfig",
    "ClassifierResult",
    "IsotonicCalibrator",
    "classifier_test",
    "get_config",
    "high_level_inputs",
    "low_level_inputs",
    "roc_auc",
]

logger = logging.getLogger(__name__)

LN2 = math.log(2.0)


@dataclass(frozen=True)
class ClassifierConfig:
    """Network and training settings of a classifier test.

    standardize: scale inputs to zero mean, unit variance with train-split statistics.
        Off in the challenge setting (faithful to the published numbers); on in the fast
        setting, where a few epochs must suffice.
    relative_energies: high-level log energies relative to E_inc
        (:func:`high_level_inputs`); read by the callers that build the inputs.
    patience: stop after this many epochs without a better test accuracy (None: run
        all epochs, as the challenge does).
    threads: torch intra-op threads while training (None: leave torch's setting). The
        fast setting uses 1: for a 128-wide MLP thread synchronisation costs more than it
        gains, and on a shared or oversubscribed machine (parallel trials) two spinning
        threads made a 1,200-event test 10x slower (18 s instead of 2 s).
    """

    name: str
    hidden: tuple[int, ...]
    epochs: int
    lr: float
    batch_size: int
    standardize: bool
    relative_energies: bool = False
    patience: int | None = None
    threads: int | None = None
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)


CHALLENGE = ClassifierConfig("challenge", (2048, 2048, 2048), epochs=50, lr=2e-4,
                             batch_size=1000, standardize=False)
FAST = ClassifierConfig("fast", (128, 128), epochs=20, lr=1e-3, batch_size=64,
                        standardize=True, relative_energies=True, threads=1)
_CONFIGS = {"challenge": CHALLENGE, "fast": FAST}


def get_config(name: str | ClassifierConfig) -> ClassifierConfig:
    """A setting by name ("fast", "challenge") or a config passed through."""
    if isinstance(name, ClassifierConfig):
        return name
    if name not in _CONFIGS:
        raise ValueError(f"unknown classifier setting {name!r}; use one of {sorted(_CONFIGS)}")
    return _CONFIGS[name]


@dataclass(frozen=True)
class ClassifierResult:
    """Outcome of one classifier test; ``n_*`` count events of both classes together."""

    auc: float
    jsd: float
    auc_uncalibrated: float
    jsd_uncalibrated: float
    accuracy: float
    best_epoch: int
    n_per_class: int
    n_train: int
    n_test: int
    n_val: int
    n_features: int
    setting: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- inputs


def low_level_inputs(showers: np.ndarray, energy: np.ndarray, threshold_mev: float = 0.0
                     ) -> np.ndarray:
    """[log10 E_inc, voxels / E_inc] (arXiv 2410.21611), threshold applied first.

    Dividing by E_inc makes the input scale-free across three decades of energy;
    sub-threshold voxels are zeroed so that noise a detector would never record cannot
    give the generator away.
    """
    e = np.asarray(energy, dtype=np.float32).reshape(-1, 1)
    x = apply_threshold(np.asarray(showers, dtype=np.float32), threshold_mev)
    out = np.empty((x.shape[0], x.shape[1] + 1), dtype=np.float32)
    out[:, :1] = np.log10(e)
    np.divide(x, e, out=out[:, 1:])  # float32 in place: ds3 inputs are GBs
    return out


def high_level_inputs(features: HighLevelFeatures, relative: bool = False) -> np.ndarray:
    """The challenge's high-level input vector (``HighLevelFeatures.high_level_vector``).

    relative=True subtracts log10 E_inc from the log-energy features (E_layer, E_tot),
    i.e. presents log10(E / E_inc): the same information, linearly re-expressed so that a
    small network trained briefly sees response errors directly (used by the fast
    setting; the challenge setting keeps the challenge's own inputs).
    """
    x = features.high_level_vector()
    if relative:
        n_layers = features.e_layer.shape[1]
        n_alpha = features.ec_eta.shape[1]
        log_e_inc = x[:, :1]
        x[:, 1:1 + n_layers] -= log_e_inc
        # E_tot follows E_inc, E_layer and the four eta/phi blocks (see high_level_vector)
        x[:, 1 + n_layers + 4 * n_alpha] -= log_e_inc[:, 0]
    return x.astype(np.float32)


# --------------------------------------------------------------------------- statistics


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + P(tie) / 2 (Mann-Whitney)."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both classes")
    ranks = rankdata(s)  # mid-ranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _pava(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Non-decreasing least-squares fit to y (weights w) by pool adjacent violators."""
    means: list[float] = []
    weights: list[float] = []
    counts: list[int] = []
    for value, weight in zip(y.tolist(), w.tolist(), strict=True):
        means.append(value)
        weights.append(weight)
        counts.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            total = weights[-2] + weights[-1]
            means[-2] = (means[-2] * weights[-2] + means[-1] * weights[-1]) / total
            weights[-2] = total
            counts[-2] += counts[-1]
            del means[-1], weights[-1], counts[-1]
    return np.repeat(np.asarray(means), counts)


@dataclass(frozen=True)
class IsotonicCalibrator:
    """A fitted non-decreasing step-and-interpolate map, like sklearn's IsotonicRegression.

    Fitted points are the unique inputs (tied inputs pooled to their weighted mean
    target, as sklearn does); predictions interpolate linearly between them and clip
    outside (``out_of_bounds="clip"``).
    """

    x: np.ndarray
    y: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None,
            y_min: float = -np.inf, y_max: float = np.inf) -> IsotonicCalibrator:
        xs = np.asarray(x, dtype=np.float64).ravel()
        ys = np.asarray(y, dtype=np.float64).ravel()
        ws = (np.ones_like(xs) if sample_weight is None
              else np.asarray(sample_weight, dtype=np.float64).ravel())
        if not len(xs) == len(ys) == len(ws) or len(xs) == 0:
            raise ValueError("x, y and weights must be non-empty and of equal length")
        order = np.lexsort((ys, xs))
        xs, ys, ws = xs[order], ys[order], ws[order]
        ux, start = np.unique(xs, return_index=True)
        wsum = np.add.reduceat(ws, start)
        ymean = np.add.reduceat(ys * ws, start) / wsum
        fitted = np.clip(_pava(ymean, wsum), y_min, y_max)
        return cls(x=ux, y=fitted)

    def predict(self, x: np.ndarray) -> np.ndarray:
        xs = np.asarray(x, dtype=np.float64)
        if len(self.x) == 1:
            return np.full_like(xs, self.y[0])
        return np.interp(xs, self.x, self.y)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))  # no overflow warning for large |z|


def _bce(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


# --------------------------------------------------------------------------- network


def _mlp(n_in: int, hidden: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.LeakyReLU()]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]).reshape(-1) for i in range(0, len(x), batch)])


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (restored afterwards)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _split(n: int, fractions: tuple[float, float, float], rng: np.random.Generator
           ) -> list[np.ndarray]:
    counts = (n * np.asarray(fractions)).astype(int)
    perm = rng.permutation(n)
    return np.split(perm, np.cumsum(counts)[:-1])[:3]


def classifier_test(
    reference: np.ndarray,
    generated: np.ndarray,
    setting: str | ClassifierConfig = "fast",
    *,
    seed: int = 0,
    device: str = "cpu",
    standardize: bool | None = None,
) -> ClassifierResult:
    """Train reference-vs-generated and report calibrated AUC and JSD on held-out data.

    Args:
        reference, generated: (n, d) inputs (:func:`low_level_inputs` or
            :func:`high_level_inputs`), reference labelled 1 as in the challenge.
        setting: "fast", "challenge" or a :class:`ClassifierConfig`.
        standardize: override the setting's per-feature standardisation (pass False for
            low-level voxel inputs).
        seed: seeds the split, the initialisation and the batch order; the result is
            reproducible on the same machine and torch build.
        device: torch device for training.
    """
    cfg = get_config(setting)
    ref = np.asarray(reference, dtype=np.float32)
    gen = np.asarray(generated, dtype=np.float32)
    if ref.ndim != 2 or gen.ndim != 2 or ref.shape[1] != gen.shape[1]:
        raise ValueError(f"inputs must be 2-D with equal widths, got {ref.shape}, {gen.shape}")
    rng = np.random.default_rng(seed)
    n = min(len(ref), len(gen))
    if len(ref) != len(gen):
        logger.info("classifier: subsampling to %d events per class", n)
        ref = ref[np.sort(rng.choice(len(ref), n, replace=False))]
        gen = gen[np.sort(rng.choice(len(gen), n, replace=False))]
    parts_ref = _split(n, cfg.split, rng)
    parts_gen = _split(n, cfg.split, rng)
    if min(len(p) for p in parts_ref) < 2:
        raise ValueError(f"too few events ({n} per class) for a train/test/val split")

    def stack(k: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([ref[parts_ref[k]], gen[parts_gen[k]]])
        y = np.concatenate([np.ones(len(parts_ref[k])), np.zeros(len(parts_gen[k]))])
        order = rng.permutation(len(x))
        return x[order], y[order].astype(np.float32)

    (x_tr, y_tr), (x_te, y_te), (x_va, y_va) = stack(0), stack(1), stack(2)
    if cfg.standardize if standardize is None else standardize:
        mean = x_tr.mean(axis=0)
        std = x_tr.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        x_tr, x_te, x_va = ((a - mean) / std for a in (x_tr, x_te, x_va))

    dev = torch.device(device)
    t = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(dev)
         for k, v in {"xtr": x_tr, "ytr": y_tr, "xte": x_te, "xva": x_va}.items()}
    with torch.random.fork_rng(devices=[]), _torch_threads(cfg.threads):
        torch.manual_seed(seed)
        model = _mlp(ref.shape[1], cfg.hidden).to(dev)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        loss_fn = nn.BCEWithLogitsLoss()
        order_gen = torch.Generator().manual_seed(seed)
        best_acc, best_epoch = -1.0, 0
        best_state = copy.deepcopy(model.state_dict())
        for epoch in range(cfg.epochs):
            model.train()
            perm = torch.randperm(len(t["xtr"]), generator=order_gen).to(dev)
            for i in range(0, len(perm), cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                loss = loss_fn(model(t["xtr"][idx]).reshape(-1), t["ytr"][idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            p_test = torch.sigmoid(_logits(model, t["xte"], 4096)).cpu().numpy()
            acc = float(np.mean((p_test >= 0.5) == (y_te == 1)))
            logger.debug("classifier epoch %d: test accuracy %.4f", epoch + 1, acc)
            if acc > best_acc:
                best_acc, best_epoch = acc, epoch + 1
                best_state = copy.deepcopy(model.state_dict())
            if acc == 1.0:
                break
            if cfg.patience is not None and epoch + 1 - best_epoch >= cfg.patience:
                break
        model.load_state_dict(best_state)
        logit_te = _logits(model, t["xte"], 4096).cpu().numpy().astype(np.float64)
        logit_va = _logits(model, t["xva"], 4096).cpu().numpy().astype(np.float64)

    p_te, p_va = _sigmoid(logit_te), _sigmoid(logit_va)
    y_va64 = y_va.astype(np.float64)
    calibrator = IsotonicCalibrator.fit(p_te, y_te, y_min=1e-6, y_max=1 - 1e-6)
    p_cal = calibrator.predict(p_va)
    bce_raw = float(torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logit_va), torch.from_numpy(y_va64)))
    bce_cal = _bce(p_cal, y_va64)
    return ClassifierResult(
        auc=roc_auc(y_va64, p_cal),
        jsd=(LN2 - bce_cal) / LN2,
        auc_uncalibrated=roc_auc(y_va64, p_va),
        jsd_uncalibrated=(LN2 - bce_raw) / LN2,
        accuracy=float(np.mean((p_cal >= 0.5) == (y_va64 == 1))),
        best_epoch=best_epoch,
        n_per_class=n,
        n_train=len(x_tr),
        n_test=len(x_te),
        n_val=len(x_va),
        n_features=ref.shape[1],
        setting=cfg.name,
    )
