"""bench/zero_shot_icons.py chooses its depth on validation as its docstring says: the highest
reranked R@1, T2I and I2T averaged, the shallower on a tie."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

from tests.helpers.paths import ROOT

BENCH = ROOT / "bench" / "zero_shot_icons.py"
spec = importlib.util.spec_from_file_location("bench_zero_shot_icons", BENCH)
zero_shot_icons = importlib.util.module_from_spec(spec)
spec.loader.exec_module(zero_shot_icons)


def validation(by_depth: dict[int, tuple[float, float]]) -> SimpleNamespace:
    keys = zero_shot_icons.KEYS  # T2I, I2T R@1
    return SimpleNamespace(
        reranked_by_depth={d: dict(zip(keys, pair, strict=True)) for d, pair in by_depth.items()}
    )


def test_the_depth_with_the_best_mean_of_t2i_and_i2t_is_chosen():
    # Step 2,000's figures (docs/icons.md): depth 20 is best on both directions together,
    # though depth 100's I2T alone is not the lowest.
    chosen = validation({10: (0.056, 0.055), 20: (0.059, 0.059), 50: (0.054, 0.057),
                         100: (0.052, 0.058)})  # fmt: skip
    assert zero_shot_icons.choose_depth(chosen) == 20
    # One direction's best is not enough: T2I peaks at 50, the two together at 10.
    assert zero_shot_icons.choose_depth(validation({10: (0.04, 0.05), 50: (0.045, 0.03)})) == 10


def test_a_tie_keeps_the_shallower_depth_whatever_the_order():
    tied = {100: (0.5, 0.5), 10: (0.75, 0.25), 20: (0.25, 0.75)}  # sums exact in binary
    assert zero_shot_icons.choose_depth(validation(tied)) == 10
