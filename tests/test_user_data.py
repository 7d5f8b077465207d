"Issue 12: no mixer writes into the user's data; pasting in place is an explicit option"
import pytest, torch, torch.nn as nn
from fastcore.test import test_close as close_
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import no_random
from fastai_mix import MixUp, CutMix, ResizeMix, MixChoice
from fastai_mix.test_utils import MixSpy
from test_callback import share_from_pixels, moved
from test_reliability import check_mixing

BS, N = 16, 64

class Views:
    "A pre-batched dataset: item i is the whole batch i, a view of the preloaded tensors (the fast-loading pattern)"
    def __init__(self, *ts): self.ts = ts
    def __len__(self): return len(self.ts[0]) // BS
    def __getitem__(self, i): return tuple(t[i*BS:(i+1)*BS] for t in self.ts)

class Kept:
    "A pre-batched dataset that keeps its batches as a list of tensors and returns them as they are"
    def __init__(self, *ts): self.bs = [tuple(t[i*BS:(i+1)*BS].clone() for t in ts) for i in range(len(ts[0]) // BS)]
    def __len__(self): return len(self.bs)
    def __getitem__(self, i): return self.bs[i]
    def snapshot(self): return [tuple(t.clone() for t in b) for b in self.bs]

def data(seg=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, 8, 8, generator=g)
    y = (x[:, 0] > 0).long() if seg else torch.randint(0, 4, (N,), generator=g)
    return x, y

def learner(ds, mixer, seg=False):
    dls = DataLoaders(DataLoader(ds, bs=None, shuffle=True), DataLoader(ds, bs=None))
    model = nn.Conv2d(3, 2, 1) if seg else nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    spy = MixSpy()
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(axis=1) if seg else CrossEntropyLossFlat(), cbs=[mixer, spy]), spy

MIXERS = {
    'cutmix': lambda **kw: CutMix(**kw), 'cutmix-per-sample': lambda **kw: CutMix(per_sample=True, **kw),
    'resizemix': lambda **kw: ResizeMix(**kw), 'resizemix-per-sample': lambda **kw: ResizeMix(per_sample=True, **kw),
    'mixup': lambda **kw: MixUp(**kw),
    'choice': lambda **kw: MixChoice([MixUp(), CutMix(**kw), ResizeMix(**kw)]),
    'choice-per-sample': lambda **kw: MixChoice([MixUp(), CutMix(**kw)], per_sample=True),
}

@pytest.mark.parametrize('kind', ['views', 'kept'])
@pytest.mark.parametrize('name', list(MIXERS))
def test_user_data_left_alone(name, kind):
    x, y = data()
    x0, y0 = x.clone(), y.clone()
    ds = Views(x, y) if kind == 'views' else Kept(x, y)
    kept0 = ds.snapshot() if kind == 'kept' else None
    mixer = MIXERS[name]()
    learn, spy = learner(ds, mixer)
    with no_random(0): learn.fit(2, lr=0)
    assert torch.equal(x, x0) and torch.equal(y, y0) # bit for bit
    if kept0 is not None: assert all(torch.equal(a, b) for k, k0 in zip(ds.bs, kept0) for a, b in zip(k, k0))
    if not isinstance(mixer, MixChoice): check_mixing(mixer, spy.records) # the mixed batches still match the loss
    assert any(not torch.equal(r['x'], r['xm']) for r in spy.records) # and they were mixed

@pytest.mark.parametrize('kind', ['views', 'kept'])
@pytest.mark.parametrize('name', ['cutmix', 'cutmix-per-sample', 'resizemix', 'resizemix-per-sample', 'choice'])
def test_user_masks_left_alone(name, kind):
    "A segmentation dataset served as batches: the images and the masks stay as they were; the mixed masks follow the pasted pixels"
    x, m = data(seg=True)
    x0, m0 = x.clone(), m.clone()
    ds = Views(x, m) if kind == 'views' else Kept(x, m)
    kept0 = ds.snapshot() if kind == 'kept' else None
    mixer = MIXERS[name]() if name != 'choice' else MixChoice([CutMix(), ResizeMix(interpolation='nearest')])
    learn, spy = learner(ds, mixer, seg=True)
    with no_random(0): learn.fit(2, lr=0)
    assert torch.equal(x, x0) and torch.equal(m, m0)
    if kept0 is not None: assert all(torch.equal(a, b) for k, k0 in zip(ds.bs, kept0) for a, b in zip(k, k0))
    for r in spy.records: # each pixel of the mixed mask is the mask of the sample whose pixel is there
        same, part = (r['xm'] == r['x']).all(1), (r['xm'] == r['x'][r['perm']]).all(1)
        mm, y = r['ym'][0], r['y'][0]
        if 'resize' not in name and 'choice' not in name:
            assert torch.equal(mm[same & ~part], y[same & ~part]) and torch.equal(mm[part & ~same], y[r['perm']][part & ~same])
        assert torch.equal(mm[same & ~part], y[same & ~part])

@pytest.mark.parametrize('mixer', [CutMix, ResizeMix])
def test_inplace_option_writes_in_place(mixer):
    "`inplace=True` pastes into the batch itself: with batches that are views of the data, the data changes"
    x, y = data()
    x0 = x.clone()
    learn, spy = learner(Views(x, y), mixer(inplace=True))
    with no_random(0): learn.fit(1, lr=0)
    assert not torch.equal(x, x0)
    check_mixing(learn.cbs.filter(lambda o: isinstance(o, mixer))[0], spy.records)

@pytest.mark.parametrize('mixer', [CutMix, ResizeMix])
def test_inplace_is_the_only_difference(mixer):
    "With fresh batches, `inplace=True` trains exactly as the default"
    from fastai_mix.test_utils import synth_learner
    def losses(m):
        with no_random(0): learn = synth_learner(cbs=m)
        with no_random(1): learn.fit(1)
        return learn.recorder.losses
    assert losses(mixer()) == losses(mixer(inplace=True))

def test_inplace_checked():
    for bad in ('yes', 1, None):
        with pytest.raises(TypeError, match=r"inplace must be True or False, got"): CutMix(inplace=bad)
    with pytest.raises(TypeError, match=r"inplace must be True or False"): ResizeMix(inplace='no')
