"""The documentation's links hold: every relative link and image in README.md, docs/*.md, benchmarks/README.md and
benchmarks/docs/*.md names an existing file (and an existing heading, for `#anchor`s, by GitHub's slug rules), the
README stays short, and every script benchmarks/README.md names exists. Fast: no Ray, no model."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_BYTES = 12 * 1024
# generated from the CLI's configuration by its own change; links to it may precede it, only while it is absent
GENERATED = ROOT / "docs" / "cli.md"

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_REF = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""", re.IGNORECASE)
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)")  # [name]: target
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def doc_pages() -> list[Path]:
    pages = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
    pages += sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "benchmarks" / "docs").glob("*.md"))
    return [p for p in pages if p.is_file()]


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, inline code blanked out (a link shown as code is no link)."""
    lines, fence = [], None
    for line in text.split("\n"):
        m = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1).startswith(fence):
                fence = None
            lines.append("")
            continue
        lines.append("" if fence else re.sub(r"(`+)(?:(?!\1).)+?\1", "``", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, punctuation dropped except '-' and '_',
    each space turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    fence = None
    for line in page.read_text().split("\n"):
        m = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if m:
            fence = m.group(1) if fence is None else (None if m.group(1).startswith(fence) else fence)
            continue
        h = None if fence else HEADING.match(line)
        if h:
            base = slug(h.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[tuple[int, str]]:
    found = []
    for i, line in enumerate(prose(page.read_text()), 1):
        found += [(i, m.group(1)) for m in LINK.finditer(line)]
        found += [(i, m.group(1)) for m in HTML_REF.finditer(line)]
        found += [(i, m.group(1)) for m in REF_DEF.finditer(line)]
    return found


def broken_links(page: Path) -> list[str]:
    """What is wrong with each relative link of `page`, as 'page:line: target (why)'."""
    problems = []
    for line, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto: …
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}:{line}: {target}"
        if path and dest == GENERATED.resolve() and not GENERATED.exists():
            continue
        if not dest.exists():
            problems.append(f"{where} (no such file)")
        elif anchor:
            if dest.is_dir() or dest.suffix != ".md":
                problems.append(f"{where} (an anchor into a file that is not Markdown)")
            elif anchor not in anchors(dest):
                problems.append(f"{where} (no heading with that anchor in {dest.relative_to(ROOT)})")
    return problems


def test_every_page_is_checked():
    names = {str(p.relative_to(ROOT)) for p in doc_pages()}
    assert {"README.md", "benchmarks/README.md", "docs/architecture.md", "docs/selection.md"} <= names
    assert any(n.startswith("benchmarks/docs/") for n in names)


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    problems = broken_links(page)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/ (limit {README_MAX_BYTES})"


def test_readme_keeps_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert re.search(r"^make demo\b", text, re.MULTILINE) and re.search(r"^make test\b", text, re.MULTILINE)


def test_benchmark_scripts_named_exist():
    text = (ROOT / "benchmarks" / "README.md").read_text()
    named = set(re.findall(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.py)\b", text))
    assert any(n.startswith("bench_") or "/bench_" in n for n in named), "no benchmark script found in the index"
    missing = []
    for name in sorted(named):
        path = ROOT / name if "/" in name else ROOT / "benchmarks" / name
        if not path.is_file():
            missing.append(name)
    assert not missing, f"benchmarks/README.md names scripts that do not exist: {missing}"


def test_slug_rules():
    assert slug("Explain: why is this row low?") == "explain-why-is-this-row-low"
    assert slug("What 10⁹ rows cost the driver and the store") == "what-10⁹-rows-cost-the-driver-and-the-store"
    assert slug("Exactly once, resume, bad rows") == "exactly-once-resume-bad-rows"
    assert slug("select's output") == "selects-output"
    assert slug("Value → select") == "value--select"
    assert slug("Orchestration (Airflow)") == "orchestration-airflow"
    assert slug("`bench_gpu.py`, ready") == "bench_gpupy-ready"


def test_a_broken_link_is_found(tmp_path, monkeypatch):
    """The check itself can fail: a missing file, a missing anchor, and a missing docs/cli.md only when absent."""
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    target = tmp_path / "docs" / "t.md"
    target.write_text("# Title\n\n## Some heading\n\n```bash\n# not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/t.md#some-heading) [ok](docs/t.md) ![img](docs/missing.png)\n"
        "[bad anchor](docs/t.md#not-a-heading) [gone](docs/nowhere.md) `[code](docs/nowhere.md)`\n"
        "[cli](docs/cli.md) [web](https://example.org/x.md)\n"
        "[ref]: docs/t.md#some-heading\n"
    )
    monkeypatch.setattr(module, "GENERATED", tmp_path / "docs" / "cli.md")
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert any("docs/missing.png" in p for p in problems)
    assert any("#not-a-heading" in p for p in problems)
    assert any("docs/nowhere.md" in p for p in problems)
    (tmp_path / "docs" / "cli.md").write_text("# CLI\n")
    page.write_text("[cli](docs/cli.md#value)\n")
    assert broken_links(page) == ["README.md:1: docs/cli.md#value (no heading with that anchor in docs/cli.md)"]
