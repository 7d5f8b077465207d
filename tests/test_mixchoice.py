"""MixChoice: its picks follow its weights (any real numbers, refused when they cannot be chances), its chances never
below 0, its mixers' own stop_pct and a scheduled mix_alpha honoured. (p = 0 with dropout: tests/test_options.py;
MixChoice inside the model: tests/test_manifold.py; FMix in it: tests/test_fmix.py.)"""
import itertools
import numpy as np, pytest, torch
from fastcore.test import test_close as close_, test_eq as eq_
from fastai.callback.core import Callback
from fastai.callback.schedule import ParamScheduler, SchedLin, SchedNo
from fastai.torch_core import no_random
from fastai_mix import MixHandler, MixUp, CutMix, ResizeMix, MixChoice
from fastai_mix.test_utils import synth_learner, MixSpy
from test_callback import Mixing

def test_mixchoice_weights_and_picks():
    x = torch.rand(8, 3, 8, 8)
    only_mixup = MixChoice([MixUp(), CutMix()], weights=[1, 0])
    for _ in range(20):
        (xm, _), perm, lam = only_mixup.mix((x,), (torch.zeros(8).long(),), inplace=False)
        assert isinstance(lam, torch.Tensor) # MixUp's per-sample shares
    with no_random(0): picks = [isinstance(MixChoice([MixUp(), CutMix()], weights=[1, 3]).mix((x,), (torch.zeros(8).long(),), inplace=False)[2], float)
                                for _ in range(800)]
    assert abs(sum(picks) / 800 - .75) < .06 # 4 standard deviations

@pytest.mark.parametrize('w', [[np.float32(1), np.int64(2)], [torch.tensor(1.), torch.tensor(2)], np.array([1., 2.]), (1, 2.5)])
def test_mixchoice_weights_any_real_numbers(w):
    m = MixChoice([MixUp(), CutMix()], weights=w)
    close_(sum(m.weights), 1.)

@pytest.mark.parametrize('w', [[1, float('nan')], [1, -1], [True, 1], ['1', 1], [torch.tensor([1., 2.]), 1], [0, 0], [1]])
def test_mixchoice_bad_weights(w):
    with pytest.raises(ValueError, match=r"weights must be 2 finite numbers >= 0, not all 0, one per mixer; got"): MixChoice([MixUp(), CutMix()], weights=w)

# ---- its mixers' stop_pct and a scheduled mix_alpha ----

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

# ---- its chances never go below 0 ----

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

# ---- MixChoice refuses, when it is made, an option one of its mixers cannot mix with, and at the first batch a model one cannot read ----
import torch.nn as nn
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, BCEWithLogitsLossFlat
from fastai_mix.test_utils import synth_dls
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
