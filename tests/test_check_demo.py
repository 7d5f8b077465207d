"""tools/check_demo.py, which CI runs after the default demo, and the demo blocks that tools/demo_numbers.py writes into the
README (the compact table) and nbs/02_demo.ipynb (the full tables)."""
import copy, importlib.util, json, re
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT/'tools'/f'{name}.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod
check_demo, demo_numbers = _tool('check_demo'), _tool('demo_numbers')
README = (ROOT/'README.md').read_text()
NB = check_demo.notebook_markdown(ROOT/'nbs'/'02_demo.ipynb')
DEFAULT = json.loads((ROOT/'assets'/'demo_default.json').read_text())
STORED = {p.stem[5:]: json.loads(p.read_text()) for p in (ROOT/'assets').glob('demo_*.json')}

@pytest.mark.parametrize('where', ['README', 'notebook'])
def test_blocks_are_the_stored_runs(where):
    "Each demo table is the table of the run stored in assets/demo_<setting>.json, as tools/demo_numbers.py wrote it"
    text = README if where == 'README' else NB
    names = [n for n in re.findall(r'<!-- demo:([\w-]+) -->', text) if n != 'tolerance']
    assert set(names) >= ({'compact'} if where == 'README' else {'default', 'clean-short', 'fmix-manifold', 'fashion', 'compact'}), names
    for name in names:
        want = demo_numbers.compact(STORED) if name == 'compact' else demo_numbers.block(name, STORED[name])
        assert demo_numbers.marked(name).search(text)[2] == want, name

def test_tables_parsed():
    rows, tol = check_demo.readme_table(NB), check_demo.tolerance(README)
    assert list(rows) == [r['mixer'] for r in DEFAULT['summary']]
    assert 0 < tol < 10
    compact = check_demo.compact_column(README)
    for r in DEFAULT['summary'][1:]: assert compact[r['mixer']] == (round(100 * r['diff'], 1), r['verdict'])
    assert check_demo.check(DEFAULT, NB, README) == [] # the stored run agrees with its own tables

@pytest.mark.parametrize('change, n', [('accuracy', 1), ('diff', 2), ('verdict', 2), ('mixer', 1)])
def test_a_run_that_moves_fails(change, n):
    "A move beyond the tolerance fails against the notebook's full table, and (differences, verdicts) against the README's column"
    res, tol = copy.deepcopy(DEFAULT), check_demo.tolerance(README)
    r = res['summary'][1] # the first mixer after none
    if change in ('accuracy', 'diff'): r[change] += (tol + 0.2) / 100
    elif change == 'verdict': r['verdict'] = 'within the noise' if r['verdict'] != 'within the noise' else 'better than none'
    else: res['summary'].pop()
    errs = check_demo.check(res, NB, README)
    assert len(errs) == n and all(change in e or change == 'mixer' for e in errs), errs
    if n == 2: assert any('README' in e for e in errs) and any('02_demo' in e for e in errs)

def test_readme_compact_table_held():
    "A README whose label-noise column no longer says what the demo prints fails, though the notebook agrees"
    readme = README.replace('| mixup | +4.3 (better)', '| mixup | +9.3 (better)')
    assert readme != README
    errs = check_demo.check(DEFAULT, NB, readme)
    assert len(errs) == 1 and 'README' in errs[0] and 'mixup' in errs[0], errs

def test_small_moves_pass():
    res, tol = copy.deepcopy(DEFAULT), check_demo.tolerance(README)
    for r in res['summary']:
        r['accuracy'] -= (tol - 0.2) / 100
        if r.get('diff') is not None: r['diff'] += (tol - 0.2) / 100
    assert check_demo.check(res, NB, README) == []
