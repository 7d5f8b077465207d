#!/usr/bin/env python
"""Regenerate every demo figure that README.md and nbs/02_demo.ipynb show, from the code as it stands.

    .venv/bin/python tools/demo_numbers.py                  # the digits settings: default, clean-short, fmix-manifold
    .venv/bin/python tools/demo_numbers.py fashion          # only the named settings (fashion: Fashion-MNIST, about 15 min)
    .venv/bin/python tools/demo_numbers.py --notebook       # then re-execute nbs/02_demo.ipynb (its stored outputs)
    .venv/bin/python tools/demo_numbers.py --stored         # no run: rewrite the blocks from the runs stored in assets/

Each setting runs `fastai-mix demo` with its arguments in a fresh process and writes the table it printed, with its
command and wall time, between the markers `<!-- demo:NAME -->` and `<!-- /demo:NAME -->` of README.md and of the
notebook's markdown; the default run's pictures go to assets/, and each run's settings and summary to
assets/demo_NAME.json. The block `<!-- demo:compact -->` gets one row per mixer and one column per setting (the paired
difference with no mixing and its verdict). `tools/check_demo.py` holds a new run to the default table."""
import json, os, re, shutil, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {'default': [], 'clean-short': ['--noise', '0', '--epochs', '5'], 'fmix-manifold': ['--mix', 'none,fmix,manifold'],
            'fashion': ['--data', 'fashion-mnist']}
DIGITS = ('default', 'clean-short', 'fmix-manifold')
PICTURES = ('accuracy.png', 'curves.png', 'calibration.png', 'batch_mixup.png', 'batch_cutmix.png', 'batch_resizemix.png')

def marked(name:str) -> re.Pattern: return re.compile(rf'(<!-- demo:{name} -->\n)(.*?)(<!-- /demo:{name} -->)', re.S)

def run(name:str, out:Path) -> dict:
    "Run the setting `name` into `out` and return its results.json, with the load average before and after"
    load = os.getloadavg()[0]
    subprocess.run([sys.executable, '-m', 'fastai_mix', 'demo', *SETTINGS[name], '--out', str(out)], check=True, cwd=ROOT)
    res = json.loads((out/'results.json').read_text())
    res['load'] = (load, os.getloadavg()[0])
    return res

def block(name:str, res:dict) -> str:
    "The markdown of one setting: its command, wall time and table"
    from fastai_mix.demo import results_table
    s, cmd = res['settings'], ' '.join(['fastai-mix demo', *SETTINGS[name]])
    return (f"`{cmd}`: printed `wall time {s['wall_seconds']:.0f} s` on our 2-core CPU ({s.get('jobs', 1)} processes, load average "
            f"{res['load'][0]:.1f} before, {res['load'][1]:.1f} after):\n\n{results_table(res['summary'])}\n")

COMPACT = {'default': 'label noise (digits, 40% wrong, 50 epochs)', 'fashion': 'clean labels, trained long (Fashion-MNIST, 30 epochs)',
           'clean-short': 'clean labels, short training (digits, 5 epochs)'}

def compact(runs:dict) -> str:
    "One row per mixer, one column per setting of `COMPACT`: the paired difference in accuracy with no mixing, and its verdict"
    names = [n for n in COMPACT if n in runs]
    same = {'default': ['default', 'fmix-manifold']} # the same setting and seeds (the same `none` runs): more mixers
    summary = {n: [r for k in same.get(n, [n]) if k in runs for r in runs[k]['summary']] for n in names}
    mixers = list(dict.fromkeys(r['mixer'] for n in names for r in summary[n] if r['mixer'] != 'none'))
    short = {'better than none': 'better', 'worse than none': 'worse', 'within the noise': 'within the noise'}
    rows = ['| mixer | ' + ' | '.join(COMPACT[n] for n in names) + ' |', '|---|' + '---:|' * len(names)]
    for m in mixers:
        cells = []
        for n in names:
            r = next((o for o in summary[n] if o['mixer'] == m), None)
            cells.append('' if r is None else f"{100 * r['diff']:+.1f} ({short.get(r['verdict'], r['verdict'])})")
        rows.append(f"| {m} | " + ' | '.join(cells) + ' |')
    base = '; '.join(f"{COMPACT[n].split(' (')[0]} {100 * next(o for o in runs[n]['summary'] if o['mixer'] == 'none')['accuracy']:.1f}%" for n in names)
    return '\n'.join(rows) + f"\n\nAccuracy without mixing: {base}. Points of test accuracy, paired by seed; the verdict as in each full table (FMix and ManifoldMixup on the digits: `--mix none,fmix,manifold`, the same seeds).\n"

def fill(text:str, name:str, md:str, where:str) -> str:
    pat = marked(name)
    if not pat.search(text): raise SystemExit(f"{where} has no <!-- demo:{name} --> ... <!-- /demo:{name} --> block")
    return pat.sub(lambda m: m[1] + md + m[3], text)

def write(name:str, md:str):
    "Write the block into README.md and the notebook's markdown, wherever its markers are"
    readme = ROOT/'README.md'
    if marked(name).search(readme.read_text()): readme.write_text(fill(readme.read_text(), name, md, 'README.md'))
    nb_path = ROOT/'nbs'/'02_demo.ipynb'
    nb = json.loads(nb_path.read_text())
    for c in nb['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'markdown' and marked(name).search(src): c['source'] = fill(src, name, md, nb_path.name).splitlines(True)
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')

if __name__ == '__main__':
    args = [a for a in sys.argv[1:] if not a.startswith('--')]
    bad = [a for a in args if a not in SETTINGS]
    if bad: raise SystemExit(f"unknown setting(s) {bad}: choose among {list(SETTINGS)}")
    with tempfile.TemporaryDirectory() as d:
        for name in [] if '--stored' in sys.argv else args or DIGITS:
            res = run(name, Path(d)/name)
            write(name, block(name, res))
            (ROOT/'assets'/f'demo_{name}.json').write_text(json.dumps(dict(settings=res['settings'], summary=res['summary'], load=res['load']), indent=1) + '\n')
            if name == 'default':
                for f in PICTURES:
                    if (Path(d)/name/f).exists(): shutil.copy(Path(d)/name/f, ROOT/'assets'/f)
            print(f"{name}: written", flush=True)
    stored = {p.stem[5:]: json.loads(p.read_text()) for p in sorted((ROOT/'assets').glob('demo_*.json'))}
    for name, res in stored.items(): write(name, block(name, res)) # every block, from what is stored
    write('compact', compact(stored))
    if '--notebook' in sys.argv:
        env = dict(os.environ, IPYTHONDIR=str(ROOT/'.cache'/'ipython'), MPLCONFIGDIR=str(ROOT/'.cache'/'mpl'))
        subprocess.run([sys.executable, 'tools/run_nb.py', 'nbs/02_demo.ipynb'], check=True, cwd=ROOT, env=env)
        subprocess.run([str(Path(sys.executable).parent/'nbdev-clean')], check=True, cwd=ROOT, env=env)
