"""The covering arrays that stand in for full parameter grids must cover every pair."""
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from all_pairs import all_pairs


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=5))
def test_every_pair_of_values_appears_and_rows_come_from_the_grid(sizes):
    factors = [[f"{i}:{v}" for v in range(n)] for i, n in enumerate(sizes)]
    rows = all_pairs(*factors)
    grid = set(itertools.product(*factors))
    assert set(rows) <= grid and len(rows) == len(set(rows))
    for i, j in itertools.combinations(range(len(factors)), 2):
        assert {(r[i], r[j]) for r in rows} == set(itertools.product(factors[i], factors[j]))
    assert len(rows) <= len(grid)


def test_the_kernel_grids_shrink():
    assert len(all_pairs([0, 1, 3], list(range(8)), [32, 24], ["1", "0"])) == 24  # of 96
    assert len(all_pairs(range(4), [0, 1], [0, 1], [0, 1])) == 8  # of 32
