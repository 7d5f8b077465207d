"""The tables of a demo run's `results.json` against another base (e.g. CutMix), with the per-seed paired differences, and the
class token's attention entropy per epoch (ViT runs: `attn_entropy` in each run's history), as markdown.

    python bench/demo_tables.py OUT/results.json --base cutmix [--entropy]
"""
import argparse, json
import numpy as np
from fastai_mix.compare import paired_summary, paired_table

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('results', help="a demo's results.json")
    p.add_argument('--base', default='cutmix', help='the mixer the others are compared with, seed by seed (default: %(default)s)')
    p.add_argument('--entropy', action='store_true', help="also the class token's attention entropy per epoch (ViT runs)")
    a = p.parse_args()
    res = json.loads(open(a.results).read())
    runs, s = res['runs'], res['settings']
    mixers = list(dict.fromkeys(r['mixer'] for r in runs))
    runs = [r for r in runs if r['mixer'] != 'none' or a.base == 'none']
    summary = paired_summary(runs, base=a.base)
    print(paired_table(summary, a.base, 'accuracy', 'test accuracy %', ece=True))
    by = {(r['mixer'], r['seed']): r for r in res['runs']}
    print(f"\nPer seed ({', '.join(map(str, s['seeds']))}), test accuracy % and the difference with {a.base} in points:\n")
    print('| mixer | ' + ' | '.join(f'seed {k}' for k in s['seeds']) + ' |\n|---|' + '---:|' * len(s['seeds']))
    for m in mixers:
        cells = [f"{by[m, k]['accuracy'] * 100:.1f}" + ('' if m in ('none', a.base) else f" ({(by[m, k]['accuracy'] - by[a.base, k]['accuracy']) * 100:+.1f})")
                 for k in s['seeds']]
        print(f"| {m} | " + ' | '.join(cells) + ' |')
    if a.entropy:
        n = len(runs[0]['history'])
        print("\nThe class token's attention entropy over the patches (last block, mean over heads and the first 256 test images) "
              "over log(patches), the uniform attention's: mean over the seeds, per epoch\n")
        print('| mixer | ' + ' | '.join(str(e + 1) for e in range(n)) + ' |\n|---|' + '---:|' * n)
        for m in mixers:
            h = np.array([[e['attn_entropy'] for e in by[m, k]['history']] for k in s['seeds']])
            print(f"| {m} | " + ' | '.join(f'{v:.3f}' for v in h.mean(0)) + ' |')
    print(f"\nwall time {s['wall_seconds']:.0f} s on {s['device']}, {s['jobs']} jobs of {s['threads']} thread(s)")

if __name__ == '__main__': main()
