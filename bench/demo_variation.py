"""How much do the demo's numbers move between machines? The default `fastai-mix demo` under several CPU settings.

    .venv/bin/python bench/demo_variation.py            # writes bench/results/demo_variation.md

The same code, seeds and data on other machines give other floats: torch picks its CPU kernels by the instruction set
(AVX-512, AVX2 or none: `ATEN_CPU_CAPABILITY`), and reductions split differently over threads. Fifty epochs amplify
those differences, as a new seed would. Each setting runs the default demo (any extra arguments are passed on) in its own
process; the report gives every setting's table, then per mixer the range of the mean accuracy, of the paired difference
and of its interval over the settings, and whether any verdict differs."""
import json, os, subprocess, sys, time
from pathlib import Path

SETTINGS = {'AVX-512, 1 thread': dict(cap=None, threads=1), 'AVX2, 1 thread': dict(cap='avx2', threads=1),
            'no SIMD, 1 thread': dict(cap='default', threads=1), 'AVX-512, 2 threads': dict(cap=None, threads=2)}

def run(name:str, cap, threads:int, out:Path, extra:list) -> dict:
    env = dict(os.environ)
    if cap: env['ATEN_CPU_CAPABILITY'] = cap
    cmd = [sys.executable, '-m', 'fastai_mix', 'demo', '--out', str(out), '--threads', str(threads), *extra]
    if threads > 1 and '--jobs' not in extra: cmd += ['--jobs', '1'] # 2 threads per run: one run at a time
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    res = json.loads((out/'results.json').read_text())
    print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    return res

def spread(xs:list) -> float: return (max(xs) - min(xs)) * 100

def report(results:dict, extra:list) -> str:
    from fastai_mix.demo import results_table
    cmd = ' '.join(['fastai-mix demo', *extra])
    md = [f"# How much the demo's numbers move between CPU settings\n\n`{cmd}` under each setting "
          f"(`python bench/demo_variation.py {' '.join(extra)}`), on {os.cpu_count()} cores.\n"]
    acc_only = lambda t: '\n'.join('|' + '|'.join(l.strip('|').split('|')[:6]) + '|' for l in t.splitlines()) # the accuracy columns: what CI holds
    for name, res in results.items(): md += [f"## {name}\n", acc_only(results_table(res['summary'])), '']
    mixers = [r['mixer'] for r in next(iter(results.values()))['summary']]
    md += ["## Range over the settings (max - min, points)\n", '| mixer | mean accuracy | paired difference | interval low end | interval high end | verdicts |',
           '|---|---:|---:|---:|---:|---|']
    for m in mixers:
        rows = [next(r for r in res['summary'] if r['mixer'] == m) for res in results.values()]
        diff = [f"{spread([r[k] for r in rows]):.1f}" if rows[0].get(k) is not None else '' for k in ('diff', 'diff_lo', 'diff_hi')]
        verdicts = sorted({r.get('verdict', '') for r in rows} - {''})
        md.append(f"| {m} | {spread([r['accuracy'] for r in rows]):.1f} | {' | '.join(diff)} | {', '.join(verdicts) or '-'} |")
    return '\n'.join(md) + '\n'

if __name__ == '__main__':
    extra, root = sys.argv[1:], Path(os.environ.get('VARIATION_OUT', '/tmp/demo_variation'))
    results = {name: run(name, out=root/f'set{i}', extra=extra, **kw) for i, (name, kw) in enumerate(SETTINGS.items())}
    dest = Path(__file__).parent/'results'/'demo_variation.md'
    dest.write_text(report(results, extra))
    (root/'all.json').write_text(json.dumps({k: v['summary'] for k, v in results.items()}, indent=1))
    print(dest.read_text())
