"""The README's promises: the two commands (CI runs exactly its test command), and links that
stay inside the repository and lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RUN_COMMAND = "bash deploy/setup.sh && .venv/bin/ipferry run"


def shell_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", text, flags=re.S)]


def test_the_readme_gives_the_run_and_the_test_command_and_ci_runs_the_latter():
    blocks = shell_blocks(README.read_text())
    assert blocks[0] == RUN_COMMAND
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert blocks[1] == ci, "CI must run exactly the README's test command"


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text)
            if not re.match(r"https?:|mailto:", t)]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


def test_readme_and_docs_links_stay_in_the_repository_and_exist():
    for page in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for link in links(page):
            path, _, fragment = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            assert target.is_relative_to(REPO), f"{page.name}: {link} leads out of the repository"
            assert target.exists(), f"{page.name}: {link} leads nowhere"
            if page == README and fragment and target.suffix == ".md":
                assert fragment in anchors(target), f"README: {link}: no such heading"


def test_the_readme_front_page_stays_short():
    text = README.read_text()
    assert len(text.splitlines()) < 200
    assert [h for h in re.findall(r"^## (.*)$", text, flags=re.M)] == [
        "Quick start (a fresh Debian machine, as root)", "Documentation"]
