#!/usr/bin/env python
"""Hold a run of the default demo to README.md's table: CI runs `bash tools/demo.sh --out DIR`, then
`.venv/bin/python tools/check_demo.py DIR/results.json`. It fails when an accuracy verdict differs from the README's, or when a
mean accuracy or paired difference moves by more than the tolerance the README states (`<!-- demo:tolerance -->`).
The calibration columns are not held: their spread between machines is not measured yet."""
import json, re, sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent/'README.md'

def readme_table(text:str) -> dict:
    "The default run's table in README.md: {mixer: (accuracy %, paired difference % or None, verdict)}"
    m = re.search(r'<!-- demo:default -->\n(.*?)<!-- /demo:default -->', text, re.S)
    if not m: raise SystemExit("README.md has no <!-- demo:default --> table")
    lines = [[c.strip() for c in l.strip().strip('|').split('|')] for l in m[1].splitlines() if l.startswith('|')]
    head = lines[0]
    acc, diff, verdict = head.index('test accuracy %'), head.index('vs none (paired)'), head.index('verdict')
    num = lambda s: float(s.split('±')[0]) if s else None
    return {row[0]: (num(row[acc]), num(row[diff]), row[verdict]) for row in lines[2:]} # after the header and its rule

def tolerance(text:str) -> float:
    "The tolerance in points the README states, between `<!-- demo:tolerance -->` markers"
    m = re.search(r'<!-- demo:tolerance -->\s*([\d.]+)\s*<!-- /demo:tolerance -->', text)
    if not m: raise SystemExit("README.md states no <!-- demo:tolerance --> for the demo's numbers")
    return float(m[1])

def check(results:dict, text:str) -> list[str]:
    "What differs between a demo run's results and README.md's table, beyond the README's tolerance"
    want, tol, errs = readme_table(text), tolerance(text), []
    got = {r['mixer']: r for r in results['summary']}
    if set(got) != set(want): errs.append(f"mixers {sorted(got)} ran, the README has {sorted(want)}")
    for m, (acc, diff, verdict) in want.items():
        if m not in got: continue
        r = got[m]
        if abs(100 * r['accuracy'] - acc) > tol: errs.append(f"{m}: accuracy {100 * r['accuracy']:.1f}%, README {acc:.1f}% (tolerance {tol} points)")
        if diff is not None and abs(100 * r['diff'] - diff) > tol:
            errs.append(f"{m}: paired difference {100 * r['diff']:+.1f}, README {diff:+.1f} (tolerance {tol} points)")
        if r.get('verdict', '') != verdict: errs.append(f"{m}: verdict {r.get('verdict', '')!r}, README {verdict!r}")
    return errs

if __name__ == '__main__':
    res = json.loads(Path(sys.argv[1]).read_text())
    errs = check(res, README.read_text())
    for e in errs: print(f"demo differs from README.md: {e}")
    if errs: sys.exit(1)
    print(f"demo agrees with README.md: every verdict, and accuracies within {tolerance(README.read_text())} points")
