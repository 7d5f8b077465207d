"The callback contract on a real fastai Learner: losses, restoration on every way out, batches, dtypes, export, agreement with fastai; fastai's own mixers refused, the loss stand-in, a mixer for one fit, what a subclass's `mix` returns"
import json, pickle, re
from pathlib import Path
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from fastcore.test import test_close as close_, test_eq as eq_
from fastai.callback.core import Callback, CancelFitException, CancelTrainException, CancelEpochException, CancelBatchException
from fastai.losses import (CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat, FocalLossFlat, BCEWithLogitsLossFlat, MSELossFlat)
from fastai.learner import Learner, load_learner
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.torch_core import no_random, set_seed
import fastai.callback.schedule  # noqa: F401  (fit_one_cycle, lr_find)
import fastai.callback.fp16  # noqa: F401  (to_fp16, to_bf16)
from fastai.callback.mixup import MixUp as FastaiMixUp, CutMix as FastaiCutMix
from fastai_mix import MixHandler, MixUp, CutMix, ResizeMix, MixChoice, lerp_mix
from fastai_mix.callback import MixedLoss
from fastai_mix.test_utils import synth_learner, synth_dls, synth_seg_learner, MixSpy, blend_shares, paste_shares

MIXERS = [MixUp, CutMix, ResizeMix]
def moved(perm): return perm != torch.arange(len(perm), device=perm.device)
def mixers_on(learn): return learn.cbs.filter(lambda o: isinstance(o, MixHandler))

def share_from_pixels(mixer, r):
    "The share of each original sample, read from the pixels (None where a sample is its own partner)"
    if isinstance(mixer, MixUp): return blend_shares(r['x'], r['xm'], r['perm'])
    if isinstance(mixer, CutMix): return paste_shares(r['x'], r['xm'], r['perm'])
    changed = (r['xm'] != r['x']).flatten(2).any(1).float().mean(1) # ResizeMix: the box, up to equal pixels
    return 1 - changed

def run(mixer, loss_func=None, **kwargs):
    spy = MixSpy()
    learn = synth_learner(loss_func=loss_func, cbs=[mixer, spy], **kwargs)
    learn.fit(1, lr=0)
    return learn, spy.records

@pytest.mark.parametrize('mixer', MIXERS)
@pytest.mark.parametrize('loss_func', [CrossEntropyLossFlat(), LabelSmoothingCrossEntropyFlat(), FocalLossFlat(), nn.CrossEntropyLoss(),
                                       CrossEntropyLossFlat(reduction='sum')], ids=['ce', 'ls', 'focal', 'plain-ce', 'ce-sum'])
def test_index_loss_share_is_pixel_share(mixer, loss_func):
    mixer = mixer()
    learn, recs = run(mixer, loss_func, shape=(3, 12, 16))
    assert learn.loss_func is loss_func
    for r in recs:
        lam = r['lam'] if isinstance(r['lam'], torch.Tensor) else torch.full((len(r['perm']),), r['lam'])
        ok = moved(r['perm'])
        close_(share_from_pixels(mixer, r)[ok], lam[ok], eps=1e-4 if not isinstance(mixer, ResizeMix) else .02)
        y = r['y'][0]
        with torch.no_grad():
            red = getattr(loss_func, 'reduction', 'mean')
            loss_func.reduction = 'none'
            l0, l1 = loss_func(r['pred'], y), loss_func(r['pred'], y[r['perm']])
            loss_func.reduction = red
        exp = lam*l0 + (1-lam)*l1
        close_(r['loss'], exp.sum() if red == 'sum' else exp.mean(), eps=1e-5)
        eq_(r['ym'][0], y) # class-index targets are not touched

@pytest.mark.parametrize('mixer', MIXERS)
def test_dense_targets_mixed(mixer):
    mixer = mixer()
    learn, recs = run(mixer, BCEWithLogitsLossFlat(), multi_label=True)
    for r in recs:
        y, lam = r['y'][0], r['lam']
        w = lam[:, None] if isinstance(lam, torch.Tensor) else lam
        close_(r['ym'][0], w*y + (1-w)*y[r['perm']])
        close_(r['ym'][0].sum(1), torch.ones(len(y)))
        close_(r['loss'], F.binary_cross_entropy_with_logits(r['pred'], r['ym'][0]))

def test_dense_regression_targets():
    dls = synth_dls(n=32, bs=8)
    dls = DataLoaders(*[DataLoader([(x, y.float().view(1)) for x, y in dl.dataset], bs=8, shuffle=dl.shuffle) for dl in (dls.train, dls.valid)])
    spy = MixSpy()
    learn = Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(192, 1)), loss_func=MSELossFlat(), cbs=[MixUp(), spy])
    learn.fit(1, lr=0)
    for r in spy.records: close_(r['ym'][0], r['lam'][:, None]*r['y'][0] + (1-r['lam'][:, None])*r['y'][0][r['perm']])

class Boom(Callback):
    "Raise `exc` at `event` of the `at`-th training batch"
    order = 5
    def __init__(self, event, exc, at=1): self.event, self.exc, self.at, self.n = event, exc, at, 0
    def __getattribute__(self, name):
        if name in ('before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_backward', 'after_step', 'after_batch', 'before_train', 'before_validate') \
           and name == object.__getattribute__(self, 'event'): return object.__getattribute__(self, '_boom')
        return super().__getattribute__(name)
    def _boom(self):
        if not self.training and self.event not in ('before_validate',): return
        self.n += 1
        if self.n >= self.at: raise self.exc

class BoomModel(nn.Module):
    def __init__(self, exc, at=2): super().__init__(); self.lin, self.exc, self.at, self.n = nn.Linear(192, 4), exc, at, 0
    def forward(self, x):
        if self.training:
            self.n += 1
            if self.n >= self.at: raise self.exc
        return self.lin(x.flatten(1))

EXCS = [KeyboardInterrupt(), RuntimeError('boom'), CancelFitException(), CancelTrainException(), CancelEpochException(), CancelBatchException()]
EVENTS = ['before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_backward', 'after_step', 'after_batch']

@pytest.mark.parametrize('mixer', MIXERS)
@pytest.mark.parametrize('event', EVENTS)
@pytest.mark.parametrize('exc', EXCS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize('attached', [True, False], ids=['on-learner', 'for-one-fit'])
def test_loss_restored_however_fit_ends(mixer, event, exc, attached):
    lf = CrossEntropyLossFlat()
    m = mixer()
    learn = synth_learner(loss_func=lf, cbs=[Boom(event, exc, at=2)] + ([m] if attached else []))
    try: learn.fit(2, cbs=None if attached else m)
    except BaseException: pass # fastai lets a cancel raised outside its own block (in after_batch, say) escape
    assert learn.loss_func is lf
    eq_(len(mixers_on(learn)), 1 if attached else 0)
    assert not {'perm', 'lam', 'yb1'} & set(m.__getstate__()) # no batch state goes into an export

@pytest.mark.parametrize('mixer', MIXERS)
@pytest.mark.parametrize('exc', [KeyboardInterrupt(), RuntimeError('boom')], ids=lambda e: type(e).__name__)
def test_loss_restored_when_model_or_loss_raises(mixer, exc):
    lf = CrossEntropyLossFlat()
    learn = synth_learner(loss_func=lf, cbs=mixer())
    learn.model = BoomModel(exc)
    with pytest.raises(type(exc)): learn.fit(1)
    assert learn.loss_func is lf
    class BadLoss(nn.Module):
        y_int, reduction = True, 'mean'
        def forward(self, pred, y): raise exc
    bad = BadLoss()
    learn = synth_learner(loss_func=bad, cbs=mixer())
    with pytest.raises(type(exc)): learn.fit(1)
    assert learn.loss_func is bad and bad.reduction == 'mean'

@pytest.mark.parametrize('mixer', MIXERS)
def test_lr_find_restores(mixer):
    lf = CrossEntropyLossFlat()
    learn = synth_learner(loss_func=lf, cbs=mixer(), n=256)
    learn.lr_find(num_it=20, show_plot=False)
    assert learn.loss_func is lf

class Watch(Callback):
    "Check that evaluation sees the original loss and an unmixed batch"
    order = 1
    def before_fit(self): self.seen = []
    def after_loss(self):
        if not self.training: self.seen.append((self.learn.loss_func, self.learn.xb[0].clone()))

@pytest.mark.parametrize('mixer', MIXERS)
def test_evaluation_never_mixed(mixer):
    lf = CrossEntropyLossFlat()
    w = Watch()
    learn = synth_learner(loss_func=lf, cbs=[mixer(), w])
    x_valid = torch.cat([b[0] for b in learn.dls.valid])
    learn.fit(1)
    assert all(o[0] is lf for o in w.seen) and torch.equal(torch.cat([o[1] for o in w.seen]), x_valid)
    preds, targs, losses = learn.get_preds(with_loss=True)
    ref = synth_learner(loss_func=CrossEntropyLossFlat()); ref.model = learn.model
    close_(losses, ref.get_preds(with_loss=True)[2])
    assert all(o[0] is lf for o in w.seen)
    close_(learn.validate()[0], ref.validate()[0])
    assert learn.loss_func is lf # predict runs through get_preds; it is exercised on image data in test_demo.py

@pytest.mark.parametrize('mixer', MIXERS)
@pytest.mark.parametrize('n,bs', [(17, 8), (1, 1), (5, 1), (9, 4)])
def test_any_batch_size(mixer, n, bs):
    learn, recs = run(mixer(), n=n, bs=bs)
    eq_(sum(len(r['perm']) for r in recs), n)

@pytest.mark.parametrize('mixer', [CutMix, ResizeMix])
@pytest.mark.parametrize('shape', [(2, 30), (3, 10, 14), (1, 6, 8, 10)])
def test_ranks_through_learner(mixer, shape):
    learn, recs = run(mixer(), shape=shape)
    for r in recs: assert 0 <= r['lam'] <= 1 and r['xm'].shape == r['x'].shape

def test_no_spatial_dims_fail_at_first_batch():
    for mixer in (CutMix, ResizeMix):
        lf = CrossEntropyLossFlat()
        learn = synth_learner(loss_func=lf, cbs=mixer(), shape=(12,))
        with pytest.raises(ValueError, match='has none: use MixUp'): learn.fit(1)
        assert learn.loss_func is lf
    synth_learner(cbs=MixUp(), shape=(12,)).fit(1) # MixUp mixes any shape

class TwoInputs(nn.Module):
    def __init__(self): super().__init__(); self.a, self.b = nn.Linear(192, 4), nn.Linear(64, 4)
    def forward(self, x, m, ids): return self.a(x.flatten(1)) + self.b(m.flatten(1))

class SpyAll(Callback):
    order, run_valid = -1, False
    def before_fit(self): self.recs = []
    def before_batch(self): self.x0 = [o.clone() for o in self.learn.xb]
    def after_loss(self): self.recs.append((self.x0, [o.clone() for o in self.learn.xb], self.learn.mixer.perm, self.learn.mixer.lam))

@pytest.mark.parametrize('mixer', MIXERS)
def test_every_input_mixed_alike(mixer):
    g = torch.Generator().manual_seed(0)
    items = [(torch.rand(3, 8, 8, generator=g), torch.rand(1, 8, 8, generator=g), torch.tensor(i), torch.tensor(i % 4)) for i in range(32)]
    dls = DataLoaders(DataLoader(items, bs=8, shuffle=True), DataLoader(items, bs=8))
    dls.n_inp = 3
    m, spy = mixer(), SpyAll()
    learn = Learner(dls, TwoInputs(), loss_func=CrossEntropyLossFlat(), cbs=[m, spy])
    learn.mixer = m
    learn.fit(1, lr=0)
    for (x0, m0, i0), (x1, m1, i1), perm, lam in spy.recs:
        eq_(i1, i0) # integer input untouched
        ok = moved(perm)
        if isinstance(m, MixUp):
            close_(blend_shares(x0, x1, perm)[ok], lam[ok], eps=1e-4); close_(blend_shares(m0, m1, perm)[ok], lam[ok], eps=1e-4)
        else: eq_((x1 != x0).any(1)[ok], (m1 != m0).any(1)[ok])
        if isinstance(m, CutMix):
            close_(paste_shares(m0, m1, perm)[ok], torch.full((int(ok.sum()),), lam))

@pytest.mark.parametrize('mixer', MIXERS)
@pytest.mark.parametrize('precision', ['to_fp16', 'to_bf16'])
def test_mixed_precision(mixer, precision):
    lf = CrossEntropyLossFlat()
    learn = getattr(synth_learner(loss_func=lf, cbs=mixer()), precision)()
    learn.fit(1)
    assert learn.loss_func is lf

class AsFloat(nn.Module):
    def forward(self, x): return x.float()

class ToDtype(Callback):
    order = -2
    def __init__(self, dtype, channels_last=False): self.dtype, self.cl = dtype, channels_last
    def before_batch(self):
        x = self.learn.xb[0].to(self.dtype)
        self.learn.xb = (x.to(memory_format=torch.channels_last) if self.cl else x,)

@pytest.mark.parametrize('mixer', MIXERS)
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32])
def test_half_inputs_and_channels_last_kept(mixer, dtype):
    spy = MixSpy()
    learn = synth_learner(cbs=[ToDtype(dtype, True), mixer(), spy])
    learn.model = nn.Sequential(AsFloat(), learn.model) # the batch is half precision; the model stays float32
    learn.fit(1, lr=0)
    for r in spy.records:
        eq_(r['xm'].dtype, dtype); assert r['xm'].is_contiguous(memory_format=torch.channels_last)
        if isinstance(r['lam'], torch.Tensor): eq_(r['lam'], r['lam'].to(dtype).float())

@pytest.mark.parametrize('mixer', MIXERS)
@pytest.mark.parametrize('seeder', ['no_random', 'set_seed'])
def test_reproducible(mixer, seeder):
    def once():
        spy = MixSpy()
        if seeder == 'no_random':
            with no_random(3): synth_learner(cbs=[mixer(), spy]).fit(1, lr=0)
        else:
            set_seed(3)
            synth_learner(cbs=[mixer(), spy]).fit(1, lr=0) # fastai's DataLoader seeds its shuffling when it is made
        return spy.records
    a, b = once(), once()
    for ra, rb in zip(a, b):
        eq_(ra['xm'], rb['xm']); eq_(ra['perm'], rb['perm']); eq_(ra['lam'], rb['lam'])

@pytest.mark.parametrize('mixer', MIXERS)
def test_export_and_load(mixer, tmp_path):
    lf = CrossEntropyLossFlat()
    learn = synth_learner(loss_func=lf, cbs=mixer())
    learn.path = tmp_path
    learn.fit(1)
    learn.export('m.pkl')
    back = load_learner(tmp_path/'m.pkl')
    assert isinstance(back.loss_func, CrossEntropyLossFlat) and len(mixers_on(back)) == 1
    assert back.loss_func.__class__ is lf.__class__ and back.loss_func.reduction == 'mean'
    pickle.dumps(mixer()) # the callback itself pickles

@pytest.mark.parametrize('mixer', [MixUp, CutMix])
def test_agrees_with_fastai(mixer):
    "Same seed: fastai's MixUp and ours make the same batch and loss; CutMix the same loss for its box"
    import fastai.callback.mixup as fm
    def once(m):
        spy = MixSpy()
        with no_random(11): synth_learner(cbs=[m, spy], shape=(3, 10, 10)).fit(1, lr=0)
        return spy.records
    ours, theirs = once(mixer()), once(getattr(fm, mixer.__name__)())
    for a, b in zip(ours, theirs):
        if mixer is MixUp:
            close_(a['xm'], b['xm']); close_(a['loss'], b['loss'])
        else: # fastai's box is a column or row shorter for odd sides; compare each loss with its own share
            b['perm'] = a['perm'] # fastai's CutMix keeps no perm; the same draws give the same one, checked by the pixels below
            for r in (a, b):
                ok = moved(r['perm'])
                lam = paste_shares(r['x'], r['xm'], r['perm'])[ok].mean()
                close_(r['loss'], lam*F.cross_entropy(r['pred'], r['y'][0]) + (1-lam)*F.cross_entropy(r['pred'], r['y'][0][r['perm']]), eps=1e-5)

def test_two_mixers_refused():
    lf = CrossEntropyLossFlat()
    learn = synth_learner(loss_func=lf, cbs=[MixUp(), CutMix()])
    with pytest.raises(ValueError, match='One mixing callback per learner'): learn.fit(1)
    assert learn.loss_func is lf

class SyncCheck(Callback):
    "Make any host-device sync an error from `before_batch` to `after_loss` (the mixing and the mixed loss)"
    order = -5
    def before_batch(self): torch.cuda.set_sync_debug_mode('error')
    def after_loss(self): torch.cuda.set_sync_debug_mode('default')

def fit_without_sync(learn, n_epoch=1):
    "Fit `learn` on CUDA, failing on any sync while a batch is mixed and its loss computed"
    cb = SyncCheck()
    learn.add_cb(cb)
    try: learn.fit(n_epoch)
    finally: torch.cuda.set_sync_debug_mode('default'); learn.remove_cb(cb)

@pytest.mark.parametrize('kwargs,msg', [(dict(alpha=0), 'alpha must be'), (dict(alpha=float('nan')), 'alpha must be'),
    (dict(lam_min=-1), 'lam_min must be'), (dict(lam_max=2), 'lam_max must be'), (dict(lam_min=.5, lam_max=.4), 'lam_min must be <= lam_max'),
    (dict(interpolation='lanczos'), 'interpolation must be one of')])
def test_resizemix_bad_args(kwargs, msg):
    with pytest.raises(ValueError, match=msg): ResizeMix(**kwargs)

@pytest.mark.parametrize('mixer', MIXERS)
def test_bad_alpha(mixer):
    with pytest.raises(ValueError, match=r"alpha must be a finite number > 0.*got -1"): mixer(alpha=-1)

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('mixer', MIXERS)
@pytest.mark.parametrize('loss_func', [CrossEntropyLossFlat(), BCEWithLogitsLossFlat()], ids=['index', 'dense'])
def test_cuda_no_host_sync(mixer, loss_func):
    "A training step's mixing and mixed loss never wait on the GPU"
    multi = isinstance(loss_func, BCEWithLogitsLossFlat)
    learn = synth_learner(loss_func=loss_func, cbs=mixer(), multi_label=multi, n=64, bs=16, shape=(3, 32, 32))
    learn.dls.to('cuda'); learn.model.cuda()
    m = mixers_on(learn)[0]
    fit_without_sync(learn)
    assert learn.loss_func is loss_func


# ---- The contract, continued: fastai's own mixers refused beside ours, the loss stand-in when a later callback
# cancels or fails, a mixer for one fit, what a subclass's `mix` must return, the example mixer ----

class Mixing(Callback):
    "Record, for each training batch, the names of the mixers that mixed it"
    order, run_valid = MixHandler.order + 1, False
    def __init__(self): self.fits = []
    def before_fit(self): self.seen = []; self.fits.append(self.seen)
    def before_batch(self): self.seen.append([type(cb).__name__ for cb in self.learn.cbs if isinstance(cb, MixHandler) and cb.perm is not None])

def left_as_found(learn, lf, cbs):
    assert learn.loss_func is lf
    eq_(list(learn.cbs), cbs)

# ---- fastai's own mixers (and a fastai extension's) beside one of ours are refused ----

fastxtend_base = type('MixHandlerX', (Callback,), {'__module__': 'fastxtend.multiloss'}) # fastxtend's classes, by module and name only (not installed)
FastxtendCutMixUp = type('CutMixUpAugment', (fastxtend_base,), {'__module__': 'fastxtend.callback.cutmixup'})

@pytest.mark.parametrize('theirs', [FastaiMixUp, FastaiCutMix, FastxtendCutMixUp], ids=['fastai-mixup', 'fastai-cutmix', 'fastxtend'])
@pytest.mark.parametrize('where', ['learner-ours-first', 'learner-theirs-first', 'ours-on-fit', 'theirs-on-fit', 'fit'])
def test_foreign_mixer_refused(theirs, where):
    lf, ours, other = CrossEntropyLossFlat(), CutMix(), theirs()
    learner_cbs, fit_cbs = dict(zip(['learner-ours-first', 'learner-theirs-first', 'ours-on-fit', 'theirs-on-fit', 'fit'],
        [([ours, other], None), ([other, ours], None), ([other], ours), ([ours], other), ([], [ours, other])]))[where]
    learn = synth_learner(loss_func=lf, cbs=learner_cbs)
    cbs = list(learn.cbs)
    w = learn.model[1].weight.detach().clone()
    msg = rf"{re.escape(type(other).__module__)}\.{type(other).__name__} .*CutMix .*both mix every batch.*remove one"
    with pytest.raises(ValueError, match=msg): learn.fit(1, cbs=fit_cbs)
    left_as_found(learn, lf, cbs)
    eq_(learn.model[1].weight, w) # refused before any batch

def test_foreign_mixer_refused_then_ours_trains():
    "fastai's MixHandler swaps the loss in its before_train: the refusal comes before; without it, ours trains"
    lf, spy = CrossEntropyLossFlat(), Mixing()
    learn = synth_learner(loss_func=lf, cbs=[MixUp(), spy], n=32, bs=16)
    with pytest.raises(ValueError, match='fastai.callback.mixup.MixUp and MixUp would both mix every batch'): learn.fit_one_cycle(1, cbs=FastaiMixUp())
    assert learn.loss_func is lf
    learn.fit_one_cycle(1)
    eq_(spy.seen, [['MixUp']] * 2)

# ---- the stand-in mixes only the one loss call of the batch the mixer mixed ----

class CancelAfterPred(Callback):
    "Raise `exc` in `after_pred` of the training batch number `at`, once"
    order = MixHandler.order + 1 # after the mixers: their loss swap is in place
    def __init__(self, exc, at=1): self.exc, self.at, self.n = exc, at, 0
    def after_pred(self):
        if self.training:
            self.n += 1
            if self.n == self.at + 1: raise self.exc

@pytest.mark.parametrize('exc', [CancelTrainException, CancelBatchException])
@pytest.mark.parametrize('mixer', [MixUp, CutMix, lambda: MixChoice([MixUp(), CutMix()], per_sample=True)], ids=['mixup', 'cutmix', 'choice'])
def test_cancel_in_after_pred_leaves_validation_alone(exc, mixer):
    "The issue's reproduction: a later callback cancels in `after_pred`; the epoch's validation loss is the plain one"
    lf = CrossEntropyLossFlat()
    with no_random(0): learn = synth_learner(loss_func=lf, cbs=[mixer(), CancelAfterPred(exc)], n=64, bs=16)
    with no_random(1): learn.fit(1, lr=0)
    assert learn.loss_func is lf
    plain = synth_learner(loss_func=CrossEntropyLossFlat(), n=64, bs=16)
    plain.model.load_state_dict(learn.model.state_dict())
    expected = plain.validate()[0]
    eq_(learn.recorder.values[-1][-1], expected) # the validation loss of the epoch whose training was cancelled
    eq_(learn.validate()[0], expected)

class LossesInValidation(Callback):
    "In each validation batch, what the learner's `loss_func` gives for the batch by hand, against the original loss"
    order = MixHandler.order + 2
    def __init__(self, lf): self.lf, self.got = lf, []
    def after_pred(self):
        if not self.training: self.got.append((self.learn.loss_func(self.learn.pred, *self.learn.yb), self.lf(self.learn.pred, *self.learn.yb)))

def test_cancel_train_then_loss_by_hand_in_validation():
    lf = CrossEntropyLossFlat()
    spy = LossesInValidation(lf)
    learn = synth_learner(loss_func=lf, cbs=[MixUp(), CancelAfterPred(CancelTrainException), spy], n=64, bs=16)
    learn.fit(1, lr=0)
    assert spy.got
    for a, b in spy.got: eq_(a, b)

class FailAfterPred(Callback):
    order = MixHandler.order + 1
    def __init__(self): self.armed = True
    def after_pred(self):
        if self.training and self.armed: self.armed = False; raise RuntimeError('boom in after_pred')

def test_stand_in_left_behind_mixes_no_other_call():
    "After an error in a later `after_pred` the stand-in stays; no validation call, and no call with other tensors, is mixed"
    lf = CrossEntropyLossFlat()
    learn = synth_learner(loss_func=lf, cbs=[MixUp(), FailAfterPred()], n=64, bs=16)
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1)
    assert isinstance(learn.loss_func, MixedLoss)
    pred, y = learn.pred.detach().clone(), learn.yb[0].clone()
    eq_(learn.loss_func(pred, y), lf(pred, y)) # the same values, other tensors
    eq_(learn.loss_func(learn.pred, y), lf(learn.pred, y)) # the batch's prediction with other targets
    _, _, losses = learn.get_preds(inner=True, with_loss=True) # no `before_fit`: the stand-in is still there when it starts
    ref = synth_learner(loss_func=CrossEntropyLossFlat(), n=64, bs=16)
    ref.model.load_state_dict(learn.model.state_dict())
    _, _, expected = ref.get_preds(with_loss=True)
    close_(losses, expected)

def test_stand_in_mixes_only_in_training():
    "Outside training (a validation loss call with the batch's own tensors) the stand-in is the original loss"
    lf = CrossEntropyLossFlat()
    learn = synth_learner(loss_func=lf, cbs=[MixUp(), FailAfterPred()], n=64, bs=16)
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1)
    learn.training = False
    eq_(learn.loss_func(learn.pred, *learn.yb), lf(learn.pred, *learn.yb))

# ---- a callback that fails after the loss swap leaves a loss that works everywhere ----

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

# ---- a mixer given to one fit replaces the learner's for that fit; two at one level are refused ----

def test_fit_mixer_replaces_learners_mixer_for_that_fit():
    lf, own = CrossEntropyLossFlat(), MixUp()
    spy = Mixing()
    learn = synth_learner(loss_func=lf, cbs=[own, spy], n=32, bs=16)
    cbs = list(learn.cbs)
    fit_mixer = CutMix()
    learn.fit(2, cbs=fit_mixer)
    eq_(spy.seen, [['CutMix']] * 4)
    left_as_found(learn, lf, cbs)
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1, cbs=[ResizeMix(), FailAfterPred()]) # however the fit ends
    left_as_found(learn, lf, cbs)
    learn.fit(1, cbs=MixUp(alpha=1.)) # one of the same kind: the learner's keeps its name
    eq_(spy.seen, [['MixUp']] * 2)
    assert learn.mix_up is own and not hasattr(learn, 'mix_up_fit')
    left_as_found(learn, lf, cbs)
    learn.fit(1)
    eq_(spy.seen, [['MixUp']] * 2)
    assert own.learn is learn and own.perm is None

@pytest.mark.parametrize('where', ['learner', 'fit'])
def test_two_mixers_at_one_level_refused(where):
    lf = CrossEntropyLossFlat()
    learn = synth_learner(loss_func=lf, cbs=[MixUp(), CutMix()] if where == 'learner' else [MixUp()])
    cbs = list(learn.cbs)
    with pytest.raises(ValueError) as e: learn.fit(1, cbs=None if where == 'learner' else [CutMix(), ResizeMix()])
    msg = str(e.value)
    if where == 'learner':
        assert 'One mixing callback per learner: MixUp and CutMix are both on the learner' in msg, msg
        assert 'MixChoice([MixUp(), CutMix()])' in msg and 'learn.remove_cb(learn.mix_up)' in msg, msg
    else:
        assert 'One mixing callback per fit: CutMix and ResizeMix were both given to this fit' in msg, msg
        assert 'Exception occured in `CutMix`' in msg, msg # one of the two raises, not the learner's
        assert 'MixChoice([CutMix(), ResizeMix()])' in msg and 'remove_cb' not in msg, msg
    left_as_found(learn, lf, cbs)

# ---- what a subclass's `mix` returns is checked ----

class ScalarShare(MixHandler):
    "One share for the batch, returned as `torch.distributions.Beta(a, a).sample()` gives it: a 0-d tensor"
    def mix(self, xb, yb, inplace=None):
        lam = torch.distributions.Beta(torch.tensor(1.), torch.tensor(1.)).sample()
        lam = torch.maximum(lam, 1 - lam)
        perm = torch.randperm(len(xb[0]))
        return (tuple(lerp_mix(o, perm, float(lam)) for o in xb), tuple(yb)), perm, lam

def test_zero_d_share_is_a_batch_share():
    spy = Mixing()
    lf = CrossEntropyLossFlat()
    learn = synth_learner(loss_func=lf, cbs=[ScalarShare(), spy], n=32, bs=16)
    learn.fit(1, lr=0)
    eq_(spy.seen, [['ScalarShare']] * 2)
    assert learn.loss_func is lf

class RecordLoss(Callback):
    order = MixHandler.order + 1
    def before_fit(self): self.recs = []
    def after_loss(self):
        if self.training:
            m = next(cb for cb in self.learn.cbs if isinstance(cb, MixHandler))
            self.recs.append((self.learn.loss.detach(), self.learn.pred.detach(), self.learn.yb[0], m.perm, m.lam))

def test_zero_d_share_mixes_the_loss_with_it():
    rec = RecordLoss()
    with no_random(0): synth_learner(cbs=[ScalarShare(), rec], n=32, bs=16).fit(1, lr=0)
    for loss, pred, y, perm, lam in rec.recs:
        assert isinstance(lam, float)
        close_(loss, lam * F.cross_entropy(pred, y) + (1 - lam) * F.cross_entropy(pred, y[perm]), eps=1e-6)

class DeviceScalarShare(MixHandler):
    "One share for the batch as a 0-d tensor on the batch's device: taken as one share per sample, with no sync"
    def mix(self, xb, yb, inplace=None):
        x = xb[0]
        lam, perm = torch.rand((), device=x.device) / 2 + .5, torch.randperm(len(x), device=x.device)
        return (tuple(torch.lerp(o[perm], o, lam) for o in xb), tuple(yb)), perm, lam

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_zero_d_device_share_no_sync():
    from test_callback import fit_without_sync
    rec = RecordLoss()
    learn = synth_learner(cbs=[DeviceScalarShare(), rec], n=32, bs=16)
    learn.dls.to('cuda'); learn.model.cuda()
    fit_without_sync(learn)
    assert len(rec.recs) == 2
    for loss, pred, y, perm, lam in rec.recs:
        eq_(lam.shape, (16,))
        close_(loss, (lam * F.cross_entropy(pred, y, reduction='none') + (1 - lam) * F.cross_entropy(pred, y[perm], reduction='none')).mean(), eps=1e-5)

class BadReturn(MixHandler):
    def __init__(self, what): super().__init__(); self.what = what
    def mix(self, xb, yb, inplace=None):
        perm = torch.randperm(len(xb[0]))
        if self.what == 'lam-list': return (xb, yb), perm, [.5] * len(perm)
        if self.what == 'lam-len': return (xb, yb), perm, torch.full((3,), .5)
        if self.what == 'flat': return xb, yb, perm, .5
        if self.what == 'y-shape': return (xb, tuple(y[:2] for y in yb)), perm, .5

@pytest.mark.parametrize('what,exc,msg', [('lam-list', TypeError, r"BadReturn\.mix returned a list as the share"),
                                          ('lam-len', ValueError, r"BadReturn\.mix returned a share of shape \(3,\).* 16 samples"),
                                          ('flat', TypeError, r"BadReturn\.mix must return \(\(mixed xb, mixed yb\), perm, lam\)"),
                                          ('y-shape', ValueError, r"BadReturn\.mix returned target 0 of shape \(2,\) for a target of shape \(16,\)")])
def test_mix_contract_checked(what, exc, msg):
    lf = CrossEntropyLossFlat()
    learn = synth_learner(loss_func=lf, cbs=BadReturn(what), n=32, bs=16)
    with pytest.raises(exc, match=msg): learn.fit(1)
    assert learn.loss_func is lf

def test_readme_batch_mixup_on_segmentation_refused():
    "The README's BatchMixUp blends the images and cannot blend masks of class indices: a clear error, not masks left behind"
    ns = {}
    exec("import torch\nfrom fastai_mix import *\n" + batch_mixup_example(), ns)
    learn = synth_seg_learner(cbs=ns['BatchMixUp']())
    lf = learn.loss_func
    with pytest.raises(ValueError, match=r"BatchMixUp\.mix mixed the inputs but gave target 0, a mask of class indices, back as it was.*use CutMix or ResizeMix"):
        learn.fit(1)
    assert learn.loss_func is lf

def test_masks_that_follow_the_inputs_pass():
    "CutMix pastes the masks with the inputs, also in place; a batch left alone keeps both: no error"
    for m in (CutMix(inplace=True), MixChoice([CutMix(), ResizeMix(interpolation='nearest')], p=.5, per_sample=True)):
        synth_seg_learner(cbs=m, n=16, bs=8).fit(1, lr=0)

# ---- the contract for writing a mixer, and its example (nbs/01_callback.ipynb, "Writing a mixer") ----

def batch_mixup_example():
    "The example mixer as nbs/01_callback.ipynb states it: the class of its code cell, up to the first blank line"
    nb = json.loads((Path(__file__).parent.parent / 'nbs' / '01_callback.ipynb').read_text())
    src = next(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code' and 'class BatchMixUp(MixHandler)' in ''.join(c['source']))
    return src.split('\n\n')[0] + '\n'

def test_readme_subclass_example():
    ns = {}
    exec("import torch\nfrom fastai_mix import *\n" + batch_mixup_example(), ns)
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

# ---- an input that is not a tensor is named ----

@pytest.mark.parametrize('mixer', [lambda: MixChoice([MixUp(), CutMix()]), lambda: MixChoice([MixUp(), CutMix()], per_sample=True), MixUp, CutMix])
def test_non_tensor_input_named(mixer):
    "An input that is not a tensor is named, with its position and type"
    with pytest.raises(TypeError, match=r"must be a tensor or a sequence of tensors, but x\w?\[1\] is a list: \[1, 2\]"):
        mixer().mix((torch.randn(2, 3, 4, 4), [1, 2]), (torch.tensor([0, 1]),))
