"""PBConv candidate generation (§4.3 rules, Fig. 5), position importance (Eq. 1), heat maps, heuristic search."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repkernels.analysis import (layer_position_importances, model_position_importance, plot_position_importance,
                                 position_importance, position_std)
from repkernels.nn import PBConv2d
from repkernels.reparam import convert
from repkernels.search import legal_sizes, pbconv_search, place_kernels, random_candidate
from reparam_utils import randomize_bn, single_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

# ------------------------------------------------------------------------------------- candidate generation


def test_fig5_example():
    """Paper Fig. 5: 3x3 kernel, sequence 3x1, 1x3, 3x1, 3x1. By hand (0-based (top, left, h, w)):
    1. 3x1: every column has 3 uncovered taps; the centre rule picks the middle column      -> (0, 1, 3, 1)
    2. 1x3: every row has 2 uncovered taps; the centre rule picks the middle row            -> (1, 0, 1, 3)
    3. 3x1: left and right columns have 2 uncovered taps each, neither crosses the centre;
       the alternative rule (left to right) picks the left column                           -> (0, 0, 3, 1)
    4. 3x1: only the right column has uncovered taps                                        -> (0, 2, 3, 1)
    """
    assert place_kernels(3, [(3, 1), (1, 3), (3, 1), (3, 1)]) == [(0, 1, 3, 1), (1, 0, 1, 3), (0, 0, 3, 1), (0, 2, 3, 1)]


def test_alternative_rule_reading_order():
    """3x3 with four 2x2 kernels, by hand: (0,0) [all tie: 4 uncovered, all cross the centre, first in reading order];
    (1,1) [3 uncovered]; then (0,1) and (1,0) tie on 1 uncovered tap and on the centre: top row first."""
    assert place_kernels(3, [(2, 2)] * 4) == [(0, 0, 2, 2), (1, 1, 2, 2), (0, 1, 2, 2), (1, 0, 2, 2)]


def test_center_rule_odd_and_even():
    assert place_kernels(3, [(1, 1)], require_full_coverage=False) == [(1, 1, 1, 1)]
    assert place_kernels(5, [(2, 2)], require_full_coverage=False) == [(1, 1, 2, 2)]   # covers (2,2) first
    # even sizes: the central taps are rows/cols {1, 2} of a 4x4 kernel; prefer covering more of them
    assert place_kernels(4, [(1, 1)], require_full_coverage=False) == [(1, 1, 1, 1)]
    assert place_kernels(4, [(2, 2)], require_full_coverage=False) == [(1, 1, 2, 2)]
    assert place_kernels(4, [(1, 3)], require_full_coverage=False) == [(1, 0, 1, 3)]
    assert place_kernels((3, 4), [(3, 1)], require_full_coverage=False) == [(0, 1, 3, 1)]


def test_place_kernels_stops_once_covered_and_errors():
    full = place_kernels(3, [(3, 1), (1, 3), (3, 1), (3, 1), (1, 1), (2, 2)])
    assert len(full) == 4
    with pytest.raises(ValueError, match="do not cover"):
        place_kernels(3, [(3, 1), (1, 3)])
    assert len(place_kernels(3, [(3, 1), (1, 3)], require_full_coverage=False)) == 2
    with pytest.raises(ValueError, match=r"`sizes\[1\]` = \(3, 3\) is not a legal branch size"):
        place_kernels(3, [(1, 1), (3, 3)])
    with pytest.raises(ValueError, match=r"`sizes\[0\]` = \(4, 1\)"):
        place_kernels(3, [(4, 1)])
    with pytest.raises(TypeError, match=r"`sizes`"):
        place_kernels(3, "3x1")
    with pytest.raises(ValueError, match=r"`kernel_size`"):
        place_kernels(0, [])


def test_legal_sizes():
    assert legal_sizes(3) == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (3, 1), (3, 2)]  # the paper's list
    assert len(legal_sizes(7)) == 48 and len(legal_sizes((2, 4))) == 7 and legal_sizes(1) == []


def _rules_hold(kernel_size, sizes, rects):
    """Independent check of the three rules for every placement of a sequence."""
    kh, kw = kernel_size
    central = lambda n: {n // 2} if n % 2 else {n // 2 - 1, n // 2}  # noqa: E731
    centre = {(i, j) for i in central(kh) for j in central(kw)}
    covered: set = set()
    for (h, w), rect in zip(sizes, rects):
        options = []
        for top in range(kh - h + 1):
            for left in range(kw - w + 1):
                cells = {(top + i, left + j) for i in range(h) for j in range(w)}
                options.append((-len(cells - covered), -len(cells & centre), top, left))
        best = min(options)
        assert (rect[0], rect[1]) == best[2:] and rect[2:] == (h, w), (kernel_size, sizes, rects)
        covered |= {(rect[0] + i, rect[1] + j) for i in range(h) for j in range(w)}
    assert len(covered) == kh * kw


def test_random_candidates_follow_the_rules():
    seen_types = set()
    for seed in range(150):
        ks = [(3, 3), (4, 4), (5, 5), (7, 7), (2, 2), (3, 5)][seed % 6]
        rects, sizes = random_candidate(ks, seed, return_sizes=True)
        assert rects == random_candidate(ks, seed), "same seed, same candidate"
        assert place_kernels(ks, sizes) == rects
        assert set(sizes) <= set(legal_sizes(ks)) and len(set(sizes)) <= 3
        _rules_hold(ks, sizes, rects)
        seen_types.add(len(set(sizes)))
    assert seen_types == {1, 2, 3}


def test_random_candidate_type_count_distribution():
    """t in {1, 2, 3} uniformly: on a 7x7 kernel (48 types) a candidate shows a single type about 1/3 of the time."""
    gen = torch.Generator().manual_seed(0)
    single = sum(len(set(random_candidate(7, gen, return_sizes=True)[1])) == 1 for _ in range(300))
    assert 0.22 < single / 300 < 0.45


def test_random_candidate_generator_and_errors():
    torch.manual_seed(5)
    a = random_candidate(5)
    torch.manual_seed(5)
    assert random_candidate(5) == a, "generator=None uses the global RNG"
    assert any(random_candidate(5, s) != random_candidate(5, 0) for s in range(1, 10))
    with pytest.raises(ValueError, match="1x1 `kernel_size` has no smaller kernel"):
        random_candidate(1)
    with pytest.raises(TypeError, match="`generator`"):
        random_candidate(3, "seed")


# ----------------------------------------------------------------------------------------- Eq. 1 analysis


def test_position_importance_eq1():
    w = torch.zeros(2, 3, 2, 2)
    w[0, 0] = torch.tensor([[1.0, -2.0], [0.0, 4.0]])
    w[1, 2] = torch.tensor([[-1.0, 0.0], [2.0, 4.0]])
    m = position_importance(w)
    torch.testing.assert_close(m, torch.tensor([[2.0, 2.0], [2.0, 8.0]]) / 8.0)
    conv = nn.Conv2d(3, 2, 2)
    with torch.no_grad():
        conv.weight.copy_(w)
    torch.testing.assert_close(position_importance(conv), m)
    assert torch.equal(position_importance(torch.zeros(1, 1, 3, 3)), torch.zeros(3, 3))
    assert position_std(torch.ones(3, 3)) == 0.0
    assert position_std(m) == pytest.approx(torch.tensor([0.25, 0.25, 0.25, 1.0]).std(unbiased=False).item())
    with pytest.raises(ValueError, match="`weight` must be 4-D"):
        position_importance(torch.zeros(3, 3))
    with pytest.raises(TypeError, match="`weight`"):
        position_importance(nn.ReLU())


def test_position_importance_of_blocks_and_models():
    block = randomize_bn(PBConv2d(3, 4, 3, padding=1, branches=[(0, 0, 2, 2)])).eval()
    torch.testing.assert_close(position_importance(block), position_importance(block.reparameterize().weight))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), block, nn.Conv2d(4, 4, 5), nn.Conv2d(4, 4, 1))
    layers = layer_position_importances(model)
    assert list(layers) == ["0", "2", "3"]
    only3 = layer_position_importances(model, 3)
    assert list(only3) == ["0", "2"]
    torch.testing.assert_close(model_position_importance(model, 3), (only3["0"] + only3["2"]) / 2)
    assert model_position_importance(model, 5).shape == (5, 5)
    with pytest.raises(ValueError, match="`kernel_size` 7"):
        model_position_importance(model, 7)


def test_heatmap_png(tmp_path):
    pytest.importorskip("matplotlib")
    m = position_importance(torch.randn(4, 4, 3, 3))
    path = tmp_path / "importance.png"
    fig = plot_position_importance(m, path, title="layer")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert fig.axes[0].get_title() == "layer"
    with pytest.raises(ValueError, match="`importance` must be 2-D"):
        plot_position_importance(torch.zeros(3))


# ------------------------------------------------------------------------------------------ the search


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 5, padding=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


DATA = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
LABELS = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(2))


def train_step(model, optimizer, step):
    i = torch.randint(0, 32, (8,))
    loss = F.cross_entropy(model(DATA[i]), LABELS[i])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def test_pbconv_search_per_model(capsys):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    result = pbconv_search(model, train_step, candidates=3, iters=4, seed=0, progress=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "model untouched"
    assert not result.per_layer and len(result.scores) == 3 and len(result.candidates) == 3
    assert set(result.best) == {(3, 3), (5, 5)} and result.best == result.candidates[result.best_index]
    assert result.best_index == max(range(3), key=lambda i: result.scores[i])
    for score, layers in zip(result.scores, result.layer_scores):
        assert set(layers) == {"0", "3", "6"} and score == pytest.approx(sum(layers.values()) / 3)
    assert all(len(losses) == 4 for losses in result.losses)
    # the score belongs to that candidate: retrain it by hand and recompute
    i = result.best_index
    with torch.random.fork_rng():
        torch.manual_seed(0)
        converted, _ = convert(model, "pbconv", branches=result.candidates[i])
        opt = torch.optim.SGD(converted.parameters(), lr=0.01, momentum=0.9)
        for step in range(4):
            train_step(converted, opt, step)
    stds = [position_std(position_importance(converted[j])) for j in (0, 3, 6)]
    assert result.scores[i] == pytest.approx(sum(stds) / 3, rel=1e-5)
    # reproducible
    again = pbconv_search(model, train_step, candidates=3, iters=4, seed=0, progress=False)
    assert again.candidates == result.candidates and again.scores == pytest.approx(result.scores)
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return
    assert "pbconv_search" in capsys.readouterr().err  # tqdm progress bar


def test_pbconv_search_per_layer_and_options():
    model = tiny_model()
    result = pbconv_search(model, train_step, candidates=3, iters=2, seed=1, per_layer=True, progress=False,
                           score="std_of_mean", optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
                           convert_options=dict(exclude="6"))
    assert result.per_layer and result.best_index is None and set(result.best) == {"0", "3"}
    for name, rects in result.best.items():
        k = max(range(3), key=lambda c: result.layer_scores[c][name])
        assert rects == result.candidates[k][name]
    converted, report = convert(model, "pbconv", branches=result.best, exclude="6")
    assert report.names == ["0", "3"] and converted[0].rects[1:] == result.best["0"]
    for kwargs, exc, pattern in [(dict(candidates=0), ValueError, "`candidates`"),
                                 (dict(iters=-1), ValueError, "`iters`"),
                                 (dict(score="max"), ValueError, "`score`"),
                                 (dict(convert_options=dict(branches=[])), ValueError, "`convert_options`")]:
        with pytest.raises(exc, match=pattern):
            pbconv_search(model, train_step, progress=False, **kwargs)
    with pytest.raises(TypeError, match="`train_step`"):
        pbconv_search(model, None)
    with pytest.raises(ValueError, match="no conv"):
        pbconv_search(nn.Sequential(nn.Conv2d(3, 3, 1)), train_step, candidates=1, iters=0, progress=False)


def test_search_scores_differ_between_candidates():
    """Sanity: the score is informative (candidates do not all tie)."""
    result = pbconv_search(tiny_model(), train_step, candidates=3, iters=3, seed=3, progress=False)
    assert len({round(s, 10) for s in result.scores}) > 1 and all(s > 0 for s in result.scores)
