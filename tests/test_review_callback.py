"Issue 13, the callback side: regression tests for the review's findings 1-5, 9, 10 and the callbacks' argument checks"
import json, pickle, re
from functools import partial
from pathlib import Path
import numpy as np, pytest, torch, torch.nn as nn, torch.nn.functional as F
from fastcore.test import test_close as close_, test_eq as eq_
from fastai.callback.core import Callback
from fastai.callback.schedule import ParamScheduler, SchedCos, SchedLin, SchedNo
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import no_random
import fastai.callback.schedule  # noqa: F401  (fit_one_cycle)
from fastai_mix import MixHandler, MixUp, CutMix, ResizeMix, MixChoice, mix_loss
from fastai_mix.callback import MixedLoss
from fastai_mix.test_utils import synth_learner, MixSpy, blend_shares, paste_shares
from test_callback import moved

def mixed_batches(recs): return sum(bool(moved(r['perm']).any()) for r in recs if r['perm'] is not None)

# ---- 1. a ParamScheduler's values count only in its own fit ----

def test_schedule_does_not_outlive_its_fit(tmp_path):
    sched = lambda: ParamScheduler({'mix_alpha': SchedLin(.2, 1.), 'mix_p': SchedCos(1., 0.)})
    spy = MixSpy()
    learn = synth_learner(cbs=spy, n=128, bs=16)
    learn.fit_one_cycle(2, cbs=[CutMix(), sched()])
    assert learn.opt.hypers[-1]['mix_p'] < .01 # what the schedule left in the optimizer
    learn.fit_one_cycle(2, cbs=CutMix()) # a fresh mixer in the next fit
    eq_(mixed_batches(spy.records), 16) # every batch mixed: p=1, not the value left behind
    learn = synth_learner(cbs=[CutMix(), spy], n=128, bs=16) # a mixer on the learner, scheduled in one fit
    learn.fit_one_cycle(2, cbs=sched())
    eq_(learn.cut_mix.current('p'), 1.) # what show_batch reads
    learn.fit(1)
    eq_(mixed_batches(spy.records), 8)
    learn.save(tmp_path/'ckpt', with_opt=True)
    spy2 = MixSpy()
    fresh = synth_learner(cbs=[CutMix(), spy2], n=128, bs=16)
    fresh.load(tmp_path/'ckpt', with_opt=True)
    assert 'mix_p' in fresh.opt.hypers[-1]
    fresh.fit(1)
    eq_(mixed_batches(spy2.records), 8)

def test_schedule_still_counts_in_its_fit():
    class PSpy(Callback):
        order = MixHandler.order + 1
        def before_fit(self): self.seen = []
        def before_batch(self):
            if self.training: self.seen.append(self.learn.cut_mix.current('p'))
    learn = synth_learner(cbs=[CutMix(), PSpy()], n=64, bs=16)
    learn.fit(1, lr=0, cbs=ParamScheduler({'mix_p': SchedLin(1., 0.)}))
    close_(learn.p_spy.seen, [1., .75, .5, .25])

# ---- 2. several targets: only class indices get the partner's target ----

class MultiDS:
    "x, a class index, and a regression target or a mask of x, served as batches"
    def __init__(self, kind, n=32, bs=8):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 6, 6, generator=g)
        self.c = torch.randint(0, 4, (n,), generator=g)
        self.t = torch.randn(n, generator=g) if kind == 'reg' else (self.x[:, 0] > 0).long()
        self.bs = bs
    def __len__(self): return len(self.x) // self.bs
    def __getitem__(self, i): s = slice(i*self.bs, (i+1)*self.bs); return self.x[s], self.c[s], self.t[s]

class TwoHeads(nn.Module):
    def __init__(self): super().__init__(); self.cls, self.seg = nn.Linear(3*6*6, 5), nn.Conv2d(3, 2, 1)
    def forward(self, x): return torch.cat([self.cls(x.flatten(1)), self.seg(x).flatten(1)], 1) # (N, 4 + 1 + 2*36)

def multi_loss(kind):
    def loss(pred, c, t, reduction='mean'):
        l = F.cross_entropy(pred[:, :4], c, reduction='none')
        if kind == 'reg': l = l + (pred[:, 4] - t) ** 2
        else: l = l + F.cross_entropy(pred[:, 5:].view(len(t), 2, 6, 6), t, reduction='none').mean((1, 2))
        return l.mean() if reduction == 'mean' else l.sum() if reduction == 'sum' else l
    return loss

@pytest.mark.parametrize('kind,mixer', [('reg', MixUp), ('mask', CutMix), ('mask', lambda: CutMix(per_sample=True))], ids=['mixup-regression', 'cutmix-mask', 'cutmix-per-sample-mask'])
def test_several_targets(kind, mixer):
    ds = MultiDS(kind)
    dls = DataLoaders(DataLoader(ds, bs=None), DataLoader(ds, bs=None))
    dls.n_inp = 1
    spy = MixSpy()
    learn = Learner(dls, TwoHeads(), loss_func=multi_loss(kind), cbs=[mixer(), spy])
    learn.fit(1, lr=0)
    for r in spy.records:
        (c, t), (cm, tm), perm, pred = r['y'], r['ym'], r['perm'], r['pred']
        lam = r['lam'] if isinstance(r['lam'], torch.Tensor) else torch.full((len(c),), r['lam'])
        eq_(cm, c) # the class index is kept; the other target was mixed with the inputs
        if kind == 'reg': close_(tm, lam * t + (1 - lam) * t[perm])
        ce = F.cross_entropy(pred[:, :4], c, reduction='none'), F.cross_entropy(pred[:, :4], c[perm], reduction='none')
        other = (pred[:, 4] - tm) ** 2 if kind == 'reg' else F.cross_entropy(pred[:, 5:].view(len(c), 2, 6, 6), tm, reduction='none').mean((1, 2))
        close_(r['loss'], (lam * ce[0] + (1 - lam) * ce[1] + other).mean(), eps=1e-5) # the mixed target counts once, whole

# ---- 3. the mixed loss is normalised as the loss normalises ----

W = torch.tensor([1., 5., .2, 2.])
LOSSES = {'class-weights': CrossEntropyLossFlat(weight=W), 'plain-weights': nn.CrossEntropyLoss(weight=W),
          'ignore-index': nn.CrossEntropyLoss(ignore_index=0), 'weights-and-ignore': CrossEntropyLossFlat(weight=W, ignore_index=2),
          'smoothing-weights': nn.CrossEntropyLoss(weight=W, label_smoothing=.1),
          'sum-function': partial(F.cross_entropy, reduction='sum'), 'weighted-partial': partial(F.cross_entropy, weight=W)}

def unmixed_losses(lf, mixer):
    "The losses of a fit with a mixer that mixes nothing (every share 1), and of the same fit without it"
    res = []
    for cbs in ([mixer], []):
        with no_random(0): learn = synth_learner(loss_func=lf, cbs=cbs)
        with no_random(1): learn.fit(1, lr=0)
        res.append(torch.stack(learn.recorder.losses))
    return res

@pytest.mark.parametrize('name', list(LOSSES))
@pytest.mark.parametrize('mixer', [lambda: MixUp(p=1e-9), lambda: CutMix(per_sample=True, p=1e-9), lambda: CutMix(minmax=(0, 0))],
                         ids=['mixup', 'cutmix-per-sample', 'cutmix'])
def test_nothing_mixed_is_the_loss(name, mixer):
    got, expected = unmixed_losses(LOSSES[name], mixer())
    close_(got, expected, eps=1e-5)

@pytest.mark.parametrize('name', ['class-weights', 'ignore-index', 'weights-and-ignore', 'smoothing-weights'])
def test_weighted_mixed_loss(name):
    "Per-sample shares: the mixed losses over the mixed class weights; one share: each term normalised by the loss itself"
    lf, g = LOSSES[name], torch.Generator().manual_seed(0)
    pred, y = torch.randn(12, 4, generator=g), torch.randint(0, 4, (12,), generator=g)
    perm, lam = torch.randperm(12, generator=g), torch.rand(12, generator=g)
    f = getattr(lf, 'func', lf)
    w = lambda t: (W[t] if f.weight is not None else torch.ones(12)) * (t != f.ignore_index)
    l = lambda t: F.cross_entropy(pred, t, weight=f.weight, ignore_index=f.ignore_index, label_smoothing=f.label_smoothing, reduction='none')
    expected = (lam * l(y) + (1 - lam) * l(y[perm])).sum() / (lam * w(y) + (1 - lam) * w(y[perm])).sum()
    close_(mix_loss(lf, pred, (y,), (y[perm],), lam), expected)
    close_(mix_loss(lf, pred, (y,), (y[perm],), .3), .3 * lf(pred, y) + .7 * lf(pred, y[perm]))

def test_fastai_label_smoothing_with_weights_refused():
    from fastai.losses import LabelSmoothingCrossEntropyFlat
    learn = synth_learner(loss_func=LabelSmoothingCrossEntropyFlat(weight=W), cbs=MixUp())
    lf = learn.loss_func
    with pytest.raises(TypeError, match=r"LabelSmoothingCrossEntropy with class weights.*CrossEntropyLossFlat\(weight=..., label_smoothing=...\)"): learn.fit(1)
    assert learn.loss_func is lf
    spy = MixSpy() # one share per batch: the loss is called as it is, exactly
    synth_learner(loss_func=LabelSmoothingCrossEntropyFlat(weight=W), cbs=[CutMix(), spy]).fit(1)
    assert spy.records

# ---- 4. MixChoice honours its mixers' stop_pct and a scheduled mix_alpha ----

def test_mixchoice_stop_pct_of_its_mixers():
    spy = MixSpy()
    learn = synth_learner(cbs=[MixChoice([MixUp(stop_pct=.5)]), spy], n=64, bs=16)
    learn.fit(2, lr=0)
    eq_([r['perm'] is not None and isinstance(r['lam'], torch.Tensor) for r in spy.records], [True] * 4 + [False] * 4)
    spy = MixSpy()
    learn = synth_learner(cbs=[MixChoice([MixUp(stop_pct=.5), CutMix()], per_sample=True), spy], n=64, bs=16)
    with no_random(0): learn.fit(2, lr=0)
    for r in spy.records[4:]: # only CutMix left: every sample is pasted or its own
        assert ((r['xm'] == r['x']) | (r['xm'] == r['x'][r['perm']])).all()

def test_mixchoice_scheduled_alpha_reaches_its_mixers():
    class ASpy(Callback):
        order = MixHandler.order + 1
        def before_fit(self): self.seen = []
        def before_batch(self):
            if self.training: m = self.learn.mix_choice.mixers; self.seen.append((m[0].current('alpha'), m[1].current('alpha'), m[0].current('p'), self.learn.mix_choice.current('p')))
    learn = synth_learner(cbs=[MixChoice([MixUp(p=.7), CutMix()]), ASpy()], n=64, bs=16)
    learn.fit(1, lr=0, cbs=ParamScheduler({'mix_alpha': SchedLin(.2, 1.), 'mix_p': SchedNo(.5, .5)}))
    close_([s[0] for s in learn.a_spy.seen], [.2, .4, .6, .8])
    close_([s[1] for s in learn.a_spy.seen], [.2, .4, .6, .8])
    eq_({s[2] for s in learn.a_spy.seen}, {.7}) # a mixer's own p stays its own: mix_p is the choice's
    eq_({s[3] for s in learn.a_spy.seen}, {.5})
    eq_([m.current('alpha') for m in learn.mix_choice.mixers], [.4, 1.]) # after the fit: their own again

# ---- 5. p=0 trains exactly as without the callback, dropout and all ----

@pytest.mark.parametrize('mixer', [lambda: MixChoice([MixUp(), CutMix()], p=0), lambda: MixChoice([MixUp(), CutMix()], p=0, per_sample=True),
                                   lambda: MixUp(p=0), lambda: CutMix(p=0), lambda: ResizeMix(per_sample=True, p=0),
                                   lambda: MixChoice([MixUp(stop_pct=0), CutMix(stop_pct=0)])],
                         ids=['choice', 'choice-per-sample', 'mixup', 'cutmix', 'resizemix-per-sample', 'choice-all-stopped'])
def test_p0_is_no_callback_with_dropout(mixer):
    def losses(cbs):
        with no_random(0):
            learn = synth_learner(cbs=cbs)
            learn.model = nn.Sequential(nn.Flatten(), nn.Dropout(.5), nn.Linear(3 * 8 * 8, 4))
        with no_random(1): learn.fit(2)
        return learn.recorder.losses
    eq_(losses([mixer()]), losses([]))

# ---- 9. a callback that fails after the swap leaves a loss that works everywhere ----

class FailAfterPred(Callback):
    order = MixHandler.order + 1
    def __init__(self): self.armed = True
    def after_pred(self):
        if self.training and self.armed: self.armed = False; raise RuntimeError('boom in after_pred')

def test_failing_callback_after_the_swap(tmp_path):
    lf = CrossEntropyLossFlat()
    learn = synth_learner(loss_func=lf, cbs=[MixUp(), FailAfterPred()])
    with pytest.raises(RuntimeError, match='boom in after_pred'): learn.fit(1)
    assert isinstance(learn.loss_func, MixedLoss) and learn.loss_func.reduction == 'mean' # stands for lf
    pred, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
    eq_(learn.loss_func(pred, y), lf(pred, y)) # any other call is the original loss
    learn.export(tmp_path/'l.pkl')
    loaded = load_learner(tmp_path/'l.pkl')
    assert type(loaded.loss_func) is CrossEntropyLossFlat
    ref = synth_learner(loss_func=CrossEntropyLossFlat())
    ref.model.load_state_dict(learn.model.state_dict())
    _, _, expected = ref.get_preds(with_loss=True)
    _, _, got = loaded.get_preds(dl=learn.dls.valid, with_loss=True)
    close_(got, expected)
    _, _, got = learn.get_preds(with_loss=True) # on the same learner: the original loss is back
    close_(got, expected)
    assert learn.loss_func is lf
    learn.fit(1) # and training goes on normally
    assert learn.loss_func is lf

def test_failing_callback_after_the_swap_one_fit():
    "A mixer given to one fit is removed however the fit ends, and gives the loss back as it goes"
    lf = CrossEntropyLossFlat()
    learn = synth_learner(loss_func=lf, cbs=FailAfterPred())
    with pytest.raises(RuntimeError, match='boom in after_pred'): learn.fit(1, cbs=MixUp())
    assert learn.loss_func is lf

# ---- 10. the contract for writing a mixer, and its example (nbs/01_callback.ipynb, "Writing a mixer") ----

def readme_example():
    "The example mixer as nbs/01_callback.ipynb states it: the class of its code cell, up to the first blank line"
    nb = json.loads((Path(__file__).parent.parent / 'nbs' / '01_callback.ipynb').read_text())
    src = next(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code' and 'class BatchMixUp(MixHandler)' in ''.join(c['source']))
    return src.split('\n\n')[0] + '\n'

def test_readme_subclass_example():
    ns = {}
    exec("import torch\nfrom fastai_mix import *\n" + readme_example(), ns)
    mixer, spy = ns['BatchMixUp'](alpha=1.), MixSpy()
    learn = synth_learner(cbs=[mixer, spy], n=64, bs=16)
    lf = learn.loss_func
    learn.fit(1, lr=0)
    assert learn.loss_func is lf
    for r in spy.records:
        ok = moved(r['perm'])
        close_(blend_shares(r['x'], r['xm'], r['perm'])[ok], torch.full((int(ok.sum()),), r['lam']), eps=1e-4)
        ce = F.cross_entropy
        close_(r['loss'], r['lam'] * ce(r['pred'], r['y'][0]) + (1 - r['lam']) * ce(r['pred'], r['y'][0][r['perm']]), eps=1e-5)
    mixer, spy = ns['BatchMixUp'](), MixSpy() # dense targets are blended with the same share
    learn = synth_learner(loss_func=nn.BCEWithLogitsLoss(), multi_label=True, cbs=[mixer, spy])
    learn.fit(1, lr=0)
    for r in spy.records: close_(r['ym'][0], r['lam'] * r['y'][0] + (1 - r['lam']) * r['y'][0][r['perm']])

# ---- 13. the callbacks' arguments ----

@pytest.mark.parametrize('w', [[np.float32(1), np.int64(2)], [torch.tensor(1.), torch.tensor(2)], np.array([1., 2.]), (1, 2.5)])
def test_mixchoice_weights_any_real_numbers(w):
    m = MixChoice([MixUp(), CutMix()], weights=w)
    close_(sum(m.weights), 1.)

@pytest.mark.parametrize('w', [[1, float('nan')], [1, -1], [True, 1], ['1', 1], [torch.tensor([1., 2.]), 1], [0, 0], [1]])
def test_mixchoice_bad_weights(w):
    with pytest.raises(ValueError, match=r"weights must be 2 finite numbers >= 0, not all 0, one per mixer; got"): MixChoice([MixUp(), CutMix()], weights=w)

@pytest.mark.parametrize('make', [lambda v: CutMix(per_sample=v), lambda v: ResizeMix(per_sample=v), lambda v: MixChoice([MixUp()], per_sample=v)])
@pytest.mark.parametrize('v', ['False', 0, 1, None, 'yes'])
def test_per_sample_must_be_a_bool(make, v):
    with pytest.raises(TypeError, match=rf"per_sample must be True or False, got {re.escape(repr(v))}"): make(v)

@pytest.mark.parametrize('mixer', [lambda: MixChoice([MixUp(), CutMix()]), lambda: MixChoice([MixUp(), CutMix()], per_sample=True), MixUp, CutMix])
def test_non_tensor_input_named(mixer):
    "An input that is not a tensor is named, with its position and type"
    with pytest.raises(TypeError, match=r"must be a tensor or a sequence of tensors, but x\w?\[1\] is a list: \[1, 2\]"):
        mixer().mix((torch.randn(2, 3, 4, 4), [1, 2]), (torch.tensor([0, 1]),))
