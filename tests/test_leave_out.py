"""The leave-a-part-out audit of the CCKS data: which span one address adds to the other, and what it is."""
import pytest

from mgeo_service.train.leave_out import KINDS, left_out, number_change, part_kind

DIVISIONS = ("江苏省", "江苏", "南京市", "南京")


@pytest.mark.parametrize("longer, shorter, span, kind", [
    ("南京市鼓楼区中山路1号3楼", "南京市鼓楼区中山路1号", "3楼", "detail at the end"),
    ("苏州市高新区浒关镇长江路8号", "苏州市长江路8号", "高新区浒关镇", "zone or park"),
    ("江苏省南京市鼓楼区中山路1号", "鼓楼区中山路1号", "江苏省南京市", "province or city"),
    ("南京市鼓楼区湖南路街道中山路1号", "南京市鼓楼区中山路1号", "湖南路街道", "street or township"),
    ("南京市鼓楼区中山路1号", "南京市中山路1号", "鼓楼区", "district or county"),
    ("南京市鼓楼区中山路1号", "南京市鼓楼中山路1号", "区", "district or county"),
    ("南京市中山路金鹰大厦1号", "南京市中山路1号", "金鹰大厦", "other middle part"),
])
def test_the_span_left_out_and_its_kind(longer, shorter, span, kind):
    found = left_out(longer, shorter)
    assert found is not None and found[0] == span
    assert part_kind(*found, DIVISIONS) == kind and kind in KINDS


@pytest.mark.parametrize("longer, shorter", [
    ("南京市鼓楼区中山路1号", "南京市鼓楼区中山路1号"),  # nothing left out
    ("南京市鼓楼区中山路2号", "南京市中山路1号"),  # two changes, not one span
    ("南京", "南京市鼓楼区"),  # the shorter is the first
])
def test_pairs_that_are_not_one_span_apart_do_not_count(longer, shorter):
    assert left_out(longer, shorter) is None


@pytest.mark.parametrize("first, second, change", [
    ("1", "1", "same"), ("1", "11", "digits added or removed"), ("900", "90", "digits added or removed"),
    ("12", "13", "other"),
])
def test_how_one_number_differs(first, second, change):
    assert number_change(first, second) == change
