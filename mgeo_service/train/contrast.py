"""Contrast pairs: one real address against a copy with one change whose label is known.

The model must learn that a place is its administrative divisions, road and number,
not its characters: two districts of one city are two places however many characters
they share, and 北京市海淀区 is 北京海淀. Each kind changes one thing:

not_match     other_district (a sibling district of the same city), same_name_other_city
              (北京市朝阳区 / 长春市朝阳区, written in the original's form: city only, province
              only or both), other_number (another house number), other_road (another road of
              the same district, taken from another real address)
exact_match   drop_province_city, drop_suffixes (省/市/区/县 dropped), drop_street (the street or
              township after the district left out: CCKS labels 7 of its 8 such pairs exact, see
              ``leave_out.py``), number_forms (1号 / 一号, full-width digits), spacing (spaces and
              punctuation)
partial_match add_detail: a building, floor, room or shop added (CCKS labels such pairs
              partial: of its pairs where one address extends the other, 276 are partial,
              161 not_match, 72 exact)

The numbers inside an address (``leave_out.py``'s second table: CCKS pairs that share a
road and differ in one numbered part):

not_match     house_digits (a digit added or removed: 1号 / 11号, 90号 / 900号; CCKS splits its
              21 such pairs 9 not_match, 9 partial, 3 exact, so other_number's label decides:
              the two numbers are two houses)
partial_match other_room, other_floor, other_building, other_unit (the same building or
              compound, another part of it: CCKS labels another building on the same road
              partial in 24 of 27 pairs, another floor 8 of 10), made on a detail the address
              has or, without one, on a detail added to both
exact_match   detail_forms: the same detail written another way (5楼 / 5层 / 5F / 五楼, 3号楼 /
              3栋, full-width digits)

same_name_other_city is drawn twice as often as the others (``SHARES``): only about one
address in six has a district whose name another city shares, and it is the change a
character-overlap model misses most. house_digits three times: at one share the student
still called a digit added to a house number the same place in a third of the pairs, and a
triple share lifted it (0.66 to 0.77) and the CCKS figures with it (MODEL_CARD.md).

Addresses are parsed against ``admin_divisions/`` (the 2023 divisions of China).
"""
from __future__ import annotations

import csv
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass

from ..dataset import LabelledPair

NOT_MATCH, PARTIAL_MATCH, EXACT_MATCH = 0, 1, 2
KINDS = {
    "other_district": NOT_MATCH, "same_name_other_city": NOT_MATCH, "other_number": NOT_MATCH,
    "other_road": NOT_MATCH, "drop_province_city": EXACT_MATCH, "drop_suffixes": EXACT_MATCH,
    "drop_street": EXACT_MATCH, "number_forms": EXACT_MATCH, "spacing": EXACT_MATCH, "add_detail": PARTIAL_MATCH,
    "house_digits": NOT_MATCH, "other_room": PARTIAL_MATCH, "other_floor": PARTIAL_MATCH,
    "other_building": PARTIAL_MATCH, "other_unit": PARTIAL_MATCH, "detail_forms": EXACT_MATCH,
}
SHARES = {**{kind: 1 for kind in KINDS}, "same_name_other_city": 2, "house_digits": 3}
# The province-level cities: their districts sit under the province's own name (北京市朝阳区).
_MUNICIPALITIES = ("11", "12", "31", "50")
_PROVINCE_SUFFIXES = ("维吾尔自治区", "壮族自治区", "回族自治区", "特别行政区", "自治区", "省", "市")
_AREA_SUFFIXES = ("区", "县", "市")
_NUMBER = re.compile(r"(?<![\d-])(\d{1,4})号")
_ROAD = re.compile(r"[\u4e00-\u9fff]{2,6}?(?:大道|大街|路|街)")
_DETAIL = re.compile(r"[室层楼栋座铺]|单元")
# A numbered part of a building: (pattern of the number and its unit, how to write a made-up one).
_PARTS = {
    "room": (re.compile(r"(?<!\d)(\d{3,4})(室|房)"), lambda n: f"{n}室"),
    "floor": (re.compile(r"(?<!\d)(\d{1,2})(楼|层|F)(?!\d)"), lambda n: f"{n}楼"),
    "building": (re.compile(r"(?<!\d)(\d{1,2})(号楼|栋|幢)"), lambda n: f"{n}栋"),
    "unit": (re.compile(r"(?<!\d)(\d{1,2})(单元)"), lambda n: f"{n}单元"),
}
_DIGITS = "零一二三四五六七八九"


@dataclass(frozen=True)
class Division:
    code: str
    name: str
    short: str
    parent: str  # city code for an area, province code for a city


@dataclass
class Parsed:
    """The divisions an address starts with, and where each sits: [start, end) spans."""
    address: str
    province: Division | None
    city: Division | None
    area: Division
    province_span: tuple[int, int] | None
    city_span: tuple[int, int] | None
    area_span: tuple[int, int]

    @property
    def rest(self) -> str:
        return self.address[self.area_span[1]:]


def _short(name: str, suffixes: tuple[str, ...]) -> str:
    for suffix in suffixes:
        if name.endswith(suffix) and len(name) - len(suffix) >= 2:
            return name[:-len(suffix)]
    return name


class Gazetteer:
    """Provinces, cities, districts and their streets by name, from ``admin_divisions/``."""

    def __init__(self, data_dir: str):
        folder = os.path.join(data_dir, "admin_divisions")
        rows = {}
        for file in ("provinces", "cities", "areas", "streets"):
            with open(os.path.join(folder, f"{file}.csv"), encoding="utf-8") as f:
                rows[file] = list(csv.DictReader(f))
        self.provinces = {r["code"]: Division(r["code"], r["name"], _short(r["name"], _PROVINCE_SUFFIXES), "")
                          for r in rows["provinces"]}
        # 市辖区 and 县 stand for a municipality's own districts: the province names the city.
        self.cities = {r["code"]: Division(r["code"], r["name"], _short(r["name"], ("市", "地区", "盟")),
                                           r["provinceCode"])
                       for r in rows["cities"] if r["name"] not in ("市辖区", "县", "省直辖县级行政区划")}
        self.areas = [Division(r["code"], r["name"], _short(r["name"], _AREA_SUFFIXES), r["cityCode"])
                      for r in rows["areas"] if r["name"] != "市辖区"]
        self.areas_by_name = defaultdict(list)
        self.areas_by_city = defaultdict(list)
        for area in self.areas:
            self.areas_by_name[area.name].append(area)
            self.areas_by_city[area.parent].append(area)
        # Longest first, so that a street's name is matched whole.
        self.streets_by_area = defaultdict(list)
        for r in sorted(rows["streets"], key=lambda r: -len(r["name"])):
            self.streets_by_area[r["areaCode"]].append(r["name"])

    def province_of(self, area: Division) -> Division:
        return self.provinces[area.code[:2]]

    def city_of(self, area: Division) -> Division | None:
        return self.cities.get(area.parent)

    def parse(self, address: str) -> Parsed | None:
        """The province, city and district an address starts with; None without a district."""
        pos = 0
        province = city = None
        province_span = city_span = None
        for candidate in self.provinces.values():
            for name in (candidate.name, candidate.short):
                if address.startswith(name):
                    province, province_span, pos = candidate, (0, len(name)), len(name)
                    break
            if province:
                break
        for candidate in self.cities.values():
            if province and candidate.parent != province.code:
                continue
            if address.startswith(candidate.name, pos):
                city, city_span, pos = candidate, (pos, pos + len(candidate.name)), pos + len(candidate.name)
                break
        for area in sorted(self.areas_by_name.get(_longest_area_name(self, address, pos), []),
                           key=lambda a: a.code):
            if city and area.parent != city.code:
                continue
            if province and area.code[:2] != province.code:
                continue
            if not city and not province and len(self.areas_by_name[area.name]) > 1:
                return None  # 朝阳区 alone: which city is meant is unknown
            end = pos + len(area.name)
            if end >= len(address):
                return None
            return Parsed(address, province, city, area, province_span, city_span, (pos, end))
        return None


def _longest_area_name(gazetteer: Gazetteer, address: str, pos: int) -> str:
    for length in range(8, 1, -1):
        if address[pos:pos + length] in gazetteer.areas_by_name:
            return address[pos:pos + length]
    return ""


def _divisions_text(province: Division | None, city: Division | None, area: Division, short: bool = False) -> str:
    return "".join(d.short if short else d.name for d in (province, city, area) if d)


def hanzi_number(n: int) -> str:
    """12 -> 十二, 101 -> 一百零一, 2000 -> 二千 (house-number style)."""
    if n < 10:
        return _DIGITS[n]
    if n < 20:
        return "十" + (_DIGITS[n % 10] if n % 10 else "")
    if n < 100:
        return _DIGITS[n // 10] + "十" + (_DIGITS[n % 10] if n % 10 else "")
    if n < 1000:
        rest = n % 100
        tail = "" if not rest else ("零" + _DIGITS[rest] if rest < 10 else
                                    ("一" + hanzi_number(rest) if rest < 20 else hanzi_number(rest)))
        return _DIGITS[n // 100] + "百" + tail
    rest = n % 1000
    return _DIGITS[n // 1000] + "千" + ("" if not rest else ("零" if rest < 100 else "") + hanzi_number(rest))


def full_width(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "0" <= c <= "9" else c for c in text)


class ContrastGenerator:
    """Makes (original, changed, label, kind) from real addresses, seeded."""

    def __init__(self, gazetteer: Gazetteer, addresses: list[str], seed: int):
        self.gazetteer = gazetteer
        self.rng = random.Random(seed)
        self.parsed = [p for p in map(gazetteer.parse, addresses) if p]
        self.roads_by_area = defaultdict(set)
        for p in self.parsed:
            road = _ROAD.match(p.rest)
            if road:
                self.roads_by_area[p.area.code].add(road.group())

    def pairs(self, count: int) -> list[LabelledPair]:
        """``count`` pairs, the kinds in turn by their ``SHARES``; a smaller count gives a prefix of a larger one.

        Each kind walks the addresses in its own shuffled order and skips those it does not
        apply to; a kind that runs out of addresses drops out of the turn.
        """
        seen = set()
        streams = {kind: self._stream(kind, seen) for kind in KINDS}
        turn = [kind for kind in KINDS for _ in range(SHARES[kind])]
        out = []
        while turn and len(out) < count:
            for kind in list(turn):
                pair = next(streams[kind], None)
                if pair is None:
                    turn = [k for k in turn if k != kind]
                elif len(out) < count:
                    out.append(pair)
        return out

    def _stream(self, kind: str, seen: set):
        order = list(range(len(self.parsed)))
        self.rng.shuffle(order)
        for index in order:
            parsed = self.parsed[index]
            changed = getattr(self, kind)(parsed)
            # A kind that adds a detail to both addresses returns the pair.
            original, changed = changed if isinstance(changed, tuple) else (parsed.address, changed)
            if not changed or changed == original or (original, changed) in seen:
                continue
            seen.add((original, changed))
            if KINDS[kind] == NOT_MATCH and self.rng.random() < 0.3:
                original = self.drop_suffixes(parsed) or original  # both changes at once
            yield LabelledPair(original, changed, KINDS[kind], kind)

    def other_district(self, p: Parsed) -> str | None:
        siblings = [a for a in self.gazetteer.areas_by_city[p.area.parent] if a.name != p.area.name]
        if not siblings:
            return None
        other = self.rng.choice(siblings)
        return p.address[:p.area_span[0]] + other.name + p.rest

    def same_name_other_city(self, p: Parsed) -> str | None:
        """The district of that name in another city, its divisions written as the original's are."""
        others = [a for a in self.gazetteer.areas_by_name[p.area.name] if a.parent != p.area.parent]
        if not others or not (p.city or p.province):
            return None
        other = self.rng.choice(others)
        province, city = self.gazetteer.province_of(other), self.gazetteer.city_of(other)
        if p.province_span and p.city_span:
            divisions = (province, city)  # 吉林省长春市朝阳区
        elif p.city_span or p.province.code in _MUNICIPALITIES:
            divisions = (city or province,)  # 北京市朝阳区 / 长春市朝阳区: a municipality is its own city
        else:
            divisions = (province,)  # 广东省南山区 / 黑龙江省南山区
        short = p.province_span is not None and p.address[slice(*p.province_span)] == p.province.short
        head = "".join(d.short if short and d is province else d.name for d in divisions if d)
        return head + other.name + p.rest

    def other_number(self, p: Parsed) -> str | None:
        match = _NUMBER.search(p.rest)
        if not match:
            return None
        n = int(match.group(1))
        other = max(1, n + self.rng.choice([-1, 1]) * self.rng.randint(1, max(3, n // 2)))
        if other == n:
            other = n + 2
        start = p.area_span[1] + match.start(1)
        return p.address[:start] + str(other) + p.address[start + len(match.group(1)):]

    def other_road(self, p: Parsed) -> str | None:
        road = _ROAD.match(p.rest)
        if not road:
            return None
        others = sorted(self.roads_by_area[p.area.code] - {road.group()})
        if not others:
            return None
        return p.address[:p.area_span[1]] + self.rng.choice(others) + p.rest[road.end():]

    def drop_province_city(self, p: Parsed) -> str | None:
        if not (p.province or p.city):
            return None
        return p.address[p.area_span[0]:]

    def drop_suffixes(self, p: Parsed) -> str | None:
        city = p.city if p.city_span else None
        province = p.province if p.province_span else None
        shortened = _divisions_text(province, city, p.area, short=True) + p.rest
        return shortened if shortened != p.address else None

    def drop_street(self, p: Parsed) -> str | None:
        for street in self.gazetteer.streets_by_area[p.area.code]:
            if p.rest.startswith(street) and len(p.rest) > len(street) + 2:
                return p.address[:p.area_span[1]] + p.rest[len(street):]
        return None

    def number_forms(self, p: Parsed) -> str | None:
        match = _NUMBER.search(p.rest)
        if not match:
            return None
        start = p.area_span[1] + match.start(1)
        digits = match.group(1)
        form = hanzi_number(int(digits)) if int(digits) <= 9999 and self.rng.random() < 0.6 else full_width(digits)
        return p.address[:start] + form + p.address[start + len(digits):]

    def spacing(self, p: Parsed) -> str | None:
        head, rest = p.address[:p.area_span[1]], p.rest
        return self.rng.choice([f"{head} {rest}", f"{head}，{rest}", f"{head}{rest}。", f" {head}  {rest} "])

    def add_detail(self, p: Parsed) -> str | None:
        if _DETAIL.search(p.rest):
            return None
        rng = self.rng
        detail = rng.choice([f"{rng.randint(1, 30)}栋{rng.randint(1, 30)}0{rng.randint(1, 9)}室",
                             f"{rng.choice('ABCD')}座{rng.randint(2, 40)}楼",
                             f"{rng.randint(1, 6)}单元{rng.randint(1, 20)}0{rng.randint(1, 4)}",
                             f"{rng.randint(1, 5)}层{rng.randint(101, 150)}号铺"])
        return p.address + detail

    def house_digits(self, p: Parsed) -> str | None:
        """A digit added to or removed from the house number: 1号 / 11号, 90号 / 900号, 100号 / 10号."""
        match = _NUMBER.search(p.rest)
        if not match:
            return None
        digits, rng = match.group(1), self.rng
        forms = [digits + rng.choice([digits[-1], "0", str(rng.randint(1, 9))]), str(rng.randint(1, 9)) + digits]
        if len(digits) > 1:
            forms += [digits[:-1], digits[1:].lstrip("0")]
        other = rng.choice([f for f in forms if f and f != digits and len(f) <= 4])
        start = p.area_span[1] + match.start(1)
        return p.address[:start] + other + p.address[start + len(digits):]

    def _other_part(self, p: Parsed, part: str) -> tuple[str, str] | None:
        """The address and a copy with another number in one part, on the part it has or one added to both."""
        pattern, write = _PARTS[part]
        match = pattern.search(p.rest)
        rng = self.rng
        if match:
            n = int(match.group(1))
            other = n + rng.choice([-1, 1]) * rng.randint(1, 3) if part != "room" else n + rng.choice([-1, 1, 100, -100])
            if other < 1:
                other = n + 1
            start = p.area_span[1] + match.start(1)
            return p.address, p.address[:start] + str(other) + p.address[start + len(match.group(1)):]
        if _DETAIL.search(p.rest):
            return None
        n = rng.randint(1, 20) if part != "room" else rng.randint(1, 30) * 100 + rng.randint(1, 12)
        other = n + 1 if part != "room" else n + rng.choice([1, 2, 100])
        return p.address + write(n), p.address + write(other)

    def other_room(self, p: Parsed):
        return self._other_part(p, "room")

    def other_floor(self, p: Parsed):
        return self._other_part(p, "floor")

    def other_building(self, p: Parsed):
        return self._other_part(p, "building")

    def other_unit(self, p: Parsed):
        return self._other_part(p, "unit")

    def detail_forms(self, p: Parsed) -> tuple[str, str] | None:
        """A floor or building written two ways: 5楼 / 5层 / 5F / 五楼 / ５楼, 3号楼 / 3栋."""
        rng = self.rng
        if rng.random() < 0.6:
            n = rng.randint(1, 30)
            forms = [f"{n}楼", f"{n}层", f"{n}F", f"{hanzi_number(n)}楼", f"{hanzi_number(n)}层", f"{full_width(str(n))}楼"]
        else:
            n = rng.randint(1, 20)
            forms = [f"{n}号楼", f"{n}栋", f"{n}幢", f"{full_width(str(n))}栋"]
        if _DETAIL.search(p.rest):
            return None
        first, second = rng.sample(forms, 2)
        return p.address + first, p.address + second
