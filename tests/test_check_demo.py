"""tools/check_demo.py, which CI runs after the default demo, and the README's demo blocks that tools/demo_numbers.py writes."""
import copy, importlib.util, json, re
from pathlib import Path
import pytest
from fastai_mix.demo import results_table

ROOT = Path(__file__).resolve().parent.parent
def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT/'tools'/f'{name}.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod
check_demo, demo_numbers = _tool('check_demo'), _tool('demo_numbers')
README = (ROOT/'README.md').read_text()
DEFAULT = json.loads((ROOT/'assets'/'demo_default.json').read_text())

def test_readme_blocks_are_the_stored_runs():
    "Each demo table in the README is the table of the run stored in assets/demo_<setting>.json, as tools/demo_numbers.py wrote it"
    names = re.findall(r'<!-- demo:([\w-]+) -->', README)
    assert 'default' in names
    stored = {p.stem[5:]: json.loads(p.read_text()) for p in (ROOT/'assets').glob('demo_*.json')}
    for name in names:
        if name == 'tolerance': continue
        want = demo_numbers.compact(stored) if name == 'compact' else demo_numbers.block(name, stored[name])
        assert demo_numbers.marked(name).search(README)[2] == want, name

def test_readme_table_parsed():
    rows, tol = check_demo.readme_table(README), check_demo.tolerance(README)
    assert list(rows) == [r['mixer'] for r in DEFAULT['summary']]
    assert 0 < tol < 10
    assert check_demo.check(DEFAULT, README) == [] # the stored run agrees with its own table

@pytest.mark.parametrize('change', ['accuracy', 'diff', 'verdict', 'mixer'])
def test_a_run_that_moves_fails(change):
    res, tol = copy.deepcopy(DEFAULT), check_demo.tolerance(README)
    r = res['summary'][1] # the first mixer after none
    if change in ('accuracy', 'diff'): r[change] += (tol + 0.2) / 100
    elif change == 'verdict': r['verdict'] = 'within the noise' if r['verdict'] != 'within the noise' else 'better than none'
    else: res['summary'].pop()
    errs = check_demo.check(res, README)
    assert len(errs) == 1 and (change in errs[0] or change == 'mixer'), errs

def test_small_moves_pass():
    res, tol = copy.deepcopy(DEFAULT), check_demo.tolerance(README)
    for r in res['summary']:
        r['accuracy'] -= (tol - 0.2) / 100
        if r.get('diff') is not None: r['diff'] += (tol - 0.2) / 100
    assert check_demo.check(res, README) == []
