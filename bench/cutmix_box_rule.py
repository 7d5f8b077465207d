"""Does CutMix's box rule matter? Our box (side `round(s * sqrt(1 - lam))`, the full side) against the CutMix paper's
code (`cut = int(W * cut_rat)`, box `cx ± cut // 2`: one pixel short on odd sides), paired by seed on the demo's digits.

    .venv/bin/python bench/cutmix_box_rule.py --noise 0.4 --seeds 0-6
    .venv/bin/python bench/cutmix_box_rule.py --noise 0 --seeds 0-6

Both rules run with the demo's settings (200 training digits, 16 px, 50 epochs, the small CNN) from the same seed, so
the same images, wrong labels, data order and initial weights; the loss share is the real clipped area in both.
Report: bench/results/cutmix_box_rule.md."""
import argparse, json, math, torch
import fastai_mix.core as core
from pathlib import Path
from fastai_mix.demo import write_digits, image_datasets, train_mixer, torch_threads, t_quantile

def paper_box(size, lam, generator=None):
    "The CutMix paper's box (clovaai/CutMix-PyTorch `rand_bbox`): `cut = int(s * r)`, `[c - cut // 2, c + cut // 2)`, clipped"
    r = (1 - lam) ** (1 / len(size))
    centre = [int(torch.randint(0, s, (1,), generator=generator)) for s in reversed(size)][::-1] # the same draws as ours
    return tuple(slice(min(max(c - int(s * r) // 2, 0), s), min(max(c + int(s * r) // 2, 0), s)) for s, c in zip(size, centre))

def seeds(s:str) -> list[int]:
    a, _, b = s.partition('-')
    return list(range(int(a), int(b or a) + 1))

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--noise', type=float, default=0.4); p.add_argument('--seeds', type=seeds, default=seeds('0-6'))
    p.add_argument('--out', type=Path, default=Path('/tmp/cutmix_box_rule'))
    a = p.parse_args()
    ours, rows = core.cutmix_box, []
    with torch_threads(1):
        for s in a.seeds:
            dsets = image_datasets(write_digits(a.out/f'seed{s}', seed=s, n_train=200, noise=a.noise), 16, seed=s)
            row = dict(seed=s)
            for name, box in (('ours', ours), ('paper', paper_box)):
                core.cutmix_box = box # the batch CutMix of the demo draws its box here
                try: row[name] = train_mixer(dsets, 'cutmix', epochs=50, lr=0.01, bs=32, seed=s, progress=False)['accuracy']
                finally: core.cutmix_box = ours
            rows.append(row); print(f"seed {s}: ours {row['ours']:.2%}, paper's rule {row['paper']:.2%}", flush=True)
    d = [100 * (r['paper'] - r['ours']) for r in rows]
    m = sum(d) / len(d); sd = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1)); half = t_quantile(.975, len(d) - 1) * sd / math.sqrt(len(d))
    print(f"noise {a.noise}, {len(d)} seeds: ours {100 * sum(r['ours'] for r in rows) / len(rows):.2f}%, paper's rule "
          f"{100 * sum(r['paper'] for r in rows) / len(rows):.2f}%; paper - ours {m:+.2f} ± {sd:.2f} points "
          f"(95% interval {m - half:+.2f} to {m + half:+.2f}); paper's rule ahead on {sum(x > 0 for x in d)}, behind on {sum(x < 0 for x in d)} of {len(d)} seeds")
    (a.out/'results.json').write_text(json.dumps(rows))
