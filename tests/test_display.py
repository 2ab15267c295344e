"""Labels on annotated frames (mocha_edge/deploy/display.py): a name is never hidden by another label."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from mocha_edge.deploy.display import _overlaps, annotate, label_order, place_label


def dets(
    boxes: list[list[float]], identity: list[int], sim: list[float], scores: list[float]
) -> SimpleNamespace:
    n = len(boxes)
    return SimpleNamespace(boxes=np.array(boxes, np.float32), scores=np.array(scores, np.float32),
                           cls=np.zeros(n, np.int64), identity=np.array(identity, np.int64),
                           similarity=np.array(sim, np.float32), track_ids=np.arange(n))  # fmt: skip


def test_named_labels_are_placed_first_most_similar_first() -> None:
    d = dets([[0, 0, 9, 9]] * 4, [-1, 0, -1, 1], [np.nan, 0.6, np.nan, 0.9], [0.9, 0.5, 0.3, 0.4])
    assert label_order(d) == [3, 1, 0, 2]
    d.similarity[3] = np.nan  # a name a person gave: named, after the scored names
    assert label_order(d) == [1, 3, 0, 2]


def test_labels_of_coinciding_boxes_do_not_overlap_and_stay_in_the_frame() -> None:
    taken: list[tuple[int, int, int, int]] = []
    for _ in range(4):  # four boxes on one object (classes the NMS keeps apart)
        taken.append(place_label((100, 50, 200, 150), (60, 14), taken, (240, 320)))
    assert taken[0] == (100, 36, 160, 50)  # the first just above its box
    assert all(not _overlaps(a, b) for k, a in enumerate(taken) for b in taken[k + 1 :])
    # at the frame's top-right corner the label is moved inside the frame
    r = place_label((300, 0, 320, 30), (60, 14), [], (240, 320))
    assert r == (260, 0, 320, 14)


def test_annotate_draws_the_name_on_top() -> None:
    img = np.full((240, 320, 3), 255, np.uint8)
    # the unnamed box is more confident and listed first: before, its label was drawn over the name's
    d = dets([[100, 60, 200, 160], [101, 61, 201, 161]], [-1, 0], [np.nan, 0.8], [0.9, 0.6])
    out = annotate(img, d, ["ball"], ["rex"])
    from mocha_edge.deploy.display import _colour

    above = out[30:59, 100:200].reshape(-1, 3)  # the first label slot, just above the boxes: rex's
    assert (above == np.array(_colour("rex"), np.uint8)).all(1).sum() > 100
    assert not (above == np.array(_colour("ball"), np.uint8)).all(1).any()
    below = out[162:200, 100:200].reshape(
        -1, 3
    )  # the other label: inside its top overlaps rex's too, so below
    assert (below == np.array(_colour("ball"), np.uint8)).all(1).sum() > 100
