#!/usr/bin/env python
"""Regenerate every demo figure that README.md and nbs/02_demo.ipynb show, from the code as it stands.

    .venv/bin/python tools/demo_numbers.py                  # the digits settings: default, clean-short, fmix-manifold
    .venv/bin/python tools/demo_numbers.py fashion          # only the named settings (fashion: Fashion-MNIST, about 15 min)
    .venv/bin/python tools/demo_numbers.py --notebook       # then re-execute nbs/02_demo.ipynb (its stored outputs)

Each setting runs `fastai-mix demo` with its arguments in a fresh process and writes the table it printed, with its
command and wall time, between the markers `<!-- demo:NAME -->` and `<!-- /demo:NAME -->` of README.md and of the
notebook's markdown; the default run's pictures go to assets/. `tools/check_demo.py` holds a new run to the default table."""
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
        for name in args or DIGITS:
            res = run(name, Path(d)/name)
            write(name, block(name, res))
            (ROOT/'assets'/f'demo_{name}.json').write_text(json.dumps(dict(settings=res['settings'], summary=res['summary'], load=res['load']), indent=1) + '\n')
            if name == 'default':
                for f in PICTURES:
                    if (Path(d)/name/f).exists(): shutil.copy(Path(d)/name/f, ROOT/'assets'/f)
            print(f"{name}: written", flush=True)
    if '--notebook' in sys.argv:
        env = dict(os.environ, IPYTHONDIR=str(ROOT/'.cache'/'ipython'), MPLCONFIGDIR=str(ROOT/'.cache'/'mpl'))
        subprocess.run([sys.executable, 'tools/run_nb.py', 'nbs/02_demo.ipynb'], check=True, cwd=ROOT, env=env)
        subprocess.run([str(Path(sys.executable).parent/'nbdev-clean')], check=True, cwd=ROOT, env=env)
