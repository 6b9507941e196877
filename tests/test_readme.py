"""The README's front page and the docs pages: what a new user reads first must point at things that exist and at
numbers that the README backs with a command, and nothing in them may depend on this project's tracker or on the
machine it was written on."""
import importlib
import itertools
import re
import shlex

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]  # every Markdown page a reader of the repository opens
SCRIPTS = [s for s in ("dcgan", "cgan", "wgan_clip", "wgan_gp", "sngan", "infogan", "sagan") if (ROOT / f"{s}.py").exists()]


def headings(text):
    """[(GitHub's #anchor, level, line index)] of the headings: lower case, punctuation dropped (backticks, dots,
    dashes other than '-'), spaces to '-', and -1, -2 … on repeats. Lines in fenced code blocks are no headings."""
    out, seen, fenced = [], {}, False
    for i, line in enumerate(text.splitlines()):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#{1,6}) ", line)):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.append((slug if n == 0 else f"{slug}-{n}", len(m.group(1)), i))
    return out


def section(text, anchor):
    """The text of the section whose heading makes `anchor`, up to the next heading of its level or above."""
    lines, marks = text.splitlines(), headings(text)
    k = next((k for k, (a, _, _) in enumerate(marks) if a == anchor), None)
    assert k is not None, f"no heading makes the anchor #{anchor}"
    level, start = marks[k][1], marks[k][2]
    end = next((i for _, lv, i in marks[k + 1:] if lv <= level), len(lines))
    return "\n".join(lines[start:end])


def front_table():
    """({script: row} of the README's first table, the front page; the README's text after that table)."""
    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    rows = {}
    for line in lines[start + 2:end]:
        m = re.search(r"\[`(\w+)\.py`\]", line)
        assert m, f"a front-page row without a script link: {line[:80]}"
        rows[m.group(1)] = line
    return rows, "\n".join(lines[end:])


def bash_commands(text):
    """Every command of the README's bash blocks, continuation lines joined, comments and extra spaces dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = " ".join(cmd.split("#")[0].split())
            if cmd:
                out.append(cmd)
    return out


def links(text):
    """Every Markdown link or picture target of `text` outside code (fenced blocks and `inline code`)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_picture_and_anchor_resolves(page):
    """Every relative link or picture of the README and of each docs page names a file of the repository
    (relative to the page's own folder, as GitHub resolves it), and every #anchor, in the page or in the linked
    page, a heading there (GitHub's slugs). Catches a renamed or deleted picture, a picture moved into docs/ with
    the page still saying `docs/x.png` (from docs/ that is docs/docs/x.png), a link into a folder users do not
    have (../shared), and a link left pointing at a heading someone renamed or moved to another page."""
    targets = links(page.read_text())
    assert targets or page != ROOT / "README.md", "no links found: the pattern is wrong"
    for target in targets:
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.is_relative_to(ROOT) and path.exists(), f"{page.name} links to {target}, which is not in the repository"
        if anchor:
            assert path.suffix == ".md", f"{page.name}: an anchor into {file}, which is no Markdown page"
            anchors = {a for a, _, _ in headings(path.read_text())}
            assert anchor in anchors, f"{page.name} links to {target}: no heading of {path.name} makes #{anchor}"


def test_every_docs_page_is_linked_from_the_readme():
    """Each docs/*.md page is linked from the README, the front page that sends readers there. Catches a page
    moved out of the README that no reader can find any more (only a search would)."""
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(README) if not re.match(r"[a-z]+:", t)}
    assert [p.name for p in DOCS if p.resolve() not in linked] == []


def test_the_readme_is_a_front_page_of_at_most_300_lines():
    """README.md stays a front page: at most 300 lines; long tables, measurements and protocols belong on the docs
    pages. Catches the README growing back into a lab notebook one result at a time."""
    n = len(README.splitlines())
    assert n <= 300, f"README.md has {n} lines; move the detail to a docs/ page"


# An issue number (the word issue, or a "#", followed by digits) means nothing to a reader without the tracker;
# an upstream tracker named before the "#" (pytorch#N) is a reference and allowed.
ISSUE = re.compile(r"\bissues? #?\d+|(?<![\w/#])#\d+\b", re.I)
# A path of the machine the text was written on; DIR, DATA_ROOT, runs/<run> are the placeholders to use.
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|tmp|root|home)/")


def offending_lines(path, pattern):
    return [f"{path.relative_to(ROOT)}:{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
            if pattern.search(line)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_readme_and_docs_name_no_issue_numbers_and_no_machine_paths(page):
    """The README and the docs pages give the reason itself, not an issue number, and placeholders (DIR, DATA_ROOT),
    not a path of the machine they were measured on (under its work, tmp, root or home folders). Catches a pointer to
    a tracker the reader cannot see, or a command that works only on the author's machine."""
    bad = offending_lines(page, ISSUE) + offending_lines(page, MACHINE_PATH)
    assert bad == [], "\n".join(bad)


CODE = sorted(p for p in ROOT.rglob("*.py") if ".venv" not in p.parts)


@pytest.mark.parametrize("path", CODE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_code_names_no_issue_numbers_and_no_machine_paths(path):
    """The same rule for every .py file's comments, docstrings and messages. Catches "see issue N" in a comment
    that should say what went wrong, and a usage example that runs only on the author's machine."""
    bad = offending_lines(path, ISSUE) + offending_lines(path, MACHINE_PATH)
    assert bad == [], "\n".join(bad)


def test_the_front_page_has_a_row_per_script_with_samples_a_number_and_its_command():
    """The first table has one row per script: a picture that exists, a bold headline number that the README's
    section states too, and a command that is one of the section's documented commands (so the number is
    backed by the command that produced it). Catches a script added without a row, a number changed in its
    section but not on the front page (or made up for it), and a front-page command that drifted from the one run."""
    rows, _ = front_table()
    assert sorted(rows) == sorted(SCRIPTS)
    for script, row in rows.items():
        picture = re.search(r"!\[[^]]*\]\(([^)]+)\)", row)
        assert picture and (ROOT / picture.group(1)).is_file(), f"{script}: no picture"
        body = section(README, re.search(r"\]\(#([^)]+)\)", row).group(1))  # the script's section, linked from the row
        numbers = re.findall(r"\*\*([\d.]+)\*\*", row)
        assert len(numbers) == 1, f"{script}: one bold headline number, got {numbers}"
        assert re.search(rf"(?<![\d.]){re.escape(numbers[0])}(?!\d)", body), f"{script}: {numbers[0]} is not in its section"
        command = " ".join(re.findall(r"`(python [^`]+)`", row)[-1].split())
        assert command.startswith(f"python {script}.py "), f"{script}: the last cell is not its command: {command}"
        assert command in bash_commands(body), f"{script}: `{command}` is not a command of its section"


def test_the_readme_keeps_the_install_and_test_commands():
    """The install, first-run and test commands a new user (and CI) reads are still in a bash block."""
    commands = bash_commands(README)
    for expected in ("pip install -r requirements.txt", "python -m pytest"):
        assert expected in commands, expected


def script_commands(text):
    """(script, argv) of every command of `text`'s bash blocks that runs one of the scripts (python or torchrun),
    brace alternatives ({none,concat}) expanded, and shell redirections and chains cut off."""
    out = []
    for cmd in bash_commands(text):
        tokens = shlex.split(re.split(r"\s(?:&&|\|\|?|;|>>?|2>&1)\s?", cmd)[0])
        at = next((i for i, t in enumerate(tokens) if t.removesuffix(".py") in SCRIPTS and t.endswith(".py")), None)
        if at is None or not ({"python", "python3", "torchrun", "srun"} & set(tokens[:at])):
            continue
        argv = tokens[at + 1:]
        choices = [re.fullmatch(r"\{(.+,.+)\}", t).group(1).split(",") if re.fullmatch(r"\{(.+,.+)\}", t) else [t]
                   for t in argv]
        out += [(tokens[at].removesuffix(".py"), list(a)) for a in itertools.product(*choices)]
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_documented_command_parses_with_its_script(page, capsys):
    """Every `python dcgan.py ...` (or torchrun) command of the README's and the docs pages' bash blocks is accepted
    by that script's own argument parser, with the architecture checks parse_args makes. Catches a flag renamed or
    removed in a script while its documentation still types it, and a documented flag combination that the
    script refuses (`--width` with `--arch mlp`)."""
    failed = []
    for script, argv in script_commands(page.read_text()):
        try:
            importlib.import_module(script).parse_args(argv)
        except SystemExit as e:
            failed.append(f"{script}.py {shlex.join(argv)}: exit {e.code}: {capsys.readouterr().err.strip()}")
    assert failed == [], "\n".join(failed)
