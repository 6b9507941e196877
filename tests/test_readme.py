"""The README's front page and links: what a new user reads first must point at things that exist and at numbers
that the README backs with a command."""
import re

from conftest import ROOT

README = (ROOT / "README.md").read_text()
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


def test_every_relative_link_and_picture_of_the_readme_exists():
    """Every relative link or picture in the README names a file of the repository, and every #anchor a heading.
    Catches a renamed or deleted docs/*.png, a link into a folder users do not have (../shared), and a front-page
    link left pointing at a section heading someone renamed."""
    targets = re.findall(r"\]\(([^)\s]+)\)", README)
    assert targets, "no links found: the pattern is wrong"
    anchors = {a for a, _, _ in headings(README)}
    for target in targets:
        if re.match(r"[a-z]+://", target):
            continue
        if target.startswith("#"):
            assert target[1:] in anchors, f"no heading makes the anchor {target}"
        else:
            path = (ROOT / target.split("#")[0]).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"the README links to {target}, which is not in the repository"


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
