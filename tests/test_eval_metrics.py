"""Exact tests of the evaluation metrics (pointing game, difficult subset, localization)."""
import math

import numpy as np
import pytest

from onnx_excite.apps.eval import metrics as M
from onnx_excite.apps.eval.datasets import ImageRecord, Mask, Obj, decode_rle


def rec(objs, w=100, h=100):
    return ImageRecord("img", None, w, h, [Obj(n, b, d) for n, b, d in objs])


# ---------------------------------------------------------------------------
# pointing game
# ---------------------------------------------------------------------------
def test_point_box_distance_and_tolerance_edge():
    box = (100, 100, 200, 200)
    assert M.point_box_distance((150, 150), box) == 0
    assert M.point_box_distance((200, 200), box) == 0          # on the border
    assert M.point_box_distance((215, 150), box) == 15
    assert M.point_box_distance((209, 212), box) == 15         # 9-12-15 triangle off the corner
    objs = [Obj("a", box)]
    assert M.pointing_hit((215, 150), objs, 15)
    assert not M.pointing_hit((216, 150), objs, 15)
    assert M.pointing_hit((85, 150), objs, 15) and not M.pointing_hit((84, 150), objs, 15)
    assert M.pointing_hit((150, 85), objs, 15) and not M.pointing_hit((150, 84), objs, 15)
    assert M.pointing_hit((209, 212), objs, 15)
    assert not M.pointing_hit((211, 211), objs, 15)            # sqrt(242) = 15.56
    assert not M.pointing_hit((216, 150), objs, 0) and M.pointing_hit((200, 150), objs, 0)
    # any of several boxes of the class
    assert M.pointing_hit((300, 300), objs + [Obj("a", (310, 310, 320, 320))], 15)


def test_point_mask_distance_edge():
    m = np.zeros((100, 100), bool)
    m[50, 50] = True                                  # row 50, column 50
    assert M.point_mask_distance((50, 50), m) == 0
    assert M.point_mask_distance((59, 62), m) == 15   # x = column 59, y = row 62
    assert M.point_mask_distance((59, 63), m) > 15
    assert M.point_mask_distance((0, 0), np.zeros((4, 4), bool)) == math.inf

    class Fixed(Mask):
        def array(self):
            return m

    obj = Obj("a", (0, 0, 100, 100), mask=Fixed(100, 100))   # the box would contain every point
    assert M.pointing_hit((59, 62), [obj], 15)
    assert not M.pointing_hit((59, 63), [obj], 15)            # the mask decides, not the box


def test_max_point_ties_row_major_and_nan():
    m = np.zeros((4, 5), np.float32)
    m[2, 1] = m[1, 3] = 7
    assert M.max_point(m) == (3, 1)            # (x, y) of the first in row-major order
    assert M.max_point(np.zeros((3, 3))) == (0, 0)
    m = np.array([[np.nan, 1.0], [2.0, np.nan]])
    assert M.max_point(m) == (0, 1)


def test_upsample_bicubic_peak_and_shape():
    m = np.zeros((7, 7), np.float32)
    m[1, 5] = 1
    up = M.upsample(m, 70, 35)
    assert up.shape == (35, 70)
    x, y = M.max_point(up)
    assert 50 <= x < 60 and 5 <= y < 10        # inside the cell (column 5, row 1) scaled by (10, 5)
    np.testing.assert_allclose(M.upsample(np.full((3, 4), 2.0), 40, 30), 2.0, rtol=1e-6)


def test_center_point():
    assert M.center_point(640, 480) == (320, 240)
    assert M.center_point(5, 3) == (2, 1)


def test_union_area_exact():
    assert M.union_area([]) == 0
    assert M.union_area([(0, 0, 10, 10)]) == 100
    assert M.union_area([(0, 0, 10, 10), (5, 5, 15, 15)]) == 175
    assert M.union_area([(0, 0, 10, 10), (2, 2, 4, 4)]) == 100
    assert M.union_area([(0, 0, 10, 10), (20, 0, 30, 10)]) == 200
    assert M.union_area([(0, 0, 1.5, 2), (0.5, 0, 2, 2)]) == 4.0
    assert M.union_area([(0, 0, 0, 10)]) == 0


def test_difficult_subset_membership():
    # 100x100 image: a quarter is 2500 px
    assert M.is_difficult(rec([("a", (0, 0, 50, 49), 0), ("b", (60, 60, 70, 70), 0)]), "a")      # 2450 < 2500
    assert not M.is_difficult(rec([("a", (0, 0, 50, 50), 0), ("b", (60, 60, 70, 70), 0)]), "a")  # 2500: not smaller
    # two boxes of 1400 + 2200 = 3600 px with a union of 2400: the union counts
    r = rec([("a", (0, 0, 40, 35), 0), ("a", (0, 5, 40, 60), 0), ("b", (90, 90, 95, 95), 0)])
    assert M.union_area([(0, 0, 40, 35), (0, 5, 40, 60)]) == 2400
    assert M.is_difficult(r, "a")
    # no other category present
    assert not M.is_difficult(rec([("a", (0, 0, 10, 10), 0), ("a", (20, 20, 30, 30), 0)]), "a")
    # the other category has only difficult objects: not present
    assert not M.is_difficult(rec([("a", (0, 0, 10, 10), 0), ("b", (20, 20, 30, 30), 1)]), "a")
    # a large class next to a small one: only the small one is difficult
    r = rec([("a", (0, 0, 100, 60), 0), ("b", (0, 0, 10, 10), 0)])
    assert not M.is_difficult(r, "a") and M.is_difficult(r, "b")


def test_class_area_with_masks():
    m = np.zeros((10, 10), bool)
    m[0:2, 0:3] = True

    class Fixed(Mask):
        def array(self):
            return m

    objs = [Obj("a", (0, 0, 3, 2), mask=Fixed(10, 10)), Obj("a", (2, 0, 4, 2), mask=Fixed(10, 10))]
    assert M.class_area(objs, 10, 10) == 6                          # union of masks, in pixels
    assert M.class_area(objs[:1] + [Obj("a", (5, 5, 7, 6))], 10, 10) == 8


def test_iou_exact():
    assert M.iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1
    assert M.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3, abs=0)
    assert M.iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0            # touching
    assert M.iou((0, 0, 10, 10), (2, 2, 4, 4)) == 0.04
    assert M.iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0
    # the 0.5 threshold is inclusive: 2/3 of a box against it
    assert M.localization_correct((0, 0, 10, 10), [(0, 0, 10, 5)]) is True      # 50/100
    assert M.localization_correct((0, 0, 10, 10), [(0, 0, 10, 4.9)]) is False
    assert M.localization_correct(None, [(0, 0, 10, 10)]) is False


def test_tightest_and_threshold_box():
    b = np.zeros((10, 12), bool)
    assert M.tightest_box(b) is None
    b[2, 3] = b[5, 7] = True
    assert M.tightest_box(b) == (3, 2, 8, 6)
    m = np.zeros((4, 4))
    m[1, 1], m[2, 3] = 4, 2                     # mean 0.375
    assert M.threshold_box(m, 0) == (1, 1, 4, 3)
    assert M.threshold_box(m, 2 / 0.375) == (1, 1, 2, 2)   # threshold 2: strictly above keeps only the 4
    assert M.threshold_box(m, 4 / 0.375) is None
    assert M.scale_box((1, 1, 2, 2), (4, 4), (40, 20)) == (10, 5, 20, 10)


def test_localization_curve():
    m = np.zeros((224, 224))
    m[56:112, 112:224] = 1.0                    # right half of the second quarter of rows
    gt = [(320, 120, 640, 240)]                 # the same region on a 640x480 image
    curve = M.localization_curve(m, (640, 480), gt)
    assert curve.shape == M.ALPHAS.shape
    # mean = 1/8: every alpha below 8 keeps exactly the block; from 8 on nothing is above
    assert curve[M.ALPHAS < 8].all() and not curve[M.ALPHAS >= 8].any()
    # negative (bicubic overshoot) values are clipped before the mean
    m2 = m.copy()
    m2[0, 0] = -100
    assert (M.localization_curve(m2, (640, 480), gt) == curve).all()


def test_center_map_boxes_are_centered():
    c = M.center_map(224, 224)
    assert c.shape == (224, 224) and M.max_point(c) == (111, 111)
    for alpha in (0.5, 1.0, 1.5):
        box = M.threshold_box(c, alpha)
        assert box[0] == 224 - box[2] and box[1] == 224 - box[3]


def test_select_alpha_uses_held_out_only():
    n_alpha = len(M.ALPHAS)
    correct = np.zeros((10, n_alpha), bool)
    held = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], bool)
    correct[:3, 2] = True            # held-out images: alpha index 2 is best
    correct[3:, 5] = True            # the others: index 5 would be best
    correct[3:5, 2] = True
    out = M.select_alpha(correct, held)
    assert out["index"] == 2 and out["alpha"] == 1.0
    assert out["held_out_error"] == 0.0
    assert out["error"] == pytest.approx(5 / 7)         # test rows at index 2: 2 of 7 correct
    assert out["n_held_out"] == 3 and out["n_test"] == 7
    # whatever the test rows say, the choice does not move
    flipped = correct.copy()
    flipped[3:] = ~flipped[3:]
    assert M.select_alpha(flipped, held)["index"] == 2
    # ties on the held-out split go to the smallest alpha
    tie = np.zeros((4, n_alpha), bool)
    tie[:2, 3] = tie[:2, 7] = True
    assert M.select_alpha(tie, np.array([1, 1, 0, 0], bool))["index"] == 3


def test_held_out_ids_seeded_and_order_free():
    ids = [f"im{i:03d}" for i in range(50)]
    a = M.held_out_ids(ids, 0.2, seed=0)
    assert len(a) == 10 and a <= set(ids)
    assert a == M.held_out_ids(list(reversed(ids)), 0.2, seed=0)
    assert a != M.held_out_ids(ids, 0.2, seed=1)
    assert len(M.held_out_ids(ids[:2], 0.2)) == 1          # at least one, and one left to test
    assert M.held_out_ids(ids, 0) == set()


def test_localization_summary_per_class():
    n = len(M.ALPHAS)
    items = [{"image": f"i{k}", "class": "a" if k % 2 else "b", "held_out": k < 2,
              "correct": {"m": [k % 3 == 0] * n}} for k in range(8)]
    s = M.localization_summary(items, "m")
    assert s["alpha"] == 0.0 and s["n_held_out"] == 2 and s["n_test"] == 6
    # test items k = 2..7: correct where k % 3 == 0 -> k = 3, 6
    assert s["error"] == pytest.approx(4 / 6)
    assert s["per_class"]["a"] == {"correct": 1, "wrong": 2, "error": 2 / 3}
    assert s["per_class"]["b"] == {"correct": 1, "wrong": 2, "error": 2 / 3}


def test_dominant_class_by_union_area():
    r = rec([("a", (0, 0, 10, 10), 0), ("a", (0, 0, 10, 10), 0), ("b", (0, 0, 11, 10), 0), ("c", (0, 0, 50, 50), 1)])
    assert M.dominant_class(r) == "b"           # a's two boxes coincide: union 100 < 110; c is difficult only
    assert M.dominant_class(r, among={"a"}) == "a"
    assert M.dominant_class(rec([("b", (0, 0, 10, 10), 0), ("a", (5, 5, 15, 15), 0)])) == "a"   # tie: by name
    assert M.dominant_class(rec([])) is None


def test_pointing_summary_means_over_classes():
    items = [{"image": "1", "class": "a", "difficult": False, "hits": {"m": True}},
             {"image": "2", "class": "a", "difficult": True, "hits": {"m": False}},
             {"image": "3", "class": "a", "difficult": True, "hits": {"m": True}},
             {"image": "1", "class": "b", "difficult": False, "hits": {"m": False}}]
    s = M.pointing_summary(items, "m")
    assert s["per_class"]["a"]["accuracy"] == pytest.approx(2 / 3)
    assert s["per_class"]["a"]["difficult_accuracy"] == 0.5
    assert s["per_class"]["b"]["accuracy"] == 0 and s["per_class"]["b"]["difficult_accuracy"] is None
    assert s["mean_accuracy"] == pytest.approx((2 / 3 + 0) / 2)
    assert s["mean_accuracy_difficult"] == 0.5 and s["n_classes_difficult"] == 1
    assert (s["hits"], s["misses"]) == (2, 2)


def _rle_to_string(cnts):
    """pycocotools' rleToString, transcribed, to test the decoder against."""
    out = []
    for i, x in enumerate(cnts):
        if i > 2:
            x -= cnts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_rle_decoding_list_and_string():
    rng = np.random.default_rng(3)
    m = rng.random((13, 17)) > 0.6
    flat = m.T.reshape(-1)                      # column-major
    counts, val, run = [], False, 0
    for v in flat:
        if v == val:
            run += 1
        else:
            counts.append(run)
            val, run = v, 1
    counts.append(run)
    assert (decode_rle({"size": [13, 17], "counts": counts}, 17, 13) == m).all()
    s = _rle_to_string(counts)
    assert (decode_rle({"size": [13, 17], "counts": s}, 17, 13) == m).all()
