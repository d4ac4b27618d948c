"""Every relative link in the README, docs/, experiments/ and bench/ points at a file that exists."""
import re

from conftest import ROOT

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def markdown_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "experiments").rglob("*.md")),
            *sorted((ROOT / "bench").glob("*.md"))]


def test_relative_links_resolve():
    broken = []
    for md in markdown_files():
        for target in LINK.findall(md.read_text()):
            if "://" not in target and not target.startswith("mailto:") and not (md.parent / target).exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files: " + ", ".join(broken)


def test_every_experiment_folder_has_its_readme_with_a_command():
    folders = [p for p in (ROOT / "experiments").iterdir() if p.is_dir()]
    assert len(folders) >= 5
    for folder in folders:
        text = (folder / "README.md").read_text()
        assert "```bash" in text, f"{folder.name}/README.md has no command"
