"""Single-process draws are those of the previous release (73e06ab) under the same seed: per-rank streams (issue 15) change nothing
in one process. `python tests/test_draws.py` (run against that release) wrote tests/data/draws_73e06ab.json."""
import json, sys, pathlib
import pytest, torch
from fastai.torch_core import set_seed
from fastai_mix import MixUp, CutMix, ResizeMix, MixChoice
from fastai_mix.test_utils import synth_learner, MixSpy

FIXTURE = pathlib.Path(__file__).parent/'data'/'draws_73e06ab.json'
MIXERS = {'mixup': lambda: MixUp(), 'mixup-p.5': lambda: MixUp(p=.5), 'cutmix': lambda: CutMix(), 'cutmix-p.5': lambda: CutMix(p=.5),
          'cutmix-per-sample': lambda: CutMix(per_sample=True), 'resizemix': lambda: ResizeMix(),
          'resizemix-per-sample': lambda: ResizeMix(per_sample=True), 'choice': lambda: MixChoice([MixUp(), CutMix()]),
          'choice-per-sample': lambda: MixChoice([MixUp(), CutMix()], per_sample=True)}

def record_draws(name) -> list:
    "Each training batch's partners and shares, for a seeded fit of 2 epochs"
    set_seed(0)
    spy = MixSpy()
    learn = synth_learner(cbs=[MIXERS[name](), spy], n=64, bs=16)
    learn.fit(2, lr=0)
    lam = lambda l: l.tolist() if isinstance(l, torch.Tensor) else l
    return [dict(perm=r['perm'].tolist() if r['perm'] is not None else None, lam=lam(r['lam'])) for r in spy.records]

@pytest.mark.parametrize('name', list(MIXERS))
def test_same_draws_as_the_previous_release(name):
    expected = json.loads(FIXTURE.read_text())[name]
    got = record_draws(name)
    assert got == expected

if __name__ == '__main__':
    FIXTURE.write_text(json.dumps({n: record_draws(n) for n in MIXERS}))
