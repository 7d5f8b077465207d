"Issue 20, the callback side: regression tests for items 1, 2, 8, 13, 14 and 18"
import itertools, json, re
from pathlib import Path
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from fastcore.test import test_close as close_, test_eq as eq_
from fastai.callback.core import Callback, CancelBatchException, CancelTrainException
from fastai.callback.mixup import MixUp as FastaiMixUp, CutMix as FastaiCutMix
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import no_random
import fastai.callback.schedule  # noqa: F401  (fit_one_cycle)
from fastai_mix import MixHandler, MixUp, CutMix, ResizeMix, MixChoice, mix_loss, lerp_mix
from fastai_mix.callback import MixedLoss
from fastai_mix.test_utils import synth_dls, synth_learner, synth_seg_learner

class Mixing(Callback):
    "Record, for each training batch, the names of the mixers that mixed it"
    order, run_valid = MixHandler.order + 1, False
    def __init__(self): self.fits = []
    def before_fit(self): self.seen = []; self.fits.append(self.seen)
    def before_batch(self): self.seen.append([type(cb).__name__ for cb in self.learn.cbs if isinstance(cb, MixHandler) and cb.perm is not None])

def left_as_found(learn, lf, cbs):
    assert learn.loss_func is lf
    eq_(list(learn.cbs), cbs)

# ---- 1. fastai's own mixers (and a fastai extension's) beside one of ours are refused ----

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

# ---- 2. the stand-in mixes only the one loss call of the batch the mixer mixed ----

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

# ---- 8. MixChoice's chances never go below 0 ----

@pytest.mark.parametrize('per_sample', [False, True])
def test_mixchoice_tenths_first_batch_and_show_batch(per_sample):
    choice = lambda: MixChoice([MixUp(), CutMix(), ResizeMix()], weights=[0.1, 0.6, 0.2], per_sample=per_sample)
    spy = Mixing()
    learn = synth_learner(cbs=[choice(), spy], n=32, bs=16)
    learn.fit(1, lr=0)
    eq_(spy.seen, [['MixChoice']] * 2)
    fig = choice().show_batch(learn.dls, show=False, seed=0)
    assert len(fig.axes) == 9

def test_mixchoice_weights_in_tenths_sweep():
    "Every list of 3 weights in tenths: the chances are >= 0, sum to 1 and a batch is mixed"
    x, y = torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 3])
    failed_before = 0
    for w in itertools.product([i / 10 for i in range(11)], repeat=3):
        if sum(w) == 0: continue
        for p in (1., .5):
            m = MixChoice([MixUp(), CutMix(), ResizeMix()], weights=list(w), p=p)
            c = m._chances()
            assert min(c) >= 0 and abs(sum(c) - 1) < 1e-12, (w, p, c)
            if 1 - p * sum(m.weights) < 0: # the lists that crashed: mix a batch with them
                failed_before += 1
                for per_sample in (False, True):
                    m.per_sample = per_sample
                    (xm, _), perm, lam = m.mix((x,), (y,))
                    eq_(xm[0].shape, x.shape)
    assert failed_before > 20 # the sweep does reach the rounding case

# ---- 13. a mixer given to one fit replaces the learner's for that fit; two at one level are refused ----

def readme_usage():
    text = (Path(__file__).parent.parent / 'README.md').read_text()
    usage = text.split('## Usage', 1)[1]
    return re.search(r"```python\n(.*?)```", usage, re.S).group(1)

def test_readme_usage_block(monkeypatch, tmp_path):
    "The README's Usage block as written, on small synthetic images: CutMix on the learner mixes the fit, and stays on it"
    import fastai.vision.all as va
    spy = Mixing()
    made, lfs = [], []
    def vision_learner(dls, arch, loss_func=None, cbs=None, **kwargs): # the README's call, on a tiny model (no download)
        made.append(Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, dls.c)), loss_func=loss_func or CrossEntropyLossFlat(), cbs=[cbs, spy]))
        lfs.append(made[-1].loss_func) # fastai infers this loss from the digits' labels
        return made[-1]
    dls = synth_dls(n=16, bs=16)
    dls.c = 4
    class ImageDataLoaders: from_folder = staticmethod(lambda *a, **k: dls) # the README's folder of digits, as small synthetic images
    monkeypatch.setattr(va, 'vision_learner', vision_learner)
    monkeypatch.setattr(va, 'ImageDataLoaders', ImageDataLoaders)
    monkeypatch.chdir(tmp_path) # the block writes its digits into the working directory
    code = readme_usage()
    assert 'cbs=CutMix()' in code and 'show_batch' in code
    exec(code, {})
    learn = made[0]
    eq_(spy.fits, [[['CutMix']]]) # one epoch of one batch, mixed by CutMix (show_batch trains nothing)
    assert [type(cb).__name__ for cb in learn.cbs if isinstance(cb, MixHandler)] == ['CutMix']
    assert learn.loss_func is lfs[0] # the learner's own loss, after the fit
    learn.fit(1, cbs=ResizeMix()) # the README's "for one fit only", with another mixer: it replaces CutMix there
    eq_(spy.seen, [['ResizeMix']])
    assert not hasattr(learn, 'resize_mix') and learn.loss_func is lfs[0]

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

# ---- 14. what a subclass's `mix` returns is checked ----

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

def readme_batch_mixup():
    "The example mixer of nbs/01_callback.ipynb (\"Writing a mixer\"), as test_review_callback reads it"
    nb = json.loads((Path(__file__).parent.parent / 'nbs' / '01_callback.ipynb').read_text())
    src = next(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code' and 'class BatchMixUp(MixHandler)' in ''.join(c['source']))
    return src.split('\n\n')[0] + '\n'

def test_readme_batch_mixup_on_segmentation_refused():
    "The README's BatchMixUp blends the images and cannot blend masks of class indices: a clear error, not masks left behind"
    ns = {}
    exec("import torch\nfrom fastai_mix import *\n" + readme_batch_mixup(), ns)
    learn = synth_seg_learner(cbs=ns['BatchMixUp']())
    lf = learn.loss_func
    with pytest.raises(ValueError, match=r"BatchMixUp\.mix mixed the inputs but gave target 0, a mask of class indices, back as it was.*use CutMix or ResizeMix"):
        learn.fit(1)
    assert learn.loss_func is lf

def test_masks_that_follow_the_inputs_pass():
    "CutMix pastes the masks with the inputs, also in place; a batch left alone keeps both: no error"
    for m in (CutMix(inplace=True), MixChoice([CutMix(), ResizeMix(interpolation='nearest')], p=.5, per_sample=True)):
        synth_seg_learner(cbs=m, n=16, bs=8).fit(1, lr=0)

# ---- 18. nothing mixed, one share per sample: exactly the loss ----

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
