"""Worker for tests/test_distributed.py, run on each rank by `python -m torch.distributed.run --nproc_per_node 2`.

Trains a tiny learner with each mixer named on the command line under `learn.distrib_ctx()` on the CPU (gloo),
and saves what this rank saw to `<out>/<mixer>_rank<r>.pt`: the spy's records (batches before and after mixing,
perm, lam, loss), whether the loss function and the callbacks were the same objects before and after the fit."""
import os, sys, pathlib
sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
import torch, torch.distributed as dist
from fastai.distributed import DistributedDL
from fastai.torch_core import set_seed, rank_distrib, num_distrib, defaults
import fastai.callback.schedule  # noqa: F401  (fit_one_cycle)
from fastai_mix import MixHandler, MixUp, CutMix, ResizeMix, MixChoice, FMix
from fastai_mix.test_utils import synth_learner, MixSpy

def _gloo_broadcast(self, t, rank):
    "fastai's `DistributedDL._broadcast` moves the indices to the GPU for nccl; on the CPU gloo broadcasts CPU tensors"
    t = torch.tensor(t, dtype=torch.long)
    dist.broadcast(t, rank)
    return t.tolist()
DistributedDL._broadcast = _gloo_broadcast
defaults.cpus = 0 # the loaders load in each rank's own process (as in tests/conftest.py): no loader workers started at each epoch

MIXERS = dict(mixup=MixUp, cutmix=CutMix, resizemix=ResizeMix, cutmix_ps=lambda: CutMix(per_sample=True),
              choice=lambda: MixChoice([MixUp(), CutMix()]), fmix=FMix, fmix_ps=lambda: FMix(per_sample=True))

def train(name):
    "One seeded run, every rank seeded alike (the usual script: `set_seed` once at the top, launched on N processes)"
    set_seed(100)
    spy, mixer = MixSpy(), MIXERS[name]()
    learn = synth_learner(cbs=[mixer, spy], n=64, bs=8, shape=(3, 8, 8))
    lf, cbs, names = learn.loss_func, [mixer, spy], learn.cbs.map(lambda o: type(o).__name__)
    with learn.distrib_ctx(cpu=not torch.cuda.is_available()): learn.fit_one_cycle(2, 1e-2) # Accelerate needs cpu=True for gloo on CPUs
    state = {k: getattr(mixer, k) for k in ('perm', 'lam', 'yb1', '_old_lf')}
    return dict(rank=rank_distrib(), world=num_distrib(), backend=dist.get_backend(), records=spy.records,
                lf_same=learn.loss_func is lf, cb_names=(list(names), list(learn.cbs.map(lambda o: type(o).__name__))),
                ours_kept=all(any(o is c for o in learn.cbs) for c in cbs),
                state_clear=all(v is None for v in state.values()), model_unwrapped=type(learn.model).__name__,
                n_batches=len(spy.records))

def main(out, names):
    for name in names:
        res = train(name)
        res['again'] = [dict(perm=r['perm'], lam=r['lam'], x=r['x']) for r in train(name)['records']] # the same seed again
        torch.save(res, pathlib.Path(out)/f'{name}_rank{rank_distrib()}.pt')

if __name__ == '__main__': main(sys.argv[1], sys.argv[2].split(','))
