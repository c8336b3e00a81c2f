"""Row-major flat ranges as boxes (maskdsl.analysis.boxes): exact cover, disjoint, at most 2*rank - 1 boxes."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from maskdsl.analysis.boxes import flat_range_boxes, row_major_tiles


@st.composite
def ranges(draw):
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
    total = math.prod(shape)
    a = draw(st.integers(0, total))
    return shape, a, draw(st.integers(a, total))


def covered(shape, boxes):
    """Row-major flat index of every token inside the boxes, with repeats (a token in two boxes shows twice)."""
    flat = []
    for box in boxes:
        for coord in np.ndindex(*[stop - start for start, stop in box]):
            flat.append(int(np.ravel_multi_index([c + start for c, (start, _) in zip(coord, box)], shape)))
    return flat


@settings(max_examples=300, deadline=None)
@given(ranges())
def test_flat_range_is_an_exact_disjoint_cover(case):
    shape, a, b = case
    boxes = flat_range_boxes(shape, a, b)
    assert sorted(covered(shape, boxes)) == list(range(a, b))
    assert len(boxes) <= max(0, 2 * len(shape) - 1)


def test_row_major_tiles_group_boxes_by_tile():
    shape, volume = (3, 4, 5), 7
    boxes, starts = row_major_tiles(shape, volume)
    assert len(starts) == math.ceil(60 / volume) + 1 and starts[-1] == len(boxes)
    for t in range(len(starts) - 1):
        tokens = covered(shape, [tuple(map(tuple, b)) for b in boxes[starts[t]:starts[t + 1]]])
        assert sorted(tokens) == list(range(t * volume, min((t + 1) * volume, 60)))
