#!/usr/bin/env python
"""Hold a run of the default demo to the figures the docs show: CI runs `bash tools/demo.sh --out DIR`, then
`.venv/bin/python tools/check_demo.py DIR/results.json`. It fails when an accuracy verdict differs from the default run's
full table in nbs/02_demo.ipynb or from the README's compact table (its label-noise column), or when a mean accuracy or
paired difference moves by more than the tolerance the README states (`<!-- demo:tolerance -->`).
The calibration columns are not held: their spread between machines is not measured yet."""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README, NOTEBOOK = ROOT/'README.md', ROOT/'nbs'/'02_demo.ipynb'
SHORT = {'better': 'better than none', 'worse': 'worse than none', 'within the noise': 'within the noise'}

def notebook_markdown(path:Path=NOTEBOOK) -> str:
    "The markdown cells of a notebook, joined"
    return '\n\n'.join(''.join(c['source']) for c in json.loads(Path(path).read_text())['cells'] if c['cell_type'] == 'markdown')

def _rows(text:str, name:str, where:str) -> list[list[str]]:
    m = re.search(rf'<!-- demo:{name} -->\n(.*?)<!-- /demo:{name} -->', text, re.S)
    if not m: raise SystemExit(f"{where} has no <!-- demo:{name} --> table")
    return [[c.strip() for c in l.strip().strip('|').split('|')] for l in m[1].splitlines() if l.startswith('|')]

def readme_table(text:str) -> dict:
    "The default run's full table (in nbs/02_demo.ipynb's markdown): {mixer: (accuracy %, paired difference % or None, verdict)}"
    lines = _rows(text, 'default', 'nbs/02_demo.ipynb')
    head = lines[0]
    acc, diff, verdict = head.index('test accuracy %'), head.index('vs none (paired)'), head.index('verdict')
    num = lambda s: float(s.split('±')[0]) if s else None
    return {row[0]: (num(row[acc]), num(row[diff]), row[verdict]) for row in lines[2:]} # after the header and its rule

def compact_column(text:str) -> dict:
    "The README's compact table, its label-noise column (the default run's setting): {mixer: (paired difference %, verdict)}"
    lines = _rows(text, 'compact', 'README.md')
    col = next(i for i, h in enumerate(lines[0]) if h.startswith('label noise'))
    out = {}
    for row in lines[2:]:
        m = re.fullmatch(r'([+-][\d.]+) \((.*)\)', row[col])
        if m: out[row[0]] = (float(m[1]), SHORT.get(m[2], m[2]))
    return out

def tolerance(text:str) -> float:
    "The tolerance in points the README states, between `<!-- demo:tolerance -->` markers"
    m = re.search(r'<!-- demo:tolerance -->\s*([\d.]+)\s*<!-- /demo:tolerance -->', text)
    if not m: raise SystemExit("README.md states no <!-- demo:tolerance --> for the demo's numbers")
    return float(m[1])

def check(results:dict, nb_text:str, readme_text:str) -> list[str]:
    "What differs between a demo run's results and the notebook's full table or the README's compact column, beyond the tolerance"
    want, tol, errs = readme_table(nb_text), tolerance(readme_text), []
    got = {r['mixer']: r for r in results['summary']}
    if set(got) != set(want): errs.append(f"mixers {sorted(got)} ran, nbs/02_demo.ipynb has {sorted(want)}")
    for m, (acc, diff, verdict) in want.items():
        if m not in got: continue
        r = got[m]
        if abs(100 * r['accuracy'] - acc) > tol: errs.append(f"{m}: accuracy {100 * r['accuracy']:.1f}%, nbs/02_demo.ipynb {acc:.1f}% (tolerance {tol} points)")
        if diff is not None and abs(100 * r['diff'] - diff) > tol:
            errs.append(f"{m}: paired difference {100 * r['diff']:+.1f}, nbs/02_demo.ipynb {diff:+.1f} (tolerance {tol} points)")
        if r.get('verdict', '') != verdict: errs.append(f"{m}: verdict {r.get('verdict', '')!r}, nbs/02_demo.ipynb {verdict!r}")
    compact = compact_column(readme_text)
    for m, r in got.items():
        if m == 'none': continue
        if m not in compact: errs.append(f"{m}: ran, but the README's compact table has no label-noise figure for it"); continue
        diff, verdict = compact[m]
        if abs(100 * r['diff'] - diff) > tol: errs.append(f"{m}: paired difference {100 * r['diff']:+.1f}, README {diff:+.1f} (tolerance {tol} points)")
        if r.get('verdict', '') != verdict: errs.append(f"{m}: verdict {r.get('verdict', '')!r}, README {verdict!r}")
    return errs

if __name__ == '__main__':
    res = json.loads(Path(sys.argv[1]).read_text())
    readme = README.read_text()
    errs = check(res, notebook_markdown(), readme)
    for e in errs: print(f"demo differs from the docs: {e}")
    if errs: sys.exit(1)
    print(f"demo agrees with nbs/02_demo.ipynb and README.md: every verdict, and accuracies within {tolerance(readme)} points")
