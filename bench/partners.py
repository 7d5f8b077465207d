"""Who mixes with whom (issue 23): paired, seeded comparisons of the partner policies on two real data sets.

1. Regression: scikit-learn's bundled `load_diabetes` (442 rows, 10 columns), fastai's `tabular_learner` (layers 200, 100), RMSE on
   a held-out quarter; MixUp and ManifoldMixup with `partner='random'` against `partner='kernel'` (C-Mixup; sigma='auto'), and
   no mixing for reference.
2. Imbalanced classification: scikit-learn's digits (8x8 images), classes 5 to 9 subsampled to a tenth in training (the validation
   set keeps every class whole), the demo's small CNN; no mixing, CutMix with random partners, with `partner='balanced'`, and
   with `remix=(3, 0.5)`; scored by balanced accuracy (the mean of the per-class recalls).

Every arm of a seed gets the same split, initial weights and data order (`set_seed(seed, reproducible=True)` before each);
the differences are paired by seed: mean, std and the 95% paired t-interval.

    nice -n 10 .venv/bin/python bench/partners.py             # writes bench/results/partners.md
    nice -n 10 .venv/bin/python bench/partners.py --seeds 0-4 --epochs-reg 15 --epochs-cls 12 --runs /tmp/quick.jsonl  # a quick look

About 10 minutes on 2 CPU cores shared with other jobs (each fit is a few seconds: the loaders run in the main process).
"""
import argparse, json, math, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1])) # this checkout's fastai_mix
import numpy as np, pandas as pd, torch, torch.nn as nn

def seeds(s:str) -> list[int]:
    a, _, b = s.partition('-')
    return list(range(int(a), int(b or a) + 1))

def regression(seed:int, arm:str, epochs:int, bs:int=32) -> float:
    "Validation RMSE of a `tabular_learner` on `load_diabetes` for one seed and arm ('none', 'mixup', 'mixup-kernel', 'manifold', 'manifold-kernel')"
    import sklearn.datasets
    from fastai.tabular.all import TabularDataLoaders, tabular_learner, Normalize, RandomSplitter, rmse, RegressionBlock
    from fastai.torch_core import set_seed
    from fastai_mix import MixUp, ManifoldMixup
    d = sklearn.datasets.load_diabetes()
    df = pd.DataFrame(d.data.astype('float32'), columns=d.feature_names)
    df['target'] = d.target.astype('float32')
    splits = RandomSplitter(.25, seed=seed)(range(len(df)))
    set_seed(seed, reproducible=True)
    dls = TabularDataLoaders.from_df(df, y_names='target', cont_names=list(d.feature_names), procs=[Normalize], y_block=RegressionBlock(),
                                     valid_idx=splits[1], bs=bs, num_workers=0)
    mixer, _, kind = arm.partition('-')
    kw = dict(partner='kernel') if kind == 'kernel' else {}
    cb = MixUp(**kw) if mixer == 'mixup' else ManifoldMixup(**kw) if mixer == 'manifold' else None
    learn = tabular_learner(dls, layers=[200, 100], metrics=rmse, y_range=(0, 400))
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, 1e-2, cbs=cb)
        return float(learn.validate()[1])

def imbalanced_digits(seed:int, minority=(5, 6, 7, 8, 9), keep:float=.1):
    "Train and validation arrays of the digits: a seeded quarter held out whole; in training, the `minority` classes cut to `keep`"
    from fastai_mix.demo import load_digits_arrays
    x, y = load_digits_arrays()
    idx = np.random.default_rng(seed).permutation(len(y))
    va, tr = idx[:len(y) // 4], idx[len(y) // 4:]
    rng = np.random.default_rng(seed + 1000)
    tr = np.array([i for i in tr if y[i] not in minority or rng.random() < keep])
    return (x[tr], y[tr]), (x[va], y[va])

def classification(seed:int, arm:str, epochs:int, bs:int=64) -> float:
    "Validation balanced accuracy on the imbalanced digits for one seed and arm ('none', 'random', 'balanced', 'remix')"
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.torch_core import set_seed
    from fastai_mix import CutMix
    from fastai_mix.demo import small_cnn
    from torch.utils.data import TensorDataset
    (xt, yt), (xv, yv) = imbalanced_digits(seed)
    f = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(1) / 255
    set_seed(seed, reproducible=True)
    dls = DataLoaders.from_dsets(TensorDataset(f(xt), torch.tensor(yt)), TensorDataset(f(xv), torch.tensor(yv)), bs=bs, device='cpu', num_workers=0)
    kw = dict(random={}, balanced=dict(partner='balanced'), remix=dict(remix=(3, .5))).get(arm)
    learn = Learner(dls, small_cnn(10, 1, (32, 64)), loss_func=CrossEntropyLossFlat())
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, 1e-2, cbs=None if kw is None else CutMix(**kw))
        preds, targs = learn.get_preds()
    pred = preds.argmax(1)
    return float(np.mean([(pred[targs == c] == c).float().mean() for c in range(10)]))

def summary(res:dict, base:str, lower_better:bool, scale:float=1., unit:str='') -> list[str]:
    "Markdown rows: each arm's mean ± std over the seeds, and its paired difference with `base` (mean ± std, 95% t-interval, wins)"
    from fastai_mix.demo import paired_interval, mean_std
    rows = []
    for arm, v in res.items():
        m, s = mean_std([o * scale for o in v])
        if arm == base: rows.append(f"| {arm} | {m:.3f} ± {s:.3f}{unit} | (reference) | | |"); continue
        diffs = [(a - b) * scale for a, b in zip(v, res[base])]
        d, sd, lo, hi = paired_interval(diffs)
        if lo is None: rows.append(f"| {arm} | {m:.3f}{unit} | {d:+.3f} (one seed) | | |"); continue
        wins = sum((x < 0) if lower_better else (x > 0) for x in diffs)
        verdict = 'better' if (hi < 0 if lower_better else lo > 0) else 'worse' if (lo > 0 if lower_better else hi < 0) else 'within the noise'
        rows.append(f"| {arm} | {m:.3f} ± {s:.3f}{unit} | {d:+.3f} ± {sd:.3f} [{lo:+.3f}, {hi:+.3f}] | {wins}/{len(diffs)} | {verdict} |")
    return rows

REG, CLS = ('mixup', 'mixup-kernel', 'manifold', 'manifold-kernel', 'none'), ('random', 'balanced', 'remix', 'none')

def report(runs:list[dict], a, wall:float) -> str:
    "The markdown report of the runs: only the seeds every arm of a task finished are compared"
    by = {}
    for r in runs: by.setdefault(r['task'], {}).setdefault(r['arm'], {})[r['seed']] = r['score']
    def table(task, arms):
        got = by.get(task, {})
        done = sorted(set.intersection(*[set(got.get(k, {})) for k in arms]))
        return {k: [got[k][s] for s in done] for k in arms}, done
    reg, reg_seeds = table('reg', REG)
    cls, cls_seeds = table('cls', CLS)
    (xt, yt), (xv, yv) = imbalanced_digits(0)
    head = "| arm | mean ± std over seeds | paired difference with {}: mean ± std [95% t-interval] | {} | verdict |\n|---|---|---|---|---|"
    lines = [
        "# Partner policies: random against kernel (regression) and balanced / Remix (imbalanced classes)", "",
        f"`nice -n 10 .venv/bin/python bench/partners.py --seeds {a.seeds[0]}-{a.seeds[-1]} --epochs-reg {a.epochs_reg} --epochs-cls {a.epochs_cls}` "
        f"(torch on 1 thread, CPU, on a machine shared with other jobs), paired by seed. Wall time {wall / 60:.0f} min (all arms, all seeds). "
        f"Seeds finished: regression {reg_seeds}, classification {cls_seeds}.", "",
        f"## Regression: `load_diabetes`, `tabular_learner` (200, 100), {a.epochs_reg} epochs of `fit_one_cycle(lr=1e-2)`, bs 32, validation RMSE (lower is better)", "",
        "Per seed, the same split, initial weights and data order for every arm; `kernel` is `partner='kernel'` with `sigma='auto'` (Silverman's rule on each batch).", "",
        "### MixUp", "", head.format('random (MixUp)', 'kernel better'), *summary({k: reg[k] for k in REG[:2] + ('none',)}, 'mixup', True), "",
        "### ManifoldMixup", "", head.format('random (ManifoldMixup)', 'kernel better'), *summary({k: reg[k] for k in REG[2:]}, 'manifold', True), "",
        "Per seed (RMSE): " + json.dumps({k: [round(v, 2) for v in vs] for k, vs in reg.items()}), "",
        f"## Imbalanced classification: digits, classes 5-9 cut to a tenth in training ({len(yt)} training images for seed 0: "
        f"{np.bincount(yt, minlength=10).tolist()}; validation {len(yv)}, every class whole)", "",
        f"The demo's small CNN (widths 32, 64), {a.epochs_cls} epochs of `fit_one_cycle(lr=1e-2)`, bs 64, CutMix (alpha 1); balanced accuracy in % (higher is better).", "",
        head.format('CutMix, random partners', 'wins'), *summary(cls, 'random', False, 100, ''), "",
        "The same runs against no mixing:", "", head.format('no mixing', 'wins'), *summary({k: cls[k] for k in ('none', 'random', 'balanced', 'remix')}, 'none', False, 100, ''), "",
        "Per seed (balanced accuracy): " + json.dumps({k: [round(v, 4) for v in vs] for k, vs in cls.items()}), ""]
    return '\n'.join(lines) + '\n'

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--seeds', type=seeds, default=seeds('0-9'))
    p.add_argument('--epochs-reg', type=int, default=30); p.add_argument('--epochs-cls', type=int, default=20)
    p.add_argument('--out', type=Path, default=Path(__file__).parent/'results'/'partners.md')
    p.add_argument('--runs', type=Path, default=Path('/tmp/partners_runs.jsonl'), help='each finished run, one JSON line: appended to, and read back')
    p.add_argument('--report-only', action='store_true', help='write the report from --runs without training')
    p.add_argument('--wall', type=float, default=None, help='with --report-only: the wall time of the runs, in minutes')
    a = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    runs = [json.loads(l) for l in a.runs.read_text().splitlines()] if a.runs.exists() else []
    have = {(r['task'], r['arm'], r['seed']) for r in runs}
    if not a.report_only:
        for s in a.seeds: # seed by seed, every arm: an interrupted run still gives paired seeds
            for task, arms, f, ep in (('reg', REG, regression, a.epochs_reg), ('cls', CLS, classification, a.epochs_cls)):
                for arm in arms:
                    if (task, arm, s) in have: continue
                    r = dict(task=task, arm=arm, seed=s, score=f(s, arm, ep), epochs=ep)
                    runs.append(r)
                    with a.runs.open('a') as fh: fh.write(json.dumps(r) + '\n')
                    print(r, f'{time.time() - t0:.0f} s', flush=True)
    text = report(runs, a, a.wall * 60 if a.report_only and a.wall else time.time() - t0)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(text)
