"""Tracks and one identity per track (mocha_edge/deploy/tracking.py): the rule, the events, the tracker."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mocha_edge.deploy.tracking import IdentityRule, Tracker, TrackIdentities, TrackingError, track_frame

IMG = np.zeros((240, 320, 3), np.uint8)


def dets(boxes: list[list[float]], scores: list[float] | None = None, cls: list[int] | None = None,
         dim: int = 4) -> SimpleNamespace:  # fmt: skip
    n = len(boxes)
    return SimpleNamespace(
        boxes=np.array(boxes, np.float32).reshape(n, 4),
        scores=np.array(scores or [0.9] * n, np.float32),
        cls=np.array(cls or [0] * n, np.int64),
        vectors=np.ones((n, dim), np.float32),
        identity=np.full(n, -1, np.int64),
        similarity=np.full(n, np.nan, np.float32),
    )


class Script:
    """A matcher that answers from a script: frame -> identity per call (the same for every vector)."""

    def __init__(self, decisions: list[int], sim: float = 0.9) -> None:
        self.decisions, self.sim, self.i = decisions, sim, 0

    def __call__(self, vectors: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = self.decisions[min(self.i, len(self.decisions) - 1)]
        self.i += 1
        return np.full(len(cls), d, np.int64), np.full(len(cls), self.sim, np.float32)


def run(decisions: list[int], rule: IdentityRule, ids: list[int] | None = None) -> tuple[list[int], list]:
    ti = TrackIdentities("cam", ["mug"], rule)
    ti.set_identities(["rex", "tom"])
    match = Script(decisions)
    shown, events = [], []
    for f in range(len(decisions)):
        ident, _, ev = ti.update(f / 15, f, dets([[50, 50, 100, 100]]), np.array(ids or [1]), IMG, match)
        shown.append(int(ident[0]))
        events += [(f, e.kind, e.identity) for e in ev]
    return shown, events


def test_commit_after_consistent_evidence_and_flicker_is_ignored() -> None:
    rule = IdentityRule(window=5, commit=3, switch=4, leave_after=1.0)
    shown, events = run([0, 0, 0, -1, 1, 0, 0, -1, 0], rule)
    assert shown == [-1, -1, 0, 0, 0, 0, 0, 0, 0]  # one-frame dips never change a committed identity
    assert events == [(0, "enter", None), (2, "identified", "rex")]


def test_switch_only_on_sustained_contrary_evidence() -> None:
    rule = IdentityRule(window=5, commit=2, switch=3, leave_after=1.0)
    shown, events = run([0, 0, 1, 1, 1, 1, -1, -1, -1], rule)
    assert shown == [-1, 0, 0, 0, 1, 1, 1, 1, -1]
    assert [e[1:] for e in events] == [("enter", None), ("identified", "rex"), ("changed", "tom"),
                                       ("changed", None)]  # fmt: skip


def test_one_identity_per_camera_the_more_similar_track_keeps_it() -> None:
    ti = TrackIdentities("cam", ["mug"], IdentityRule(window=3, commit=1, switch=2, leave_after=1.0))
    ti.set_identities(["rex"])
    sims = iter([np.array([0.8, 0.7]), np.array([0.8, 0.95])])

    def match(v: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(len(c), np.int64), next(sims).astype(np.float32)

    d = dets([[10, 10, 50, 50], [150, 10, 200, 50]])
    ident, _, ev = ti.update(0.0, 0, d, np.array([1, 2]), IMG, match)
    assert ident.tolist() == [0, -1] and [e.kind for e in ev].count("identified") == 1
    ident, _, ev = ti.update(
        0.1, 1, d, np.array([1, 2]), IMG, match
    )  # track 2 now more similar: it takes rex
    assert ident.tolist() == [-1, 0]
    assert [(e.kind, e.track_id, e.identity, e.previous) for e in ev] == [
        ("changed", 1, None, "rex"), ("identified", 2, "rex", None)]  # fmt: skip


def test_a_reacquired_track_continues_the_presence_silently_and_leave_comes_once() -> None:
    rule = IdentityRule(window=3, commit=2, switch=3, leave_after=1.0)
    ti = TrackIdentities("cam", ["mug"], rule)
    ti.set_identities(["rex"])
    match = Script([0] * 100)
    kinds = []
    for f, tid in enumerate([1, 1, 1, None, None, 2, 2, 2]):  # track 1 lost behind an occluder, found as 2
        d = dets([[50, 50, 100, 100]] if tid else [])
        _, _, ev = ti.update(f * 0.1, f, d, np.array([tid] if tid else [], np.int64), IMG, match)
        kinds += [(e.kind, e.track_id, e.identity) for e in ev]
    assert kinds == [("enter", 1, None), ("identified", 1, "rex"), ("enter", 2, None)]  # no 2nd identified
    _, _, ev = ti.update(5.0, 50, dets([]), np.array([], np.int64), IMG, match)  # both gone for > leave_after
    assert sorted((e.kind, e.track_id, e.identity) for e in ev) == [("leave", 1, None), ("leave", 2, "rex")]


def test_leave_after_the_configured_time_and_close() -> None:
    ti = TrackIdentities("cam", ["mug"], IdentityRule(leave_after=0.5))
    match = Script([-1])
    ti.update(0.0, 0, dets([[1, 1, 5, 5]]), np.array([7]), IMG, match)
    assert ti.update(0.4, 1, dets([]), np.array([], np.int64), IMG, match)[2] == []
    (ev,) = ti.update(0.6, 2, dets([]), np.array([], np.int64), IMG, match)[2]
    assert (ev.kind, ev.track_id, ev.record()["duration"]) == ("leave", 7, 0.0)
    ti.update(1.0, 3, dets([[1, 1, 5, 5]]), np.array([8]), IMG, match)
    assert [e.kind for e in ti.close(1.1, 4)] == ["leave"]


def test_low_confidence_frames_do_not_vote_and_best_shot_avoids_the_edge() -> None:
    ti = TrackIdentities("cam", ["mug"], IdentityRule(window=3, commit=1), name_conf=0.5)
    ti.set_identities(["rex"])
    match = Script([0])
    img = np.arange(240 * 320 * 3, dtype=np.uint8).reshape(240, 320, 3)
    ident, _, _ = ti.update(0, 0, dets([[0, 10, 40, 50]], [0.3]), np.array([1]), img, match)
    assert ident[0] == -1 and match.i == 0  # no evidence yet: the matcher was not even asked
    ti.update(0.1, 1, dets([[0, 10, 40, 50]], [0.95]), np.array([1]), img, match)  # cut by the edge: 0.475
    ti.update(0.2, 2, dets([[60, 10, 100, 50]], [0.6]), np.array([1]), img, match)  # whole: 0.6
    shot = ti.tracks[1].best_shot
    assert shot is not None and shot.shape == (40, 40, 3) and np.array_equal(shot, img[10:50, 60:100])


def test_bank_changes_remap_identities_by_name() -> None:
    ti = TrackIdentities("cam", ["mug"], IdentityRule(window=3, commit=1))
    ti.set_identities(["rex", "tom"])
    ti.update(0, 0, dets([[1, 1, 9, 9]]), np.array([1]), IMG, Script([1]))
    assert ti.tracks[1].identity == 1
    ti.set_identities(["ann", "tom", "rex"])
    assert ti.tracks[1].identity == 1 and ti.identity_names[1] == "tom"
    ti.set_identities(["ann"])  # tom removed from the bank
    assert ti.tracks[1].identity == -1 and ti.presence == {}


def test_bytetrack_keeps_ids_on_moving_boxes_and_track_frame_shows_the_track_identity() -> None:
    tr = Tracker("bytetrack", fps=15)
    ti = TrackIdentities("cam", ["mug", "toy"], IdentityRule(window=5, commit=2))
    pipe = SimpleNamespace(identity_names=["rex"],
                           match_vectors=lambda v, c: (np.where(c == 0, 0, -1), np.full(len(c), 0.9, np.float32)),
                           identity_similarity=lambda v, i: (np.full(len(i), 0.9, np.float32),
                                                             np.full(len(i), 0.5, np.float32)))  # fmt: skip
    seen = []
    for f in range(12):
        x = 10 + 4 * f
        d = dets([[x, 20, x + 50, 80], [200, 100 + f, 260, 180 + f]], [0.9, 0.7], [0, 1])
        shown, _ = track_frame(tr, ti, pipe, SimpleNamespace(t=f / 15, index=f, image_bgr=IMG), d)
        seen.append(shown.track_ids.tolist())
        assert shown.frame_identity is d.identity
    assert all(s == seen[0] for s in seen) and len(set(seen[0])) == 2 and min(seen[0]) >= 0
    assert shown.identity.tolist() == [0, -1] and np.isnan(shown.similarity[1])


def test_botsort_runs_and_unknown_tracker_is_refused() -> None:
    tr = Tracker("botsort", fps=10)
    d = dets([[10, 10, 60, 60]])
    tr.update(d, IMG)
    assert tr.update(d, IMG).tolist()[0] >= 0
    with pytest.raises(TrackingError, match="unknown tracker 'sort'"):
        Tracker("sort")


def test_cli_choices_are_the_trackers() -> None:
    from mocha_edge.deploy.live import TRACKER_CHOICES
    from mocha_edge.deploy.tracking import TRACKERS

    assert TRACKER_CHOICES == TRACKERS


def test_a_person_assigns_and_refuses_identities_of_a_track() -> None:
    """The web page: an enrolment from a box pins the name on its track (even one whose detections are
    below the naming confidence, and against a more similar track); "not NAME" takes it off at once, and the
    matcher never gives it back to that track."""
    ti = TrackIdentities(
        "cam", ["mug"], IdentityRule(window=3, commit=1, switch=2, leave_after=1.0), name_conf=0.5
    )
    ti.set_identities(["rex"])

    def match(v: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(len(c), np.int64), np.full(len(c), 0.9, np.float32)  # every vote says rex

    d = dets([[10, 10, 50, 50], [150, 10, 200, 50]], scores=[0.3, 0.9])  # track 1 never votes
    ident, _, ev = ti.update(0.0, 0, d, np.array([1, 2]), IMG, match)
    assert ident.tolist() == [-1, 0]  # track 2 named by the matcher
    assert ti.assign(1, "rex") and not ti.assign(99, "rex")
    ident, _, ev = ti.update(0.1, 1, d, np.array([1, 2]), IMG, match)
    assert ident.tolist() == [0, -1]  # the person's word beats the matcher's more similar track
    assert [(e.kind, e.track_id, e.identity) for e in ev] == [("changed", 2, None), ("identified", 1, "rex")]
    assert ti.refuse(1, "rex")
    ident, _, ev = ti.update(0.2, 2, d, np.array([1, 2]), IMG, match)
    assert ident[0] == -1 and ("changed", 1, None) in [(e.kind, e.track_id, e.identity) for e in ev]
    for f in range(3, 10):  # the matcher says rex for track 1 too (now it votes): it never takes it again
        ident, _, _ = ti.update(f / 10, f, dets([[10, 10, 50, 50]], scores=[0.9]), np.array([1]), IMG, match)
        assert ident[0] == -1


def test_a_name_given_by_a_person_follows_the_object_to_its_next_track() -> None:
    """ByteTrack loses the named object and finds it again as a new track at the same place: the pin moves
    there (not to a new track elsewhere, nor of another class)."""
    ti = TrackIdentities("cam", ["mug", "toy"], IdentityRule(window=3, commit=1, switch=2, leave_after=1.0))
    ti.set_identities(["rex"])

    def match(v: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.full(len(c), -1, np.int64), np.full(len(c), 0.1, np.float32)  # the matcher names nobody

    ti.update(0.0, 0, dets([[10, 10, 50, 50]]), np.array([1]), IMG, match)
    ti.assign(1, "rex")
    ident, _, _ = ti.update(0.1, 1, dets([[10, 10, 50, 50]]), np.array([1]), IMG, match)
    assert ident.tolist() == [0]
    # track 1 lost; new tracks: 2 far away, 3 of another class on the spot, 4 on the spot
    d = dets([[150, 10, 190, 50], [12, 12, 52, 52], [11, 11, 51, 51]], cls=[0, 1, 0])
    ident, _, _ = ti.update(0.2, 2, d, np.array([2, 3, 4]), IMG, match)
    assert ident.tolist() == [-1, -1, 0]
    assert ti.tracks[4].pinned == "rex" and ti.tracks[1].pinned is None
    # ByteTrack finds track 1 again beside its duplicate 4: the name goes back to the track the person named
    d = dets([[10, 10, 50, 50], [11, 11, 51, 51]])
    ident, _, ev = ti.update(0.3, 3, d, np.array([1, 4]), IMG, match)
    assert ident.tolist() == [0, -1]
    assert ti.tracks[1].pinned == "rex" and ti.tracks[4].pinned is None
    assert [(e.kind, e.track_id) for e in ev] == [("changed", 4), ("identified", 1)]
    ident, _, _ = ti.update(0.4, 4, d, np.array([1, 4]), IMG, match)
    assert ident.tolist() == [0, -1]


def test_not_name_on_a_track_whose_name_went_to_its_duplicate() -> None:
    """The page showed track 1 named (a view a frame old) while its name had gone to duplicate 4: "not rex"
    on 1 takes rex off both, 1 does not take it back when the tracker finds it again, and a track that
    refused rex does not inherit it from another named track lost at its spot (the browser test's failure)."""
    ti = TrackIdentities("cam", ["mug"], IdentityRule(window=3, commit=1, switch=2, leave_after=1.0))
    ti.set_identities(["rex"])

    def match(v: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.full(len(c), -1, np.int64), np.full(len(c), 0.1, np.float32)  # the matcher names nobody

    spot, dup = [10, 10, 50, 50], [11, 11, 51, 51]
    ti.update(0.0, 0, dets([spot]), np.array([1]), IMG, match)
    ti.assign(1, "rex")
    ti.update(0.1, 1, dets([spot]), np.array([1]), IMG, match)
    ident, _, _ = ti.update(0.2, 2, dets([dup]), np.array([4]), IMG, match)  # 1 lost: 4 carries the name
    assert ident.tolist() == [0] and ti.tracks[4].pinned == "rex"
    assert ti.refuse(1, "rex")
    ident, _, ev = ti.update(0.3, 3, dets([spot, dup]), np.array([1, 4]), IMG, match)
    assert ident.tolist() == [-1, -1]
    assert [(e.kind, e.track_id, e.previous) for e in ev] == [("changed", 4, "rex")]
    assert ti.tracks[1].pinned is None and ti.tracks[4].pinned is None
    # a person names the duplicate 4 rex; 4 is lost and 1 (which refused rex) is where it was: no name
    ti.assign(4, "rex")
    ident, _, _ = ti.update(0.4, 4, dets([spot, dup]), np.array([1, 4]), IMG, match)
    assert ident.tolist() == [-1, 0]
    ident, _, _ = ti.update(0.5, 5, dets([spot]), np.array([1]), IMG, match)
    assert ident.tolist() == [-1] and ti.tracks[4].pinned == "rex"


def by_class(ident_of: dict[int, int], sim: float = 0.9):
    """A conditional matcher: identity ``ident_of[class]`` (else -1) for every vector matched in that class;
    records the classes it was asked about."""
    asked: list[list[int]] = []

    def match(vectors: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        asked.append(sorted(set(np.asarray(cls).tolist())))
        return np.array([ident_of.get(int(c), -1) for c in cls], np.int64), np.full(len(cls), sim, np.float32)

    match.asked = asked  # type: ignore[attr-defined]
    return match


def test_a_track_is_matched_in_its_detections_class_not_its_first_boxs() -> None:
    """An object entering the view is classed 'toy' once, then 'mug': once most of its window says mug it is
    matched among mugs and named, and its events say mug."""
    ti = TrackIdentities("cam", ["mug", "toy"], IdentityRule(window=10, commit=1))
    ti.set_identities(["rex"])
    match = by_class({0: 0})
    shown, evs = [], []
    for f in range(6):
        ident, _, ev = ti.update(f / 15, f, dets([[50, 50, 100, 100]], cls=[1 if f == 0 else 0]), np.array([1]),
                                 IMG, match)  # fmt: skip
        shown.append(int(ident[0]))
        evs += ev
    # frame 1 is a tie (one toy, one mug): the track keeps its class; frame 2 has two mugs to one toy
    assert match.asked[:3] == [[1], [1], [0]]
    assert shown == [-1, -1, 0, 0, 0, 0]
    (named,) = [e for e in evs if e.kind == "identified"]
    assert named.identity == "rex" and named.cls == "mug" and named.frame == 2


def test_a_named_object_the_detector_reclasses_keeps_its_name() -> None:
    """Once named as a mug, a track whose detections turn 'toy' is still matched among mugs."""
    ti = TrackIdentities("cam", ["mug", "toy"], IdentityRule(window=4, commit=1, switch=3))
    ti.set_identities(["rex"])
    match = by_class({0: 0})
    check = lambda v, i: (np.full(len(i), 0.8, np.float32), np.full(len(i), 0.7, np.float32))  # noqa: E731
    shown = []
    for f in range(10):
        ident, _, _ = ti.update(f / 15, f, dets([[50, 50, 100, 100]], cls=[0 if f < 2 else 1]), np.array([1]),
                                IMG, match, check)  # fmt: skip
        shown.append(int(ident[0]))
    assert shown == [0] * 10
    # matched among mugs (the identity's class), though all 4 votes in the window are toys
    assert match.asked[-1] == [0] and ti.tracks[1].cls == 0


def test_a_track_carried_onto_another_object_drops_its_name() -> None:
    """ByteTrack's track 1 moves from the mug 'rex' onto a toy: the toy's detections are far below rex's
    threshold, so they are shown unnamed at once and the track lets rex go after ``break_after`` of them
    (its evidence restarts); a detection of another class that is still close to rex keeps the name."""
    rule = IdentityRule(window=30, commit=1, switch=10, break_margin=0.15, break_after=3)
    ti = TrackIdentities("cam", ["mug", "toy"], rule)
    ti.set_identities(["rex"])
    match = by_class({0: 0})
    sims = {0: 0.8, 1: 0.4}  # the vector's first value says which object it is
    check = lambda v, i: (np.array([sims[int(x[0])] for x in v], np.float32),  # noqa: E731
                          np.full(len(i), 0.7, np.float32))  # fmt: skip
    shown, evs = [], []
    plan = [(0, 0)] * 5 + [(1, 0)] + [(0, 0)] + [(1, 1)] * 5  # (class, object)
    for f, (c, obj) in enumerate(plan):
        d = dets([[50, 50, 100, 100]], cls=[c])
        d.vectors[:, 0] = obj
        d.vectors[:, 1] = 1.0
        ident, _, ev = ti.update(f / 15, f, d, np.array([1]), IMG, match, check)
        shown.append(int(ident[0]))
        evs += [(f, e.kind, e.identity, e.previous) for e in ev]
    # frame 5: the mug classed 'toy' but close to rex keeps the name; frames 7-8 hidden, 9 lets rex go
    assert shown == [0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1]
    assert evs[-1] == (9, "changed", None, "rex")
    tr = ti.tracks[1]
    assert tr.identity == -1 and tr.cls == 1 and len(tr.vectors) == 2  # restarted: frames 10, 11 only
    assert 0 not in ti.presence
    # without the check (no pipeline to ask), the old window keeps the name
    ti2 = TrackIdentities("cam", ["mug", "toy"], rule)
    ti2.set_identities(["rex"])
    for f, (c, obj) in enumerate(plan):
        d = dets([[50, 50, 100, 100]], cls=[c])
        d.vectors[:, 0] = obj
        last = int(ti2.update(f / 15, f, d, np.array([1]), IMG, by_class({0: 0}))[0][0])
    assert last == 0
