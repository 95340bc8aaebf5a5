"""The documentation stays true to the code: docs/cli.md is what the commands' --help says now, every
"DESIGN §x" citation in the code has its heading in docs/design.md, the README stays short and starts with
the set-up commands that CI runs, and the relative links between the docs resolve."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from gradindex.cli.help_docs import REGENERATE, iter_commands, render_markdown

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CITATION = re.compile(r"DESIGN §(\d+(?:\.\d+)*)")
SECTION_HEADING = re.compile(r"^#{1,6} §(\d+(?:\.\d+)*)\s", re.MULTILINE)


def design_citations() -> dict[str, list[str]]:
    """``{section: ["path:line", ...]}`` for every "DESIGN §x" in gradindex/, tests/ and tools/ (this file aside)."""
    found: dict[str, list[str]] = {}
    for folder in ("gradindex", "tests", "tools"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.resolve() == Path(__file__).resolve():
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                for section in CITATION.findall(line):
                    found.setdefault(section, []).append(f"{path.relative_to(ROOT)}:{number}")
    return found


def design_sections() -> set[str]:
    return set(SECTION_HEADING.findall((DOCS / "design.md").read_text(encoding="utf-8")))


def test_docs_cli_md_is_current():
    current = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert current == render_markdown(), f"docs/cli.md is out of date: run {REGENERATE}"


def test_cli_reference_covers_every_command_and_flag():
    """The generator walks the whole tree (nested groups too) and each flag of each command appears."""
    from gradindex.cli import main

    text = render_markdown()
    contexts = list(iter_commands(main))
    paths = [ctx.command_path for ctx in contexts]
    assert {"gradindex", "gradindex query", "gradindex eval lds", "gradindex weights plot"} <= set(paths)
    assert len(paths) == len(set(paths))
    for ctx in contexts:
        assert f"\n## {ctx.command_path}\n" in text
        for param in ctx.command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert any(opt in text for opt in param.opts), (ctx.command_path, param.opts)


def test_cli_reference_does_not_depend_on_the_terminal(monkeypatch):
    first = render_markdown()
    monkeypatch.setenv("COLUMNS", "37")
    assert render_markdown() == first


def test_the_generator_sees_a_changed_help_text():
    """The currency check can fail: a command whose help changes renders differently."""

    @click.group()
    def group():
        """A group."""

    @group.command()
    @click.option("--alpha", default=1, show_default=True, help="The first flag.")
    def sub(alpha):
        """A subcommand."""

    before = render_markdown(group)
    sub.params[0].help = "A changed flag."
    after = render_markdown(group)
    assert "The first flag." in before and "A changed flag." in after and before != after


def test_every_design_citation_resolves_to_a_heading():
    citations = design_citations()
    assert citations, "no DESIGN § citation found: the scan is broken"
    missing = {s: where for s, where in citations.items() if s not in design_sections()}
    assert not missing, f"DESIGN § citations without a heading in docs/design.md: {missing}"


def test_the_citation_check_can_fail():
    assert "9.9" not in design_sections()
    assert CITATION.findall("see DESIGN §1.3, §1.5") == ["1.3"]
    assert SECTION_HEADING.findall("## §1.3 Learned weights\n### §4 Measuring\n§2 not a heading\n") == ["1.3", "4"]


def test_no_citation_of_a_design_file_outside_the_repository():
    for folder in ("gradindex", "tests", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.resolve() != Path(__file__).resolve():
                assert "/work/shared" not in path.read_text(encoding="utf-8"), path


def ci_commands() -> list[str]:
    """The shell command lines `.ci/run` runs (after its set-up lines)."""
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip().startswith("python3 ")]


def readme_commands() -> list[str]:
    """The commands of the README's first code block, comments stripped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.DOTALL)
    assert block is not None
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_is_short_and_starts_with_the_setup_commands_ci_runs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert text.startswith("# gradindex\n\n```bash\n"), "the set-up commands come first"
    commands = readme_commands()
    assert len(commands) == 2 and "gradindex demo" in commands[0]
    assert commands[1] in ci_commands(), "CI must run exactly the README's test command"


@pytest.mark.parametrize("page", sorted(p.relative_to(ROOT).as_posix() for p in [ROOT / "README.md",
                                                                                   *DOCS.rglob("*.md")]))
def test_relative_links_resolve(page):
    """Every relative link and image of the README and docs/ names a file that exists, and an anchor
    into a Markdown file names one of its headings."""
    source = ROOT / page
    text = re.sub(r"```.*?```", "", source.read_text(encoding="utf-8"), flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (source.parent / path).resolve() if path else source
        assert resolved.exists(), f"{page}: link to missing {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in heading_anchors(resolved), f"{page}: no heading for #{anchor} in {path or page}"


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces → -)."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    anchors = set()
    for title in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE):
        anchor = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        anchors.add(anchor)
    return anchors


def test_paths_named_in_the_docs_exist():
    """Every repository path the README and docs/ name (gradindex/…, tools/…, tests/…, data/…) exists."""
    pattern = re.compile(r"\b(?:gradindex|tools|tests|data)/[\w./-]*\.(?:py|json|jsonl|npz|md)\b")
    for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        for path in pattern.findall(page.read_text(encoding="utf-8")):
            assert (ROOT / path).exists(), f"{page.relative_to(ROOT)} names {path}, which does not exist"


def test_the_readme_task_example_runs(tmp_path, monkeypatch):
    """The README's "Your own task" class and commands work as written (tiny data, in-process CLI)."""
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    from click.testing import CliRunner

    from gradindex.cli import main

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Your own task", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    commands = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_task.py").write_text(code, encoding="utf-8")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 20)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1)
    np.savez("train.npz", x=x, y=y)
    np.savez("queries.npz", x=x[:3], y=y[:3])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    torch.save(model.state_dict(), "model.pt")
    for line in commands.splitlines():
        args = line.split("#", 1)[0].split()
        assert args[0] == "gradindex"
        done = CliRunner().invoke(main, ["-q", *args[1:]], catch_exceptions=False)
        assert done.exit_code == 0, (line, done.output)
    assert "query 2" in done.output  # the last command printed every query's top-k


def documented_command_lines() -> list[tuple[str, str]]:
    """``(page, line)`` for every ``gradindex ...`` command in a code block of the README and docs/
    (fenced or indented; continuation lines joined), except the generated docs/cli.md and the synopsis
    with placeholders in docs/design.md §3."""
    found = []
    for page in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        if page in (DOCS / "cli.md", DOCS / "design.md"):
            continue
        text = page.read_text(encoding="utf-8")
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL)
        blocks += ["\n".join(line[4:] for line in re.findall(r"^    .*$", text, re.MULTILINE))]
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                if line.strip().startswith("gradindex "):
                    found.append((page.relative_to(ROOT).as_posix(), line.strip()))
    return found


def test_documented_commands_and_flags_exist(monkeypatch):
    """Every command line the docs show parses against the CLI as it is now: the commands, flags, choices
    and number formats exist (the commands' bodies are replaced by no-ops; nothing runs)."""
    from click.testing import CliRunner

    from gradindex.cli import main

    for ctx in iter_commands(main):
        monkeypatch.setattr(ctx.command, "callback", lambda *args, **kwargs: None)
    lines = documented_command_lines()
    assert len(lines) > 30, "the scan of the docs' code blocks is broken"
    for page, line in lines:
        text = re.sub(r"\[[^\]]*\]", "", line).replace("$c", "subject")  # optional parts, loop variables
        args = shlex.split(text, comments=True)[1:]
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, f"{page}: `{line}` no longer parses: {result.output.strip()}"


def test_the_command_check_can_fail(monkeypatch):
    from click.testing import CliRunner

    from gradindex.cli import main

    for ctx in iter_commands(main):
        monkeypatch.setattr(ctx.command, "callback", lambda *args, **kwargs: None)
    assert CliRunner().invoke(main, ["query", "runs/store", "--inputs", "q.npz", "--no-such-flag"]).exit_code != 0
    assert CliRunner().invoke(main, ["query", "runs/store", "--inputs", "q.npz", "-k", "5"]).exit_code == 0
