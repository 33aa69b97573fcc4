"""The training's contrast-pair generator, on a small gazetteer in the admin_divisions format."""
from collections import Counter

import pytest

from mgeo_service.train.contrast import KINDS, SHARES, ContrastGenerator, Gazetteer, full_width, hanzi_number

DIVISIONS = {
    "provinces.csv": "code,name\n11,北京市\n22,吉林省\n",
    "cities.csv": "code,name,provinceCode\n1101,市辖区,11\n2201,长春市,22\n",
    "areas.csv": "code,name,cityCode,provinceCode\n110105,朝阳区,1101,11\n110108,海淀区,1101,11\n"
                 "220104,朝阳区,2201,22\n220102,南关区,2201,22\n",
    "streets.csv": "code,name,areaCode,provinceCode,cityCode\n110105001,建外街道,110105,11,1101\n"
                   "220104002,桂林街道,220104,22,2201\n220102001,南岭街道,220102,22,2201\n",
}
ADDRESSES = ["北京市朝阳区建国路88号", "北京市朝阳区光华路5号", "吉林省长春市南关区人民大街1号", "朝阳区无名路1号"]


@pytest.fixture
def gazetteer(tmp_path):
    folder = tmp_path / "admin_divisions"
    folder.mkdir()
    for name, text in DIVISIONS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return Gazetteer(str(tmp_path))


def test_parse_finds_the_divisions_and_refuses_an_ambiguous_district(gazetteer):
    parsed = gazetteer.parse("北京市朝阳区建国路88号")
    assert (parsed.province.name, parsed.city, parsed.area.code, parsed.rest) == ("北京市", None, "110105", "建国路88号")
    parsed = gazetteer.parse("长春市南关区人民大街1号")
    assert (parsed.city.name, parsed.area.name) == ("长春市", "南关区")
    assert gazetteer.parse("朝阳区无名路1号") is None  # Beijing's or Changchun's: unknown
    assert gazetteer.parse("海淀区") is None  # nothing after the district


@pytest.mark.parametrize("kind, address, expected", [
    ("other_district", "北京市朝阳区建国路88号", "北京市海淀区建国路88号"),
    ("same_name_other_city", "北京市朝阳区建国路88号", "长春市朝阳区建国路88号"),  # written as the original is
    ("same_name_other_city", "长春市朝阳区人民大街1号", "北京市朝阳区人民大街1号"),
    ("same_name_other_city", "吉林省长春市朝阳区人民大街1号", "北京市朝阳区人民大街1号"),
    ("same_name_other_city", "北京朝阳区建国路88号", "长春市朝阳区建国路88号"),
    ("other_road", "北京市朝阳区建国路88号", "北京市朝阳区光华路88号"),
    ("drop_province_city", "吉林省长春市南关区人民大街1号", "南关区人民大街1号"),
    ("drop_suffixes", "吉林省长春市南关区人民大街1号", "吉林长春南关人民大街1号"),
    ("drop_street", "北京市朝阳区建外街道建国路88号", "北京市朝阳区建国路88号"),
    ("drop_street", "长春市南关区南岭街道人民大街1号", "长春市南关区人民大街1号"),
])
def test_each_change_is_the_one_its_kind_names(gazetteer, kind, address, expected):
    generator = ContrastGenerator(gazetteer, ADDRESSES, seed=1)
    assert getattr(generator, kind)(gazetteer.parse(address)) == expected


def test_number_changes_keep_or_change_the_place(gazetteer):
    generator = ContrastGenerator(gazetteer, ADDRESSES, seed=1)
    parsed = gazetteer.parse("北京市朝阳区建国路88号")
    for _ in range(20):
        other = generator.other_number(parsed)
        assert other.startswith("北京市朝阳区建国路") and other.endswith("号") and other != parsed.address
        assert generator.number_forms(parsed) in ("北京市朝阳区建国路八十八号", "北京市朝阳区建国路８８号")
    assert generator.add_detail(parsed).startswith(parsed.address)
    assert generator.add_detail(gazetteer.parse("北京市朝阳区建国路88号3栋")) is None  # has a detail already


def test_pairs_are_seeded_labelled_by_kind_and_distinct(gazetteer):
    pairs = ContrastGenerator(gazetteer, ADDRESSES, seed=3).pairs(30)
    assert pairs == ContrastGenerator(gazetteer, ADDRESSES, seed=3).pairs(30)
    assert pairs[:10] == ContrastGenerator(gazetteer, ADDRESSES, seed=3).pairs(10)  # a prefix: teacher ⊇ student
    assert all(p.label == KINDS[p.kind] for p in pairs)
    assert len({(p.address1, p.address2) for p in pairs}) == len(pairs)
    assert {p.kind for p in pairs} >= {"other_district", "other_number", "drop_suffixes", "add_detail"}


def test_each_kind_takes_its_share(gazetteer):
    roads = ["建国路", "光华路", "人民大街", "解放大路"]
    # Every kind applies to each address, drop_street to those with a street (and other_road to those without).
    towns = {"北京市朝阳区": "建外街道", "吉林省长春市朝阳区": "桂林街道"}
    addresses = [f"{place}{street}{road}{n}号" for place, town in towns.items()
                 for street in ("", town) for road in roads for n in range(1, 6)]
    pairs = ContrastGenerator(gazetteer, addresses, seed=5).pairs(10 * sum(SHARES.values()))
    counts = Counter(p.kind for p in pairs)
    assert counts == {kind: 10 * SHARES[kind] for kind in KINDS}
    assert counts["same_name_other_city"] == 2 * counts["other_district"]  # drawn twice as often
    assert counts["house_digits"] == 3 * counts["other_district"]  # and three times


@pytest.mark.parametrize("number, text", [(1, "一"), (10, "十"), (12, "十二"), (20, "二十"), (88, "八十八"),
                                          (101, "一百零一"), (110, "一百一十"), (560, "五百六十"),
                                          (2000, "二千"), (2005, "二千零五"), (1234, "一千二百三十四")])
def test_hanzi_numbers(number, text):
    assert hanzi_number(number) == text


def test_full_width_digits():
    assert full_width("A12号") == "A１２号"


def test_number_kinds_change_one_number_or_write_it_another_way(gazetteer):
    generator = ContrastGenerator(gazetteer, ADDRESSES, seed=1)
    parsed = gazetteer.parse("北京市朝阳区建国路88号")
    for _ in range(20):
        other = generator.house_digits(parsed)
        number = other.removeprefix("北京市朝阳区建国路").removesuffix("号")
        assert number != "88" and ("88" in number or number == "8"), other  # a digit added or removed
        original, changed = generator.other_floor(parsed)  # a floor added to both, another in the copy
        assert original.startswith(parsed.address) and changed.startswith(parsed.address) and original != changed
        original, changed = generator.detail_forms(parsed)
        assert original != changed and original.startswith(parsed.address)
    with_room = gazetteer.parse("北京市朝阳区建国路88号1001室")
    original, changed = generator.other_room(with_room)
    assert original == with_room.address and changed != original and changed.endswith("室")
    assert generator.detail_forms(with_room) is None  # has a detail already
    assert {KINDS[k] for k in ("other_room", "other_floor", "other_building", "other_unit")} == {1}
    assert (KINDS["house_digits"], KINDS["detail_forms"]) == (0, 2)
