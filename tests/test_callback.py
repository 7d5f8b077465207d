"The callbacks on a real fastai Learner: losses, restoration on every way out, batches, dtypes, export, agreement with fastai"
import pickle
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
from fastai_mix import MixHandler, MixUp, CutMix, ResizeMix
from fastai_mix.test_utils import synth_learner, synth_dls, MixSpy, blend_shares, paste_shares

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


# MixChoice refuses, when it is made, an option that one of its mixers cannot mix with (issue 29, item 6)
from fastai_mix import MixChoice
from fastai_mix.fmix import FMix
from fastai_mix.manifold import ManifoldMixup, OutputMixup
from fastai_mix.snapmix import SnapMix
from fastai_mix.transmix import TransMix

def test_choice_refuses_what_its_mixers_cannot_mix_with():
    "The issue's two choices are refused when made, naming the mixer, the option and what it takes, not when that mixer is first picked"
    with pytest.raises(ValueError) as e: MixChoice([MixUp(), SnapMix()], decoupled=.1)
    msg = str(e.value)
    assert 'MixChoice(decoupled=0.1)' in msg and 'SnapMix cannot mix with it' in msg and 'SnapMix takes decoupled=0 only' in msg, msg
    with pytest.raises(ValueError) as e: MixChoice([CutMix(), TransMix()], remix=(3, .5))
    msg = str(e.value)
    assert 'MixChoice(remix=(3.0, 0.5))' in msg and 'TransMix cannot mix with it' in msg and 'TransMix takes remix=None only' in msg, msg
    for opts, takes in [(dict(label_mode='union'), "label_mode='blend'"), (dict(partner='kernel'), "partner='random', 'balanced', 'same_class' or 'other_class'")]:
        with pytest.raises(ValueError, match='SnapMix cannot mix with it') as e: MixChoice([MixUp(), SnapMix()], **opts)
        assert takes in str(e.value), str(e.value)
    MixChoice([MixUp(), SnapMix(), TransMix()], partner='balanced') # what they all take is given

MIXER_CLASSES = [MixUp, CutMix, ResizeMix, FMix, ManifoldMixup, OutputMixup, SnapMix, TransMix]
OPTIONS = [dict(decoupled=.1), dict(label_mode='union'), dict(partner='kernel'), dict(partner='kernel', sigma=.5), dict(partner='balanced'),
           dict(partner='balanced', class_counts=[4, 4, 4, 4]), dict(partner='same_class'), dict(partner='other_class'), dict(remix=(3, .5))]

def refusal(f) -> str|None:
    try: f()
    except ValueError as e: return str(e)
    return None

@pytest.mark.parametrize('cls', MIXER_CLASSES)
def test_choice_refuses_exactly_what_each_mixer_refuses(cls):
    "Every option a MixChoice passes to its mixers is refused by the choice when made exactly where the mixer given it alone refuses it, naming the mixer"
    for opts in OPTIONS:
        alone, chosen = refusal(lambda: cls(**opts)), refusal(lambda: MixChoice([MixUp(), cls()], **opts))
        eq_((opts, alone is None), (opts, chosen is None))
        if chosen: assert f'{cls.__name__} cannot mix with it' in chosen and 'MixChoice(' in chosen, chosen

def test_refused_choice_leaves_its_mixers_as_they_were():
    "A choice refused when made gives none of its options to the mixers it was given: one of them then mixes alone as it was made"
    cut = CutMix()
    with pytest.raises(ValueError, match='give partner to the choice or to its mixers, not both'):
        MixChoice([MixUp(partner='same_class'), cut], partner='balanced', label_mode='union')
    spy = MixSpy()
    learn = synth_learner(loss_func=BCEWithLogitsLossFlat(), multi_label=True, cbs=[cut, spy], shape=(3, 16, 16), n=32, bs=16)
    learn.fit(1, lr=0)
    assert spy.records
    for r in spy.records: # blended by the shares (label_mode='blend', its own), not the union the refused choice asked for
        y, lam = r['y'][0], torch.as_tensor(r['lam']).reshape(-1, 1)
        close_(r['ym'][0], lam * y + (1 - lam) * y[r['perm']])
    eq_((cut.partner, cut._choice), ('random', None))
    snap = SnapMix()
    with pytest.raises(ValueError, match='SnapMix cannot mix with it'): MixChoice([MixUp(), snap], partner='kernel')
    eq_((snap.partner, snap._choice), ('random', None))

def test_choice_refuses_a_model_its_mixers_cannot_read_at_the_first_batch():
    "MixChoice holding TransMix on a CNN, or SnapMix on a model without feature maps it reads: refused at the fit's first batch, whichever "
    "mixer is picked, before anything is mixed (not when that mixer is first picked, epochs later); the learner left as it was"
    from fastai_mix import TransMix, SnapMix
    from fastai.callback.core import Callback
    class Spy(Callback):
        order = MixUp.order + 1
        def __init__(self): self.n = 0
        def before_batch(self): self.n += 1 if self.training else 0
    for mixer, what in [(TransMix(), 'TransMix found no attention module'), (SnapMix(), 'SnapMix found no last feature map')]:
        dls = synth_dls(n=16, bs=8, shape=(3, 8, 8), c=3)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)) # no attention, no pooled feature map
        spy = Spy()
        choice = MixChoice([MixUp(), mixer], weights=[1e6, 1]) # MixUp picked (almost) every batch: the other would fail much later
        learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=[choice, spy])
        lf = learn.loss_func
        with learn.no_bar(), learn.no_logging():
            with pytest.raises(ValueError, match=f"MixChoice holds {type(mixer).__name__}, which cannot mix with this model: {what}"): learn.fit(2)
        eq_(spy.n, 0); assert learn.loss_func is lf # refused in the first batch's before_batch
