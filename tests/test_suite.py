"""The suite's own layout (DEVELOPERS.md, "Where the tests live"): each test file is named after its subject, and no
test is hidden by a later one of the same name in its file (Python keeps the last definition, and pytest collects
only that one: two branches that each append a `test_errors` to one file would lose one without a word)."""
import ast, collections
from pathlib import Path

TESTS = Path(__file__).parent

def test_no_file_named_after_a_review():
    found = sorted(p.name for p in TESTS.glob('test_review*.py'))
    assert not found, f"tests named after a review, not a subject: {found}; move each test into the file of what it tests"

def test_no_test_hidden_by_another_of_its_name():
    hidden = []
    for p in sorted(TESTS.glob('*.py')):
        tree = ast.parse(p.read_text(), str(p))
        names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        names += [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)]
        hidden += [f"{p.name}: {k} defined {v} times" for k, v in collections.Counter(names).items() if v > 1]
    assert not hidden, '\n'.join(hidden)
