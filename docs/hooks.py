"""MkDocs hooks (mkdocs.yml): the pages made when the site is built, and links that differ between GitHub and site.

Generated: the job-file reference and the JSON Schema (from the config models, launch/schema.py), the example index
(from the headers of examples/configs/*.yaml and examples/pipelines/*.yaml), and the contributing page (from
CONTRIBUTING.md at the top of the repository).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_FOLDERS = ("examples/configs", "examples/pipelines")
SCHEMA_LINE = "# yaml-language-server: $schema="
FIELDS = ("Run", "Needs", "Prints")


def example_header(path: Path) -> dict[str, str]:
    """An example's header: `schema` (the $schema line's target), `about` (its description), Run, Needs, Prints."""
    header: dict[str, str] = {}
    about: list[str] = []
    field = None
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.startswith(SCHEMA_LINE):
            header["schema"] = line.removeprefix(SCHEMA_LINE)
            continue
        text = line[1:].removeprefix(" ")
        match = re.match(rf"({'|'.join(FIELDS)}):\s+(.*)", text)
        if match:
            field = match.group(1)
            header[field] = match.group(2).strip()
        elif field and text.startswith("  "):  # a field's continuation, indented under its value
            header[field] += " " + text.strip()
        elif not field:
            about.append(text)
    header["about"] = re.sub(r"\n{3,}", "\n\n", "\n".join(about)).strip()
    return header


def examples_markdown() -> str:
    """The example index: each shipped example's description, how to run it, what it needs and what it prints."""
    lines = [
        "# Examples",
        "",
        "The shipped job files and pipelines, each as its own header describes it (this page is generated from",
        "those headers). They train tiny models on shipped data, so each runs on a laptop's CPU in minutes. Every",
        "job file names the [JSON Schema](job-file.md#editor-completion) in its first line.",
    ]
    for folder in EXAMPLE_FOLDERS:
        title = "Job files" if folder.endswith("configs") else "Pipelines"
        lines += ["", f"## {title}"]
        for path in sorted((ROOT / folder).glob("*.yaml")):
            header = example_header(path)
            lines += ["", f"### `{path.name}`", "", header["about"], ""]
            lines.append(f"- **Run:** `{header['Run']}`" if "(" not in header["Run"] else _run_with_note(header))
            if "Needs" in header:
                lines.append(f"- **Needs:** {header['Needs']}")
            lines.append(f"- **Prints:** {header['Prints']}")
            lines.append(f"- **File:** `{folder}/{path.name}`")
    return "\n".join(lines) + "\n"


def _run_with_note(header: dict[str, str]) -> str:
    """`command (a note)` written as the command in code and the note after it."""
    command, _, note = header["Run"].partition(" (")
    return f"- **Run:** `{command}` ({note}"


def contributing_markdown() -> str:
    """CONTRIBUTING.md with its links to docs/ pages made relative to the site."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    return re.sub(r"\]\(docs/", "](", text)


def on_files(files: Any, config: Any) -> Any:
    """Add the generated pages and the schema to the site's files."""
    from mkdocs.structure.files import File

    from tuneyard.launch.schema import reference_markdown, schema_text

    for name, content in (
        ("reference.md", reference_markdown()),
        ("examples.md", examples_markdown()),
        ("contributing.md", contributing_markdown()),
        ("tuneyard.schema.json", schema_text()),
    ):
        files.append(File.generated(config, name, content=content))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Links to ../CONTRIBUTING.md (right on GitHub) point at the site's contributing page."""
    return markdown.replace("](../CONTRIBUTING.md", "](contributing.md")
