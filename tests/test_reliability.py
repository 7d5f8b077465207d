"Reliability: the mixers alongside fastai's training features, hostile input, and a soak test of interrupted fits"
import random, re, time
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from fastcore.test import test_close as close_, test_eq as eq_
from fastai.callback.core import Callback, CancelBatchException, CancelEpochException, CancelFitException, CancelTrainException
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.training import GradientAccumulation
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.tracker import SaveModelCallback, EarlyStoppingCallback
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import no_random
from fastai.callback.progress import ProgressCallback
from fastcore.basics import noop
import fastai.callback.schedule  # noqa: F401  (fit_one_cycle, fine_tune, lr_find)
from torch.utils.data import DataLoader as TorchDL
from fastai_mix import MixHandler, MixUp, CutMix, ResizeMix, MixChoice
from fastai_mix.test_utils import synth_learner, MixSpy
from test_callback import share_from_pixels, moved, ToDtype

MIXERS = [MixUp, CutMix, ResizeMix]
STATE = ('perm', 'lam', 'yb1', '_old_lf')

def snapshot(learn): return learn.loss_func, list(learn.cbs), getattr(learn.loss_func, 'reduction', None)

def assert_as_found(learn, snap, mixer):
    "The learner has its own loss (same object, same reduction), the same callbacks in the same order, and the mixer no batch state"
    lf, cbs, red = snap
    assert learn.loss_func is lf, f"loss_func is {learn.loss_func!r}, not the original {lf!r}"
    eq_(getattr(lf, 'reduction', None), red)
    eq_([type(o).__name__ for o in learn.cbs], [type(o).__name__ for o in cbs])
    assert all(a is b for a, b in zip(learn.cbs, cbs)), "a callback was replaced"
    eq_({k: getattr(mixer, k) for k in STATE}, dict.fromkeys(STATE))

def check_mixing(mixer, recs, eps_loss=1e-5):
    "Each recorded batch: the shares read back from the pixels are the shares of the cross-entropy the mixer computed"
    assert recs, "no training batch was recorded"
    for r in recs:
        lam = r['lam'] if isinstance(r['lam'], torch.Tensor) else torch.full((len(r['perm']),), r['lam'])
        ok = moved(r['perm'])
        close_(share_from_pixels(mixer, r)[ok], lam[ok], eps=1e-4 if not isinstance(mixer, ResizeMix) else .02)
        y, pred = r['y'][0], r['pred'].float()
        exp = lam * F.cross_entropy(pred, y, reduction='none') + (1 - lam) * F.cross_entropy(pred, y[r['perm']], reduction='none')
        close_(r['loss'].float(), exp.mean(), eps=eps_loss)

def conv_learner(cbs=None, **kwargs):
    "`synth_learner` with a small conv net, so that channels-last and freezing mean something"
    learn = synth_learner(cbs=cbs, **kwargs)
    learn.model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return learn

# ---- fastai's training features ----

class CPUMixedPrecision(MixedPrecision):
    "fastai's `MixedPrecision`, autocasting on the CPU: fastai's own autocasts on CUDA only, and is a no-op on a CPU"
    def before_fit(self):
        super().before_fit()
        dt = torch.bfloat16 if str(self.amp_mode).lower().endswith('bf16') else torch.float16
        self.autocast = torch.autocast('cpu', dtype=dt)
        self.learn.scaler = torch.amp.GradScaler('cpu', enabled=False) # a few steps; no scaling needed

class PredDtype(Callback):
    "Record the model output's dtype before `MixedPrecision` casts it back to float32"
    order, run_valid = MixedPrecision.order - 1, False
    def before_fit(self): self.dtypes = set()
    def after_pred(self): self.dtypes.add(self.learn.pred.dtype)

@pytest.mark.parametrize('mixer', MIXERS)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_mixed_precision_cpu_autocast(mixer, dtype):
    try:
        with torch.autocast('cpu', dtype=dtype): torch.nn.functional.linear(torch.ones(1, 2), torch.ones(3, 2))
    except RuntimeError as e: pytest.skip(f'this PyTorch cannot autocast to {dtype} on the CPU: {e}')
    m, spy, pd = mixer(), MixSpy(), PredDtype()
    learn = conv_learner(cbs=[CPUMixedPrecision('bf16' if dtype == torch.bfloat16 else 'fp16'), pd, spy])
    snap = snapshot(learn)
    learn.fit(1, 1e-3, cbs=m)
    eq_(pd.dtypes, {dtype}) # the autocast really ran
    check_mixing(m, spy.records, eps_loss=1e-4)
    assert_as_found(learn, snap, m)

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: fastai's MixedPrecision autocasts on CUDA only")
@pytest.mark.parametrize('mixer', MIXERS)
@pytest.mark.parametrize('precision', ['to_fp16', 'to_bf16'])
def test_mixed_precision_cuda(mixer, precision):
    m, spy, pd = mixer(), MixSpy(), PredDtype()
    learn = getattr(conv_learner(cbs=[pd, spy]), precision)()
    learn.dls.to('cuda'); learn.model.cuda()
    snap = snapshot(learn)
    learn.fit(1, 1e-3, cbs=m)
    eq_(pd.dtypes, {torch.float16 if precision == 'to_fp16' else torch.bfloat16})
    for r in spy.records:
        for k in ('x', 'xm', 'pred', 'loss', 'perm'): r[k] = r[k].cpu()
        r['y'] = tuple(o.cpu() for o in r['y'])
        if isinstance(r['lam'], torch.Tensor): r['lam'] = r['lam'].cpu()
    check_mixing(m, spy.records, eps_loss=1e-3)
    assert_as_found(learn, snap, m)

@pytest.mark.parametrize('mixer', MIXERS)
def test_gradient_accumulation(mixer):
    m, spy = mixer(), MixSpy()
    learn = synth_learner(cbs=[GradientAccumulation(n_acc=32), m, spy], n=64, bs=8)
    snap, w0 = snapshot(learn), learn.model[1].weight.detach().clone()
    learn.fit(1, 1e-2)
    eq_(len(spy.records), 8)
    check_mixing(m, spy.records)
    assert not torch.equal(learn.model[1].weight, w0) # the accumulated steps were taken
    assert_as_found(learn, snap, m)

@pytest.mark.parametrize('mixer', MIXERS)
def test_channels_last(mixer):
    m, spy = mixer(), MixSpy()
    learn = conv_learner(cbs=[ToDtype(torch.float32, channels_last=True), m, spy])
    learn.to_channelslast(use_amp=False)
    snap = snapshot(learn)
    learn.fit(1, 1e-3)
    assert learn.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(r['xm'].is_contiguous(memory_format=torch.channels_last) for r in spy.records)
    check_mixing(m, spy.records)
    assert_as_found(learn, snap, m)

@pytest.mark.parametrize('mixer', MIXERS)
def test_lr_find(mixer):
    m, spy = mixer(), MixSpy()
    learn = synth_learner(cbs=[m, spy], n=256, bs=16)
    snap, w0 = snapshot(learn), learn.model[1].weight.detach().clone()
    learn.lr_find(num_it=12, show_plot=False)
    eq_(len(spy.records), 12)
    check_mixing(m, spy.records)
    eq_(learn.model[1].weight, w0) # lr_find puts the weights back
    assert_as_found(learn, snap, m)

@pytest.mark.loader_workers # fastai's own loaders, with their worker processes, as a user on Linux has them
@pytest.mark.parametrize('mixer', MIXERS)
def test_fine_tune(mixer):
    m, spy = mixer(), MixSpy()
    learn = conv_learner(cbs=[m, spy])
    learn.splitter = lambda model: [list(model[:2].parameters()), list(model[2:].parameters())]
    snap = snapshot(learn)
    learn.fine_tune(1, freeze_epochs=1)
    eq_(len(learn.recorder.values), 1); eq_(len(spy.records), 4) # the recorder and the spy keep the last fit's
    check_mixing(m, spy.records)
    assert all(p.requires_grad for p in learn.model.parameters()) # unfrozen at the end
    assert_as_found(learn, snap, m)

@pytest.mark.parametrize('mixer', MIXERS)
def test_save_model_and_early_stopping(mixer, tmp_path):
    m, spy = mixer(), MixSpy()
    learn = synth_learner(cbs=[m, spy])
    learn.path = tmp_path
    snap = snapshot(learn)
    learn.fit(6, 1e-3, cbs=[SaveModelCallback(fname='best'), EarlyStoppingCallback(min_delta=10., patience=0)])
    eq_(len(learn.recorder.values), 2) # stopped early, by a CancelFitException, after the second epoch
    assert (tmp_path/'models'/'best.pth').exists()
    check_mixing(m, spy.records)
    assert_as_found(learn, snap, m)

@pytest.mark.slow
@pytest.mark.parametrize('mixer', MIXERS)
def test_torch_compile(mixer):
    m, spy = mixer(), MixSpy()
    learn = synth_learner(cbs=[m, spy], n=32, bs=16) # no odd batch: one compiled shape per phase
    learn.model = torch.compile(learn.model)
    snap = snapshot(learn)
    learn.fit(1, 1e-3)
    assert type(learn.model).__name__ == 'OptimizedModule'
    check_mixing(m, spy.records)
    assert_as_found(learn, snap, m)

# ---- hostile input: clear errors, and the learner intact afterwards ----

class EditTargets(Callback):
    "Replace each training batch's targets by `f(yb)`, before the mixers"
    order, run_valid = -5, False
    def __init__(self, f): self.f = f
    def before_batch(self): self.learn.yb = self.f(self.learn.yb)

def fails_then_trains(learn, mixer, exc, match):
    "A fit fails with `exc` matching `match`, the learner is as found, and once the hostile part is gone the next fit mixes"
    snap = snapshot(learn)
    with pytest.raises(exc, match=match): learn.fit(1)
    assert_as_found(learn, snap, mixer)
    learn.remove_cbs(learn.cbs.filter(lambda o: isinstance(o, EditTargets)))
    spy, snap = MixSpy(), snapshot(learn)
    learn.fit(1, 1e-3, cbs=spy)
    check_mixing(mixer, spy.records)
    assert_as_found(learn, snap, mixer)

@pytest.mark.parametrize('mixer', MIXERS)
def test_target_batch_size_differs(mixer):
    m = mixer()
    learn = synth_learner(cbs=[EditTargets(lambda yb: (yb[0][:-1],)), m])
    fails_then_trains(learn, m, ValueError, f'{mixer.__name__}: a target has batch size 15 but the inputs have 16')

@pytest.mark.parametrize('mixer', MIXERS)
@pytest.mark.parametrize('edit,found', [(lambda yb: (yb[0].tolist(),), 'target 0 is a list'),
                                        (lambda yb: (yb[0].to(torch.complex64),), 'target 0 is a torch.complex64 tensor'),
                                        (lambda yb: (yb[0][0],), 'target 0 is a 0-d tensor (one value for the whole batch)'),
                                        (lambda yb: (), 'the training batch has no targets')],
                         ids=['list', 'complex', '0-d', 'none'])
def test_targets_a_mixer_cannot_follow(mixer, edit, found):
    m = mixer()
    learn = synth_learner(cbs=[EditTargets(edit), m])
    fails_then_trains(learn, m, TypeError, re.escape(found + ('' if found.startswith('the') else '; targets must be tensors with one row per sample')))

def ce_no_reduction(pred, y): return F.cross_entropy(pred, y)

class MeanOnly(nn.Module):
    "A loss that says it reduces but always returns the mean"
    reduction = 'mean'
    def forward(self, pred, y): return F.cross_entropy(pred, y)

PER_SAMPLE = {'MixUp': MixUp, 'CutMix': lambda: CutMix(per_sample=True), 'ResizeMix': lambda: ResizeMix(per_sample=True)}

@pytest.mark.parametrize('name', PER_SAMPLE)
def test_loss_without_reduction(name):
    "Per-sample shares need one loss per sample: a loss that takes no `reduction` is refused; one share per batch calls the loss as it is"
    m = PER_SAMPLE[name]()
    learn = synth_learner(loss_func=ce_no_reduction, cbs=m)
    snap = snapshot(learn)
    with pytest.raises(TypeError, match=rf"{name} mixes the loss for class-index targets with one share per sample: it calls the loss with reduction='none'.*"
                                        r"ce_no_reduction.* has no `reduction` attribute and takes no `reduction` argument"):
        learn.fit(1)
    assert_as_found(learn, snap, m)
    learn.loss_func = lf = F.cross_entropy # a function that takes `reduction` is fine
    spy = MixSpy()
    learn.fit(1, cbs=spy)
    check_mixing(m, spy.records)
    assert learn.loss_func is lf
    if name != 'MixUp': # the same mixer with one share per batch needs no `reduction`
        m, spy = type(m)(), MixSpy()
        learn = synth_learner(loss_func=ce_no_reduction, cbs=[m, spy])
        learn.fit(1)
        check_mixing(m, spy.records)
        assert learn.loss_func is ce_no_reduction

def test_loss_returning_a_scalar():
    "With one share per sample the loss must give one loss per sample; with one share per batch a mean is enough, and exact"
    lf = MeanOnly()
    for m in (MixUp(), CutMix(per_sample=True)):
        learn = synth_learner(loss_func=lf, cbs=m)
        snap = snapshot(learn)
        with pytest.raises(TypeError, match=r"MeanOnly\(\) returned a scalar with reduction='none'.*one loss per sample"): learn.fit(1)
        assert_as_found(learn, snap, m)
    m, spy = CutMix(), MixSpy()
    learn = synth_learner(loss_func=lf, cbs=[m, spy])
    learn.fit(1)
    check_mixing(m, spy.records) # lam*mean(l0) + (1-lam)*mean(l1) is the mean of the mixed losses
    assert learn.loss_func is lf and lf.reduction == 'mean'

def test_mixer_class_instead_of_instance():
    "fastai makes an instance of a callback class given in `cbs`, so a mixer class works; MixChoice wants instances and says so"
    spy = MixSpy()
    learn = synth_learner(cbs=[MixUp, spy])
    lf = learn.loss_func
    learn.fit(1)
    assert isinstance(learn.mix_up, MixUp) and all(isinstance(r['lam'], torch.Tensor) for r in spy.records)
    check_mixing(learn.mix_up, spy.records)
    assert learn.loss_func is lf
    learn = synth_learner(cbs=spy)
    lf, cbs = learn.loss_func, list(learn.cbs)
    learn.fit(1, cbs=CutMix) # for one fit
    assert all(isinstance(r['lam'], float) for r in spy.records) and list(learn.cbs) == cbs and learn.loss_func is lf
    with pytest.raises(TypeError, match=r'mixers must be a non-empty list of mixer instances such as \[MixUp\(\), CutMix\(\)\]'): MixChoice([MixUp, CutMix])

def batches_dls(sizes, seed=0):
    "DataLoaders whose training batches have the given sizes (0 included)"
    g = torch.Generator().manual_seed(seed)
    bs = [(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)) for n in sizes]
    return DataLoaders(TorchDL(bs, batch_size=None), TorchDL(bs[:1], batch_size=None))

@pytest.mark.parametrize('mixer', MIXERS + [lambda: MixChoice([MixUp(), CutMix()], per_sample=True)])
def test_empty_batch_passes_untouched(mixer):
    m, spy = mixer(), MixSpy()
    lf = CrossEntropyLossFlat()
    learn = Learner(batches_dls([8, 0, 8]), nn.Sequential(nn.Flatten(), nn.Linear(192, 4)), loss_func=lf, cbs=[m, spy])
    snap = snapshot(learn)
    learn.fit(1, 1e-3)
    eq_([len(r['x']) for r in spy.records], [8, 0, 8])
    empty = spy.records[1]
    assert empty['perm'] is None and empty['lam'] is None and empty['xm'].shape == (0, 3, 8, 8)
    assert torch.isnan(empty['loss']) # the plain loss of no samples, as without a mixer
    if not isinstance(m, MixChoice): check_mixing(m, [spy.records[0], spy.records[2]])
    assert_as_found(learn, snap, m)

# ---- soak: many fits interrupted at random points ----

EVENTS = ['before_train', 'before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_backward', 'after_step', 'after_batch', 'after_train']
EXCS = [CancelBatchException, CancelTrainException, CancelEpochException, CancelFitException, KeyboardInterrupt]

class Interrupt(Callback):
    "Raise `exc` at the `at`-th time `event` comes in training; ordered before the mixers, as every fastai callback is"
    order, run_valid = MixHandler.order - 1, False
    def __init__(self, event, exc, at): self.event, self.exc, self.at, self.n = event, exc, at, 0
    def __call__(self, event_name):
        if event_name == self.event and self.training:
            self.n += 1
            if self.n == self.at: raise self.exc()
        return super().__call__(event_name)

@pytest.mark.slow
def test_soak_interrupted_fits():
    """60 fits on one learner per mixer, each interrupted at a random event of training (the n-th time it comes, in any
    epoch) by a random one of fastai's cancel exceptions or a KeyboardInterrupt, each followed by a clean fit. What it
    catches, beyond the exhaustive one-exception tests of tests/test_callback.py: a loss function, callback list or
    mixer state not given back after an interrupt that comes late in a fit or after earlier interrupted fits on the
    same learner (state that builds up), at before_train/after_train, with CutMix per sample at p < 1 and with
    MixChoice; and a learner that no longer trains and mixes correctly afterwards. (Its fits load in-process, see
    tests/conftest.py: the same 60 rounds take seconds, where starting loader workers at every epoch took minutes.)"""
    rng, t0 = random.Random(6), time.perf_counter()
    for mixer in [MixUp(), CutMix(), ResizeMix(), CutMix(per_sample=True, p=.7), MixChoice([MixUp(), ResizeMix()], per_sample=True)]:
        lf = CrossEntropyLossFlat()
        spy = MixSpy()
        with no_random(rng.randrange(1000)): learn = synth_learner(loss_func=lf, cbs=[mixer, spy], n=24, bs=5)
        learn.remove_cb(ProgressCallback); learn.logger = noop # quiet and quicker
        snap, n_ok = snapshot(learn), 0
        for i in range(12): # 60 interrupted fits in all, each followed by a clean one
            event, exc = rng.choice(EVENTS), rng.choice(EXCS)
            cb = Interrupt(event, exc, at=rng.randrange(1, 15))
            try: learn.fit(rng.randrange(1, 4), 1e-3, cbs=cb)
            except (KeyboardInterrupt, CancelFitException, CancelTrainException, CancelEpochException, CancelBatchException): pass
            assert learn.loss_func is lf, f"round {i}: {type(mixer).__name__}, {exc.__name__} at {event}: loss not given back"
            eq_(list(learn.cbs), snap[1]); eq_(lf.reduction, 'mean')
            learn.fit(1, 1e-3) # a clean fit afterwards trains and mixes
            assert learn.loss_func is lf and spy.records and not torch.isnan(learn.recorder.losses[-1])
            assert_as_found(learn, snap, mixer)
            if not isinstance(mixer, MixChoice) and mixer.p == 1: check_mixing(mixer, spy.records)
            n_ok += 1
        eq_(n_ok, 12)
    print(f'soak: {time.perf_counter() - t0:.1f} s')
