"""The README and docs/: every relative link resolves, to a file and to a heading or anchor in it,
and the README stays a five-minute read."""
import os
import re

import pytest

from conftest import ROOT

PAGES = ["README.md", "BENCHMARKS.md", os.path.join("mgeo_service", "models", "default", "MODEL_CARD.md")] + [
    os.path.join("docs", name) for name in sorted(os.listdir(os.path.join(ROOT, "docs"))) if name.endswith(".md")]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: str) -> set[str]:
    """GitHub's ids for the page's headings, plus explicit <a id="...">."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    ids = set(re.findall(r'<a id="([^"]+)">', text))
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        ids.add(slug)
    return ids


def relative_links(page: str) -> list[str]:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else \
            os.path.join(ROOT, page)
        assert os.path.exists(resolved), f"{page}: {target} does not exist"
        if anchor:
            assert anchor in anchors(resolved), f"{page}: {target} has no heading #{anchor}"


def test_the_readme_links_every_page_of_docs_and_stays_short():
    links = {os.path.normpath(target.partition("#")[0]) for target in relative_links("README.md")}
    for page in PAGES:
        if page.startswith("docs"):
            assert page in links, f"README.md does not lead to {page}"
    assert os.path.getsize(os.path.join(ROOT, "README.md")) <= 10 * 1024
