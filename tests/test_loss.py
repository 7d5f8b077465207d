"""The mixed loss: `mix_loss` with per-sample and batch shares and every reduction; normalised as the loss normalises
(class weights, ignore_index, label smoothing) through a fit; several targets, of which only class indices get the
partner's; exactly the loss when nothing is mixed. (The decoupled loss: tests/test_decoupled.py.)"""
from functools import partial
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from fastcore.test import test_close as close_, test_eq as eq_
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import no_random
from fastai_mix import MixHandler, MixUp, CutMix, mix_loss
from fastai_mix.core import reduce_loss
from fastai_mix.test_utils import synth_learner, MixSpy

def test_mix_loss_per_sample_and_sequence_targets():
    "A per-sample share weighs every element of that sample's unreduced loss"
    pred, y = torch.randn(4, 5, 3), torch.randint(0, 3, (4, 5))
    perm, lam = torch.tensor([2, 3, 0, 1]), torch.tensor([.9, .6, .8, .5])
    from fastai.losses import CrossEntropyLossFlat
    lf = CrossEntropyLossFlat()
    got = mix_loss(lf, pred, (y,), (y[perm],), lam)
    ce = lambda t: F.cross_entropy(pred.transpose(1, 2), t, reduction='none') # (4, 5)
    close_(got, (lam[:, None]*ce(y) + (1-lam[:, None])*ce(y[perm])).mean())

def test_mix_loss_reductions():
    pred, y, perm = torch.randn(6, 3), torch.randint(0, 3, (6,)), torch.tensor([1, 0, 3, 2, 5, 4])
    for red in ('mean', 'sum', 'none'):
        lf = torch.nn.CrossEntropyLoss(reduction=red)
        got = mix_loss(lf, pred, (y,), (y[perm],), .3)
        exp = .3*F.cross_entropy(pred, y, reduction='none') + .7*F.cross_entropy(pred, y[perm], reduction='none')
        close_(got, reduce_loss(exp, red)); eq_(lf.reduction, red)

# ---- normalised as the loss normalises: class weights, ignore_index, label smoothing ----

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

# ---- nothing mixed, one share per sample: exactly the loss ----

@pytest.mark.parametrize('lf', [lambda: nn.CrossEntropyLoss(), lambda: nn.CrossEntropyLoss(weight=torch.tensor([.3, 1., 2., .7])),
                                lambda: CrossEntropyLossFlat(ignore_index=1), lambda: CrossEntropyLossFlat(weight=torch.tensor([.3, 1., 2., .7]), ignore_index=2),
                                lambda: nn.CrossEntropyLoss(weight=torch.tensor([.3, 1., 2., .7]), reduction='sum')],
                         ids=['ce', 'weight', 'ignore', 'weight-ignore', 'sum'])
def test_nothing_mixed_per_sample_is_exactly_the_loss(lf):
    g = torch.Generator().manual_seed(0)
    for bs in (3, 16, 37, 64, 5, 8, 13, 24, 31, 50, 100, 128):
        pred, y = torch.randn(bs, 4, generator=g), torch.randint(0, 4, (bs,), generator=g)
        perm, f = torch.randperm(bs, generator=g), lf()
        assert mix_loss(f, pred, (y,), (y[perm],), torch.ones(bs)) == f(pred, y) # exactly, not to rounding

def test_nothing_mixed_per_sample_exact_through_the_learner():
    "MixUp(p=1e-6): its batches go through the per-sample mixed loss but nothing is mixed, so the loss is the weighted loss itself, exactly"
    class PlainLosses(Callback):
        order = MixHandler.order + 1
        def before_fit(self): self.recs = []
        def after_loss(self):
            if self.training: self.recs.append((self.learn.loss.detach(), self.learn.pred.detach(), self.learn.yb[0]))
    lf, rec = CrossEntropyLossFlat(weight=torch.tensor([.3, 1., 2., .7])), PlainLosses()
    with no_random(0): learn = synth_learner(loss_func=lf, cbs=[MixUp(p=1e-6), rec], n=96, bs=32)
    learn.fit(1, lr=0)
    assert len(rec.recs) == 3
    for loss, pred, y in rec.recs: assert loss == lf(pred, y)

# ---- several targets: only class indices get the partner's target ----

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
