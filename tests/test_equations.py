"""Every "Eq. N" the chapters cite names the paper's equation N: each citation must sit in a place that the
README's concordance table ("The paper's equations in the code") lists for N. A citation inside a function or
class must be in one listed for N (or inside / around one: a class docstring covers its methods); one at module
level (a module docstring, a section comment) must be in a file listed for N. So writing "Eq. 15" on the L1
loss, which the table gives to Eq. 16, fails here."""
import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAPTERS = ("sigrl.py", "gat.py", "vit.py", "clip_text.py", "data.py", "train.py")
# "Eq. 5", "Eq. 5-9", "Eq. 5 and 7", "(Eq. 10-11)", "Eq. 13's"
CITATION = re.compile(r"Eq\.\s*(\d+)(?:\s*-\s*(\d+))?(?:\s+and\s+(\d+))?")


def concordance(readme_text):
    """{N: [(file, qualname), ...]} from the README's table."""
    section = readme_text[readme_text.index("### The paper's equations in the code"):]
    table = {}
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            table[int(cells[0])] = [tuple(ref.split(":", 1)) for ref in re.findall(r"`([^`]+)`", cells[2])]
    return table


def numbers(match):
    first, last, extra = match.group(1), match.group(2), match.group(3)
    out = list(range(int(first), int(last or first) + 1))
    return out + ([int(extra)] if extra else [])


def scopes(tree):
    """[(first line, last line, qualname)] of every function and class, innermost last when nested."""
    found = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                found.append((child.lineno, child.end_lineno, name))
                walk(child, name + ".")
            else:
                walk(child, prefix)
    walk(tree, "")
    return found


def citations(path):
    """[(line number, N, qualname or None for module level)] of every Eq. citation in the file."""
    text = open(path, encoding="utf-8").read()
    spans = scopes(ast.parse(text))
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in CITATION.finditer(line):
            inside = [name for first, last, name in spans if first <= number <= last]
            where = max(inside, key=len) if inside else None
            out.extend((number, n, where) for n in numbers(match))
    return out


def allowed(file, where, places):
    if where is None:
        return any(f == file for f, _ in places)
    return any(f == file and (where == q or where.startswith(q + ".") or q.startswith(where + "."))
               for f, q in places)


def problems(table, files):
    """One line per citation that the table does not place where it stands."""
    bad = []
    for file in files:
        for line, n, where in citations(os.path.join(REPO, file)):
            if n not in table:
                bad.append(f"{file}:{line}: Eq. {n} is not an equation of the paper (1-16)")
            elif not allowed(file, where, table[n]):
                bad.append(f"{file}:{line}: Eq. {n} cited in {where or 'module level'}, "
                           f"but the table gives it to {', '.join(f'{f}:{q}' for f, q in table[n])}")
    return bad


@pytest.fixture(scope="module")
def table():
    return concordance(open(os.path.join(REPO, "README.md"), encoding="utf-8").read())


def test_the_table_covers_the_paper_and_names_real_places(table):
    assert sorted(table) == list(range(1, 17))
    for n, places in table.items():
        for file, qualname in places:
            names = {name for _, _, name in scopes(ast.parse(open(os.path.join(REPO, file)).read()))}
            assert qualname in names, f"Eq. {n}: {file} has no {qualname}"


def test_every_chapter_citation_is_where_the_table_says(table):
    bad = problems(table, CHAPTERS)
    assert not bad, "\n".join(bad)
    assert sum(len(citations(os.path.join(REPO, f))) for f in CHAPTERS) > 30  # the scan does find them


def test_a_mislabelled_citation_is_caught(table, tmp_path, monkeypatch):
    """The L1 loss labelled Eq. 15 (the ranking loss's number), and a number the paper does not have."""
    source = open(os.path.join(REPO, "sigrl.py")).read()
    assert "L_global (Eq. 16)" in source
    (tmp_path / "sigrl.py").write_text(source.replace("L_global (Eq. 16)", "L_global (Eq. 15)"))
    monkeypatch.setattr(__import__(__name__), "REPO", str(tmp_path))
    bad = problems(table, ["sigrl.py"])
    assert len(bad) == 1 and "Eq. 15 cited in l1_distill" in bad[0], bad
    (tmp_path / "sigrl.py").write_text(source + "\n# Eq. 17\n")
    assert any("Eq. 17 is not an equation" in line for line in problems(table, ["sigrl.py"]))
