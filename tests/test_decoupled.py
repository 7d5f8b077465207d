"The decoupled mixup loss (`decoupled=eta`) and the multi-label union of targets (`label_mode='union'`): core, mixers, MixCollate, demo"
import inspect, math, pickle
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from fastcore.test import test_close as close_, test_eq as eq_
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat, FocalLossFlat, BCEWithLogitsLossFlat
from torch.utils.data import DataLoader, TensorDataset
from fastai_mix import MixUp, CutMix, ResizeMix, MixChoice
from fastai_mix.core import mix_loss, decoupled_loss, union_mix, mixup, cutmix, resizemix, MixCollate
from fastai_mix.fmix import FMix, fmix
from fastai_mix.manifold import ManifoldMixup, OutputMixup
from fastai_mix.demo import make_mixer, run_demo, demo_parser
from fastai_mix.test_utils import synth_learner, MixSpy

def by_hand(pred, y, y1, lam, weight=None):
    "The decoupled term per sample, written out: -(lam*w[a]*log p(a | not b) + (1-lam)*w[b]*log p(b | not a)), 0 for an unmixed sample"
    out = []
    for i in range(len(y)):
        a, b, l = int(y[i]), int(y1[i]), float(lam[i] if isinstance(lam, torch.Tensor) else lam)
        z = pred[i].double().tolist()
        if a == b or l in (0., 1.): out.append(0.); continue
        lse = lambda skip: math.log(sum(math.exp(v) for k, v in enumerate(z) if k != skip))
        w = (lambda c: 1.) if weight is None else (lambda c: float(weight[c]))
        out.append(-(l * w(a) * (z[a] - lse(b)) + (1 - l) * w(b) * (z[b] - lse(a))))
    return torch.tensor(out)

def batch(n=8, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred, y = torch.randn(n, c, generator=g) * 2, torch.randint(0, c, (n,), generator=g)
    perm = torch.randperm(n, generator=g)
    y[perm[0]] = y[0] # one sample mixed with its own class: nothing to decouple
    return pred, y, y[perm]

LAMS = {'batch': .7, 'sample': torch.tensor([.9, .6, 1., .75, .5, 0., .55, .8])} # share 1: left alone; 0: all the partner

@pytest.mark.parametrize('lam', LAMS, ids=str)
@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
def test_against_the_formula(lam, reduction):
    pred, y, y1 = batch()
    lam, ce, eta = LAMS[lam], nn.CrossEntropyLoss(reduction=reduction), .3
    ref = by_hand(pred, y, y1, lam).float()
    ref = ref.mean() if reduction == 'mean' else ref.sum() if reduction == 'sum' else ref
    close_(decoupled_loss(ce, pred, (y,), (y1,), lam), ref, eps=1e-5)
    if reduction != 'none' or isinstance(lam, torch.Tensor): # ('none' with one share for the batch: the loss itself decides the shape)
        close_(mix_loss(ce, pred, (y,), (y1,), lam, decoupled=eta), mix_loss(ce, pred, (y,), (y1,), lam) + eta * ref, eps=1e-5)

@pytest.mark.parametrize('lam', LAMS, ids=str)
def test_class_weights_and_ignore_index(lam):
    pred, y, y1 = batch()
    lam, w = LAMS[lam], torch.tensor([1., 3., .5, 2., 1.5])
    d = by_hand(pred, y, y1, lam, w).float()
    if isinstance(lam, torch.Tensor): ref = d.sum() / (lam * w[y] + (1 - lam) * w[y1]).sum() # as the mixed loss: over the mixed weights
    else: # one share: each part over its own targets' weights, as the loss does
        da, db = by_hand(pred, y, y1, 1. - 1e-12, w).float(), by_hand(pred, y1, y, 1. - 1e-12, w).float() # each class's part alone
        ref = lam * da.sum() / w[y].sum() + (1 - lam) * db.sum() / w[y1].sum()
    close_(decoupled_loss(nn.CrossEntropyLoss(weight=w), pred, (y,), (y1,), lam), ref, eps=1e-5)
    ign = y.clone(); ign[1] = -100 # an ignored target: its sample adds nothing and is not counted
    keep = torch.arange(len(y)) != 1
    got = decoupled_loss(nn.CrossEntropyLoss(ignore_index=-100, reduction='sum'), pred, (ign,), (y1,), lam)
    close_(got, by_hand(pred[keep], y[keep], y1[keep], lam[keep] if isinstance(lam, torch.Tensor) else lam).sum(), eps=1e-5)

@pytest.mark.parametrize('lam', LAMS, ids=str)
@pytest.mark.parametrize('loss_func', [nn.CrossEntropyLoss(), CrossEntropyLossFlat(), nn.CrossEntropyLoss(weight=torch.rand(5) + .5),
                                       nn.CrossEntropyLoss(ignore_index=2), CrossEntropyLossFlat(reduction='sum'), LabelSmoothingCrossEntropyFlat()],
                         ids=['ce', 'flat', 'weighted', 'ignore', 'sum', 'smooth'])
def test_zero_is_the_plain_loss_bit_for_bit(lam, loss_func):
    pred, y, y1 = batch()
    pred.requires_grad_(True)
    lam = LAMS[lam]
    a, b = mix_loss(loss_func, pred, (y,), (y1,), lam, decoupled=0.), mix_loss(loss_func, pred, (y,), (y1,), lam)
    assert torch.equal(a, b)
    ga, = torch.autograd.grad(a, pred); gb, = torch.autograd.grad(b, pred)
    assert torch.equal(ga, gb)
    assert torch.equal(mix_loss(loss_func, pred, (y,), (y1,), torch.ones(8), decoupled=.5), loss_func(pred, y)) # nothing mixed: the loss itself

def test_label_smoothing_stays_on_the_mixed_loss():
    pred, y, y1 = batch()
    lam = LAMS['sample']
    ls = nn.CrossEntropyLoss(label_smoothing=.1)
    close_(mix_loss(ls, pred, (y,), (y1,), lam, decoupled=.2) - mix_loss(ls, pred, (y,), (y1,), lam), .2 * by_hand(pred, y, y1, lam).mean(), eps=1e-5)

@pytest.mark.parametrize('make,eta', [(lambda **kw: CutMix(**kw), 1.), (lambda **kw: MixUp(**kw), .5),
                                      (lambda **kw: MixChoice([MixUp(), CutMix()], per_sample=True, **kw), .2)],
                         ids=['cutmix', 'mixup', 'choice-per-sample'])
def test_through_fit(make, eta):
    spy = MixSpy()
    learn = synth_learner(cbs=[make(decoupled=eta), spy], n=32, bs=8)
    lf = learn.loss_func
    learn.fit(1, lr=1e-2)
    assert learn.loss_func is lf and len(spy.records) == 4
    some = False
    for r in spy.records:
        y, lam = r['y'][0], r['lam']
        y1 = y[r['perm']]
        plain = mix_loss(lf, r['pred'], (y,), (y1,), lam)
        dm = by_hand(r['pred'], y, y1, lam).mean()
        close_(r['loss'], plain + eta * dm, eps=1e-5)
        some |= bool(dm > 0)
    assert some # the term did count
    assert math.isfinite(learn.recorder.losses[-1])

def test_refused_at_the_first_batch():
    for lf in (FocalLossFlat(), nn.MultiMarginLoss()):
        learn = synth_learner(loss_func=lf, cbs=CutMix(decoupled=.1))
        with pytest.raises(TypeError, match=r"CutMix\(decoupled=0.1\): decoupled > 0 .* needs a cross-entropy loss on logits"): learn.fit(1)
        assert learn.loss_func is lf and learn.cut_mix.yb1 is None and learn.cut_mix.perm is None # refused before any draw
    learn = synth_learner(loss_func=BCEWithLogitsLossFlat(), multi_label=True, cbs=MixUp(decoupled=.1))
    with pytest.raises(ValueError, match=r"MixUp\(decoupled=0.1\) .* needs one target of class indices"): learn.fit(1)
    pred, y, y1 = batch()
    with pytest.raises(TypeError, match='needs a cross-entropy loss on logits'): mix_loss(nn.BCEWithLogitsLoss(), pred, (y,), (y1,), .5, decoupled=.1)
    with pytest.raises(ValueError, match=r'prediction \(N, C\)'): mix_loss(nn.CrossEntropyLoss(), pred[:, :, None], (y,), (y1,), .5, decoupled=.1)

@pytest.mark.parametrize('make', [MixUp, CutMix, ResizeMix, FMix, ManifoldMixup, OutputMixup, lambda **kw: MixChoice([MixUp()], **kw)],
                         ids=['mixup', 'cutmix', 'resizemix', 'fmix', 'manifold', 'output', 'choice'])
def test_construction(make):
    for v in (-1, float('nan'), float('inf'), 'a', True, None):
        with pytest.raises(ValueError, match=rf"decoupled must be a finite number >= 0.*got {v!r}"): make(decoupled=v)
    for v in ('max', 'Union', 1, None):
        with pytest.raises(ValueError, match=rf"label_mode must be 'blend' .* or 'union' .*got {v!r}"): make(label_mode=v)
    m = make(decoupled=.25, label_mode='union')
    eq_((m.decoupled, m.label_mode), (.25, 'union'))
    sig = inspect.signature(type(m).__init__).parameters # @delegates: the options show in the signature, keyword-only
    eq_([(sig[k].kind, sig[k].default) for k in ('decoupled', 'label_mode')], [(inspect.Parameter.KEYWORD_ONLY, 0.), (inspect.Parameter.KEYWORD_ONLY, 'blend')])
    assert 'kwargs' not in sig and repr(m) and pickle.loads(pickle.dumps(m)).decoupled == .25

def test_choice_owns_the_options():
    with pytest.raises(ValueError, match=r"MixChoice applies its own .* but CutMix\(decoupled=0.1\) sets its own"): MixChoice([MixUp(), CutMix(decoupled=.1)])
    with pytest.raises(ValueError, match=r"MixUp\(label_mode='union'\)"): MixChoice([MixUp(label_mode='union')])
    assert 'alpha' not in inspect.signature(MixChoice.__init__).parameters

# label_mode='union'

Y = torch.tensor([[1., 0., 0., 0.], [0., 1., 0., 1.], [0., 0., 1., 0.], [1., 1., 0., 0.]])

def test_union_by_hand():
    perm = torch.tensor([1, 2, 3, 0])
    eq_(union_mix(Y, perm, .6), torch.tensor([[1., 1., 0., 1.], [0., 1., 1., 1.], [1., 1., 1., 0.], [1., 1., 0., 0.]]))
    eq_(union_mix(Y, perm, torch.tensor([.6, 1., 0., .5])), torch.tensor([[1., 1., 0., 1.], [0., 1., 0., 1.], [1., 1., 0., 0.], [1., 1., 0., 0.]]))
    eq_(union_mix(Y, perm, 1.), Y); eq_(union_mix(Y, perm, 0.), Y[perm])

def expected_union(y, perm, lam):
    lam = lam if isinstance(lam, torch.Tensor) else torch.full((len(y),), float(lam))
    return torch.stack([y[i] if lam[i] == 1 else y[perm[i]] if lam[i] == 0 else torch.maximum(y[i], y[perm[i]]) for i in range(len(y))])

@pytest.mark.parametrize('f,kw', [(mixup, dict(p=.5)), (cutmix, {}), (cutmix, dict(per_sample=True)), (resizemix, {}), (fmix, dict(per_sample=True))],
                         ids=['mixup', 'cutmix', 'cutmix-per-sample', 'resizemix', 'fmix'])
def test_union_functional(f, kw):
    x, y = torch.rand(4, 3, 8, 8), Y.clone()
    (xm, ym), perm, lam = f(x, y=y, label_mode='union', generator=torch.Generator().manual_seed(1), **kw)
    eq_(ym, expected_union(Y, perm, lam)); eq_(y, Y) # the user's targets are not written
    (xb, yb), _, _ = f(x, y=y, generator=torch.Generator().manual_seed(1), **kw) # the same draws blend
    eq_(xb, xm); assert not torch.equal(yb, ym)
    with pytest.raises(ValueError, match=r"label_mode='union' takes the union .* target 0 holds class indices"):
        f(x, y=torch.tensor([0, 1, 2, 3]), label_mode='union', **kw)
    with pytest.raises(ValueError, match="label_mode must be"): f(x, y=y, label_mode='max', **kw)

@pytest.mark.parametrize('make', [lambda: MixUp(label_mode='union'), lambda: CutMix(per_sample=True, label_mode='union'), lambda: FMix(label_mode='union'),
                                  lambda: OutputMixup(label_mode='union'), lambda: MixChoice([MixUp(), CutMix()], per_sample=True, label_mode='union')],
                         ids=['mixup', 'cutmix', 'fmix', 'output', 'choice'])
def test_union_through_fit(make):
    spy = MixSpy()
    learn = synth_learner(loss_func=BCEWithLogitsLossFlat(), multi_label=True, cbs=[make(), spy], n=16, bs=8)
    learn.fit(1, lr=1e-2)
    for r in spy.records:
        eq_(r['ym'][0], expected_union(r['y'][0], r['perm'], r['lam']))

def test_union_of_class_indices_refused_at_the_first_batch():
    learn = synth_learner(cbs=CutMix(label_mode='union'))
    with pytest.raises(ValueError, match=r"CutMix\(label_mode='union'\) .* target 0 holds class indices"): learn.fit(1)
    assert learn.cut_mix.perm is None

def test_mix_collate_union():
    ds = TensorDataset(torch.rand(8, 3, 8, 8), torch.cat([Y, Y]))
    g = torch.Generator().manual_seed(0)
    x, ym = next(iter(DataLoader(ds, batch_size=8, collate_fn=MixCollate(mixup, label_mode='union', generator=g))))
    _, perm, lam = mixup(torch.stack([d[0] for d in ds]), generator=torch.Generator().manual_seed(0)) # the collate's draws again
    eq_(ym, expected_union(torch.cat([Y, Y]), perm, lam))
    idx = TensorDataset(torch.rand(8, 3, 8, 8), torch.tensor([0, 1, 2, 3] * 2))
    x, y2 = next(iter(DataLoader(idx, batch_size=8, collate_fn=MixCollate(cutmix, num_classes=4, label_mode='union')))) # one-hot first: two-hot
    assert set(y2.sum(1).tolist()) <= {1., 2.} and ((y2 == 0) | (y2 == 1)).all()
    with pytest.raises(ValueError, match="target 0 holds class indices"):
        next(iter(DataLoader(idx, batch_size=8, collate_fn=MixCollate(cutmix, label_mode='union'))))
    with pytest.raises(TypeError, match="refuses them"): MixCollate(cutmix, label_mod='union')

def test_demo_decoupled(tmp_path):
    m = make_mixer('cutmix+dm', decoupled=.1)
    assert isinstance(m, CutMix) and m.decoupled == .1 and make_mixer('cutmix').decoupled == 0
    with pytest.raises(ValueError, match="needs decoupled > 0"): make_mixer('mixup+dm')
    with pytest.raises(ValueError, match="mixer must be one of"): make_mixer('none+dm', decoupled=.1)
    eq_(demo_parser().parse_args(['demo', '--decoupled', '0.1']).decoupled, .1)
    eq_(demo_parser().parse_args(['demo']).decoupled, 0.) # off by default
    with pytest.raises(SystemExit): demo_parser().parse_args(['demo', '--decoupled', '-1'])
    res = run_demo(mix=('none', 'cutmix'), decoupled=.1, epochs=1, n_train=48, size=8, bs=16, seeds=1, out=tmp_path, jobs=1, progress=False)
    eq_([r['mixer'] for r in res['runs']], ['none', 'cutmix', 'cutmix+dm'])
    eq_(res['settings']['decoupled'], .1)
    assert 'With the decoupled loss (eta=0.1) against the same mixer without it' in (tmp_path/'results.md').read_text()
