"""PBConv heuristic search (paper §4.3, Fig. 1 and 6).

For each of ``candidates`` random candidates: convert a copy of the model to PBConv with it, train a
few iterations with the user's ``train_step``, and score it by the dispersion (standard deviation)
of the position distribution (Eq. 1) of each converted layer's equivalent kernel. The paper found
this early dispersion strongly correlated with the final accuracy; higher is better.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..analysis.position import position_importance, position_std
from ..reparam.geometry import Rect
from .candidates import _generator, random_candidate

OP = "pbconv_search"
SCORES = ("mean_layer_std", "std_of_mean")


@dataclass
class SearchResult:
    """Outcome of :func:`pbconv_search`.

    ``best`` is a ``branches`` value for ``convert(model, "pbconv", branches=best, ...)``: keyed by
    kernel size ``(kh, kw)`` for a per-model choice, by layer name for a per-layer choice.
    ``candidates[i]`` is candidate ``i`` in the same form, ``scores[i]`` its model score,
    ``layer_scores[i]`` the std of each converted layer, ``best_index`` the winning candidate
    (per-model choice; None for a per-layer choice).
    """

    best: dict
    scores: list[float]
    candidates: list[dict]
    layer_scores: list[dict[str, float]]
    best_index: int | None
    per_layer: bool
    losses: list[list[float]] = field(default_factory=list)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def _score_model(layers: dict[str, nn.Module], how: str) -> tuple[float, dict[str, float]]:
    importances = {name: position_importance(block) for name, block in layers.items()}
    per_layer = {name: position_std(m) for name, m in importances.items()}
    per_layer = {n: (v if math.isfinite(v) else -math.inf) for n, v in per_layer.items()}
    if not per_layer:
        return -math.inf, per_layer
    if how == "mean_layer_std":
        score = sum(per_layer.values()) / len(per_layer)
    else:
        by_size: dict[tuple, list[torch.Tensor]] = {}
        for m in importances.values():
            by_size.setdefault(tuple(m.shape), []).append(m.double().cpu())
        stds = [position_std(torch.stack(ms).mean(0)) for ms in by_size.values()]
        score = sum(stds) / len(stds)
    return (score if math.isfinite(score) else -math.inf), per_layer


def pbconv_search(model: nn.Module, train_step: Callable, candidates: int = 10, iters: int = 20, seed: int = 0, *,
                  per_layer: bool = False, optimizer: Callable | None = None, score: str = "mean_layer_std",
                  progress: bool = True, convert_options: dict | None = None) -> SearchResult:
    """Choose PBConv branches for ``model`` by the paper's heuristic search.

    Args:
        model: the (unconverted) model; it is deep-copied for every candidate and never modified.
        train_step: ``train_step(model, optimizer, step)`` runs one training iteration on ``model``
            (forward, loss, ``optimizer.zero_grad()``, backward, ``optimizer.step()``); it may
            return the loss (recorded in ``SearchResult.losses``).
        candidates: number of random candidates (the paper uses 10).
        iters: training iterations per candidate.
        seed: seeds the candidate generation and, identically for every candidate, the global RNG
            during its conversion and training (the new branches' initialization, and the data order if
            ``train_step`` draws from the global RNG).
        per_layer: False: one candidate per kernel size shared by every layer, the best candidate by
            model score wins. True: every layer draws its own candidate, and each layer keeps the
            candidate under which its own std was highest.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer``; default SGD(lr=0.01, momentum=0.9).
        score: ``"mean_layer_std"`` (mean over layers of the std of each layer's distribution) or
            ``"std_of_mean"`` (std of the layer-averaged distribution, per kernel size, as in Fig. 1).
        progress: show a tqdm progress bar when tqdm is installed.
        convert_options: extra options for ``convert`` (``include``, ``exclude``, ``norm``, ...).
    Returns:
        :class:`SearchResult`; apply it with ``convert(model, "pbconv", branches=result.best, **convert_options)``.
    """
    from ..reparam.convert import convert  # late: repkernels.nn registers "pbconv" on import
    from ..nn.pbconv import PBConv2d

    if not isinstance(model, nn.Module):
        raise TypeError(f"{OP}: `model` must be an nn.Module, got {type(model).__name__}")
    if not callable(train_step):
        raise TypeError(f"{OP}: `train_step` must be callable (model, optimizer, step), got {train_step!r}")
    for name, v, lo in (("candidates", candidates, 1), ("iters", iters, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{OP}: `{name}` must be an int >= {lo}, got {v!r}")
    if score not in SCORES:
        raise ValueError(f"{OP}: `score` must be one of {SCORES}, got {score!r}")
    options = dict(convert_options or {})
    if "branches" in options:
        raise ValueError(f"{OP}: `convert_options` must not contain 'branches' (the search chooses them)")
    make_optimizer = optimizer or _sgd
    gen = _generator(seed)

    bar = range(candidates)
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(bar, desc="pbconv_search", unit="candidate")
        except ImportError:
            pass

    specs: list[dict] = []
    scores: list[float] = []
    layer_scores: list[dict[str, float]] = []
    losses: list[list[float]] = []
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    for _ in bar:
        spec: dict = {}

        def choose(name: str, conv: nn.Conv2d, spec=spec) -> list[Rect]:
            key = name if per_layer else tuple(conv.kernel_size)
            if key not in spec:
                spec[key] = random_candidate(tuple(conv.kernel_size), gen)
            return spec[key]

        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)      # same branch initialization and data order for every candidate
            converted, report = convert(model, "pbconv", branches=choose, **options)
            if not report.swapped:
                raise ValueError(f"{OP}: no conv of `model` can be converted to PBConv ({report.skipped[:3]} ...)")
            converted.train()
            opt = make_optimizer(converted.parameters())
            run_losses = []
            for step in range(iters):
                loss = train_step(converted, opt, step)
                if loss is not None:
                    run_losses.append(float(loss.detach() if isinstance(loss, torch.Tensor) else loss))
        layers = {name: m for name, m in converted.named_modules() if isinstance(m, PBConv2d)}
        s, per = _score_model(layers, score)
        specs.append(spec)
        scores.append(s)
        layer_scores.append(per)
        losses.append(run_losses)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(score=f"{s:.4f}", best=f"{max(scores):.4f}")
        del converted, opt

    if per_layer:
        best = {}
        for name in specs[0]:
            i = max(range(candidates), key=lambda k: layer_scores[k].get(name, -math.inf))
            best[name] = specs[i][name]
        return SearchResult(best, scores, specs, layer_scores, None, True, losses)
    i = max(range(candidates), key=lambda k: scores[k])
    return SearchResult(dict(specs[i]), scores, specs, layer_scores, i, False, losses)
