"ManifoldMixup and OutputMixup: activation read-back on a CNN, a TabularModel and an AWD-LSTM classifier, hooks gone on every way out, errors; fastai's U-Net, blocks run twice, the probe"
import pickle, tempfile, warnings
from pathlib import Path
from types import SimpleNamespace
import pytest
import numpy as np, pandas as pd
import torch, torch.nn as nn, torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck
from fastcore.test import test_close as close_, test_eq as eq_
from fastai.callback.core import Callback, CancelBatchException, CancelFitException
from fastai.callback.rnn import RNNCallback
from fastai.data.core import Datasets, DataLoaders
from fastai.data.transforms import ItemGetter
from fastai.layers import ResBlock, ConvLayer, MergeLayer
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat, BCEWithLogitsLossFlat, MSELossFlat
from fastai.tabular.data import TabularDataLoaders
from fastai.tabular.learner import tabular_learner
from fastai.tabular.core import Categorify, Normalize
from fastai.text.models.awdlstm import AWD_LSTM
from fastai.text.models.core import get_text_classifier
from fastai.torch_core import no_random
from fastai.vision.learner import unet_learner
from torchvision.models.resnet import BasicBlock
from fastai_mix import ManifoldMixup, OutputMixup, MixChoice, MixUp, CutMix, MixHandler, mixable_places
from fastai_mix.manifold import Place, probe_places
from fastai_mix.test_utils import synth_dls, synth_learner, synth_seg_learner, blend_shares
from test_callback import fit_without_sync

@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    "These tiny models train faster on one thread than on threads that wait on each other"
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(autouse=True)
def _seeded():
    "Every test draws from the same seeded streams (and leaves the global ones as they were)"
    with no_random(0): yield

# --- three small learners: a CNN of residual blocks, a TabularModel (categorical + continuous), an AWD-LSTM classifier

def cnn_learner(cbs=None, block='fastai', loss_func=None, **kwargs):
    "Residual CNN on `synth_dls` images: a stem, two blocks (fastai `ResBlock` or torchvision `BasicBlock`), a linear head"
    with no_random(0):
        dls = synth_dls(shape=(3, 8, 8), **kwargs)
        blocks = ([ResBlock(1, 8, 8), ResBlock(1, 8, 16, stride=2)] if block == 'fastai' else
                  [BasicBlock(8, 8), BasicBlock(8, 16, 2, downsample=nn.Sequential(nn.Conv2d(8, 16, 1, 2), nn.BatchNorm2d(16)))])
        model = nn.Sequential(ConvLayer(3, 8), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    return Learner(dls, model, loss_func=loss_func or CrossEntropyLossFlat(), cbs=cbs)

def tab_df(n=96, seed=0):
    g = np.random.default_rng(seed)
    df = pd.DataFrame(dict(a=g.choice(['x', 'y', 'z'], n), b=g.choice(['u', 'v'], n), c=g.normal(size=n), d=g.normal(size=n)))
    df['y'] = ((df.a == 'x') ^ (df.c > 0)).astype(int)
    return df

def tab_learner(cbs=None, y_block=None, loss_func=None, bs=16):
    "`tabular_learner` on two categorical and two continuous columns, no dropout"
    with no_random(0):
        from fastai.data.block import CategoryBlock
        dls = TabularDataLoaders.from_df(tab_df(), y_names='y', cat_names=['a', 'b'], cont_names=['c', 'd'], procs=[Categorify, Normalize],
                                         y_block=y_block or CategoryBlock(), valid_idx=list(range(80, 96)), bs=bs)
        return tabular_learner(dls, layers=[12, 8], loss_func=loss_func, cbs=cbs)

def text_learner(cbs=None, n=64, bs=16, sl=10):
    "A tiny AWD-LSTM classifier (fastai's `get_text_classifier`) on token ids whose class is the presence of token 5"
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, 12, (n, sl), generator=g)
    y = (x == 5).any(1).long()
    dsets = Datasets(list(zip(x, y)), tfms=[[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(n)), list(range(n))])
    with no_random(0):
        model = get_text_classifier(AWD_LSTM, 12, 2, seq_len=5, config=dict(emb_sz=8, n_hid=8, n_layers=1), lin_ftrs=[6], drop_mult=0.)
    rnns = model[0].module.rnns # fastai's WeightDropout fails at the second training batch with this torch (the LSTM registers the weight
    for i, wd in enumerate(rnns): # it removed again): the plain LSTMs, which leave the classifier's structure as it is
        for name in wd.layer_names:
            if hasattr(wd.module, name): delattr(wd.module, name)
            setattr(wd.module, name, nn.Parameter(getattr(wd, f'{name}_raw').data))
        rnns[i] = wd.module
    return Learner(dsets.dataloaders(bs=bs), model, loss_func=CrossEntropyLossFlat(), cbs=[RNNCallback()] + list(cbs or []))

LEARNERS = dict(cnn=cnn_learner, basic=lambda cbs=None: cnn_learner(cbs, block='torchvision'), tab=tab_learner, text=text_learner)

def hooks(model):
    "Forward hooks and pre-hooks left on `model`, by module name"
    return {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks}

def mixer_of(learn): return next(cb for cb in learn.cbs if isinstance(cb, MixHandler))

class Inputs(Callback):
    "The inputs of each training batch before the mixer"
    order, run_valid = -1, False
    def before_batch(self): self.x0 = tuple(o.clone() for o in self.learn.xb)

class Capture(Callback):
    "Record each training batch's place, the activation there before and after the mix, the shares, the prediction and the loss"
    order, run_valid = MixHandler.order + 1, False # its `before_batch` runs after the mixer's: it sees the hook the mixer set
    def __init__(self, places): self.places, self.records, self.raw = places, [], {}
    def before_fit(self):
        def grab(key, i):
            def f(m, args, out=None): self.raw.setdefault(key, {}).setdefault(i, (args[0] if out is None else out).detach().clone())
            return f
        self.handles = [] # the raw activations: hooks set before the mixer's, so they see the activation it gets
        for i, pl in enumerate(self.places):
            if pl.kind == 'output': self.handles.append(pl.module.register_forward_hook(grab('raw', i)))
            elif pl.kind == 'input': self.handles.append(pl.module.register_forward_pre_hook(grab('raw', i)))
    def before_batch(self):
        self.raw, mixer = {}, mixer_of(self.learn)
        self.pend = next((m._pending for m in [mixer, *getattr(mixer, 'mixers', [])] if getattr(m, '_pending', None) is not None), None)
        self.later, self.i = [], None # after the mixer's hook: they see what it returns
        if self.pend is not None:
            self.i = next((i for i, pl in enumerate(self.places) if pl.module is self.pend.place.module and pl.kind == self.pend.place.kind), None)
            def f(m, args, out=None): self.raw.setdefault('mixed', (args[0] if out is None else out).detach().clone()) # returns None: changes nothing
            mod = self.pend.place.module
            self.later.append(mod.register_forward_hook(f) if self.pend.place.kind == 'output' else mod.register_forward_pre_hook(f))
    def after_pred(self):
        for h in self.later: h.remove()
    def after_loss(self):
        mixer = mixer_of(self.learn)
        self.records.append(dict(pend=self.pend, i=self.i, raw=self.raw.get('raw', {}), mixed=self.raw.get('mixed'),
                                 x=getattr(getattr(self.learn, 'inputs', None), 'x0', None), xm=tuple(o.detach() for o in self.learn.xb), y=self.learn.yb, perm=mixer.perm, lam=mixer.lam,
                                 pred=self.learn.pred.detach(), loss=self.learn.loss.detach()))
    def after_fit(self):
        for h in self.handles: h.remove()

def check_record(r):
    "The share read back from the mixed activation (or inputs) is the share the loss uses"
    perm, lam = r['perm'], r['lam']
    moved = perm != torch.arange(len(perm))
    if r['pend'] is None: # the input pick
        x, xm = next((a, b) for a, b in zip(r['x'], r['xm']) if a.is_floating_point())
    else: x, xm = r['raw'][r['i']], r['mixed']
    moved &= (x - x[perm]).flatten(1).abs().amax(1) > 1e-3 # a partner with the same activation shows no blend
    assert moved.sum() >= len(moved) // 2
    close_(blend_shares(x, xm, perm)[moved], lam[moved], eps=1e-4)
    close_(xm, torch.lerp(x[perm], x, lam.view(-1, *[1] * (x.ndim - 1))), eps=1e-5)
    y = r['y'][0].flatten().long()
    ce = F.cross_entropy(r['pred'], y, reduction='none'), F.cross_entropy(r['pred'], y[perm], reduction='none')
    close_(r['loss'], (lam * ce[0] + (1 - lam) * ce[1]).mean(), eps=1e-5)

@pytest.mark.parametrize('kind', LEARNERS)
def test_readback(kind):
    "For every default place of each architecture, the activation blend's share equals the loss's share"
    learn = LEARNERS[kind]()
    xb = learn.dls.one_batch()[:learn.dls.n_inp]
    places = mixable_places(learn.model, xb)
    seen = set()
    for i, pl in enumerate(places):
        mixer = ManifoldMixup(alpha=1.)
        mixer.places = lambda model, xb=None, pl=pl: [pl] # this place only
        cap = Capture(places)
        learn.fit(1, lr=0, cbs=[mixer, cap, Inputs()])
        for r in cap.records:
            check_record(r); seen.add(r['i'] if r['pend'] is not None else i)
        eq_(hooks(learn.model), {})
    eq_(seen, set(range(len(places)))) # every place was mixed and read back
    eq_(len(places), {'cnn': 3, 'basic': 3, 'tab': 3, 'text': 2}[kind]) # input + 2 blocks; joined + 2 hidden; pooled + 1 hidden

# --- the hooks exist only during the training batch's forward pass

class Raise(Callback):
    "Raise `exc` at the given event of the second training batch"
    order, run_valid = MixHandler.order + 1, False
    def __init__(self, exc, event): self.exc, self.event, self.n = exc, event, 0
    def before_fit(self): self.n = 0
    def before_batch(self):
        self.n += 1
        if self.event == 'before_batch' and self.n == 2: raise self.exc('stop')
    def after_pred(self):
        if self.event == 'after_pred' and self.n == 2: raise self.exc('stop')

def raise_in_forward(learn, exc):
    "A hook set before the fit, raising `exc` inside the model's forward pass at the second training batch"
    n = [0]
    def f(m, args, out):
        if m.training: n[0] += 1
        if n[0] == 2: raise exc('stop')
    return list(learn.model.children())[-1].register_forward_hook(f)

def bad_loss(pred, y, reduction='mean'):
    bad_loss.n += 1
    if bad_loss.n == 2: raise RuntimeError('loss')
    return F.cross_entropy(pred, y.flatten().long(), reduction=reduction)

EXITS = [('normal', None, None), ('forward', RuntimeError, 'forward'), ('forward', KeyboardInterrupt, 'forward'), ('loss', RuntimeError, 'loss'),
         ('cancel', CancelBatchException, 'before_batch'), ('cancel', CancelFitException, 'before_batch'), ('interrupt', KeyboardInterrupt, 'before_batch'),
         ('pred', RuntimeError, 'after_pred'), ('pred', KeyboardInterrupt, 'after_pred')]

@pytest.mark.parametrize('on_learner', [True, False], ids=['on-learner', 'one-fit'])
@pytest.mark.parametrize('kind,exc,event', EXITS, ids=[f'{k}-{e.__name__ if e else ""}' for k, e, _ in EXITS])
@pytest.mark.parametrize('choice', [False, True], ids=['alone', 'in-MixChoice'])
def test_hooks_gone(kind, exc, event, on_learner, choice):
    "After a fit, however it ends, no hook is left on the model (or what a KeyboardInterrupt in the forward pass leaves is inert)"
    mixer = ManifoldMixup(use_input_mixup=False)
    cb = MixChoice([mixer]) if choice else mixer
    learn = tab_learner(cbs=cb if on_learner else None, loss_func=bad_loss if kind == 'loss' else None)
    bad_loss.n, lf = 0, learn.loss_func
    h = raise_in_forward(learn, exc) if event == 'forward' else None
    cbs = ([] if on_learner else [cb]) + ([Raise(exc, event)] if event in ('before_batch', 'after_pred') else [])
    try: learn.fit(1, cbs=cbs)
    except (RuntimeError, KeyboardInterrupt): assert exc in (RuntimeError, KeyboardInterrupt)
    if h is not None: h.remove()
    left = hooks(learn.model)
    if left: # only a KeyboardInterrupt, on the learner, before the batch's events could end: fastai runs no event then
        assert exc is KeyboardInterrupt and on_learner and event in ('forward', 'before_batch'), left
        x_cat, x_cont, _ = learn.dls.one_batch()
        learn.model.eval()
        mods = list(learn.model.modules())
        saved = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in mods]
        for m in mods: m._forward_hooks.clear(); m._forward_pre_hooks.clear()
        with torch.no_grad(): clean = learn.model(x_cat, x_cont)
        for m, (f, pre) in zip(mods, saved): m._forward_hooks.update(f); m._forward_pre_hooks.update(pre)
        with torch.no_grad(): eq_(learn.model(x_cat, x_cont), clean) # inert: nothing was mixed
        if event == 'forward': eq_(hooks(learn.model), {}) # and gone after the first forward pass after the interrupted one
    assert learn.loss_func is lf or getattr(learn.loss_func, 'loss_func', None) is lf
    learn.fit(1) # the next fit trains and leaves nothing
    eq_(hooks(learn.model), {})

def test_validate_get_preds_no_hooks():
    "Validation, `validate` and `get_preds` run the model with no hook of the mixer"
    learn = tab_learner(cbs=ManifoldMixup(use_input_mixup=False))
    seen = []
    h = learn.model.register_forward_pre_hook(lambda m, a: seen.append((m.training, hooks(m), len(a[0]))))
    learn.fit(1); learn.validate(); learn.get_preds()
    h.remove()
    assert any(n == 2 for t, _, n in seen) and all(not t for t, _, n in seen if n == 2) # the mixer's probe of its places (two samples, in eval mode, at the first batch)
    seen = [(t, h) for t, h, n in seen if n != 2] # the batches: 16 samples
    assert all(h == {'': 1} for t, h in seen if not t) and any(not t for t, h in seen) # in eval mode only this pre-hook
    assert all(len(h) == 2 for t, h in seen if t) # in training, the mixer's on the model and on the place too
    eq_(hooks(learn.model), {})

def test_stale_hook_inert():
    "A hook whose batch is over mixes nothing, and removes itself"
    learn = tab_learner()
    mixer = ManifoldMixup(use_input_mixup=False)
    learn.add_cb(mixer)
    b = learn.dls.one_batch()
    learn.xb, learn.yb, learn.training = b[:2], b[2:], True
    mixer.mix(learn.xb, learn.yb)
    assert hooks(learn.model)
    mixer._pending = None # as if the batch were over without the hooks taken off
    learn.model.eval()
    with torch.no_grad(): out = learn.model(*b[:2])
    eq_(hooks(learn.model), {})
    with torch.no_grad(): eq_(out, learn.model(*b[:2]))

def test_export_load(tmp_path):
    "The learner exports and loads with the mixer on it; the loaded one trains, with no hook left"
    learn = tab_learner(cbs=ManifoldMixup(module_list=['layers.0']))
    learn.fit(1)
    learn.export(tmp_path/'m.pkl')
    learn2 = load_learner(tmp_path/'m.pkl')
    m = mixer_of(learn2)
    eq_(m.module_list, ['layers.0']); assert m._pending is None
    learn2.dls = learn.dls
    learn2.fit(1)
    eq_(hooks(learn2.model), {})
    pickle.loads(pickle.dumps(ManifoldMixup(alpha=.3)))

# --- clear errors

@pytest.mark.parametrize('kwargs,err,msg', [
    (dict(alpha=0), ValueError, 'alpha must be'), (dict(p=2), ValueError, 'p must be a number in'),
    (dict(module_list=[]), TypeError, 'module_list must be None'), (dict(module_list=[3]), TypeError, 'module_list must be None'),
    (dict(use_input_mixup=1), TypeError, 'use_input_mixup must be True or False')])
def test_bad_args(kwargs, err, msg):
    with pytest.raises(err, match=msg): ManifoldMixup(**kwargs)

def test_output_bad_args():
    with pytest.raises(ValueError, match='alpha must be'): OutputMixup(alpha=-1)
    with pytest.raises(ValueError, match=r'MixChoice\(per_sample=True\).*ManifoldMixup'): MixChoice([MixUp(), ManifoldMixup()], per_sample=True)
    with pytest.raises(ValueError, match=r'OutputMixup mixes inside the model'): MixChoice([OutputMixup()], per_sample=True)

def test_runtime_errors():
    "Places that cannot be mixed stop the first batch with what is wrong; the learner is left as it was"
    learn = tab_learner()
    lf = learn.loss_func
    relu = next(m for m in learn.model.modules() if isinstance(m, nn.ReLU)) # fastai shares one ReLU between the hidden layers
    for ml, err, msg in [(['nope'], ValueError, "no module named 'nope'"), ([nn.Linear(2, 2)], ValueError, 'not a module of'),
                         ([relu], ValueError, r'module_list: .* \(ReLU\) runs \d times in one forward pass.*leave it out of module_list'), (['embeds'], RuntimeError, 'did not run')]:
        with pytest.raises(err, match=msg): learn.fit(1, cbs=ManifoldMixup(module_list=ml, use_input_mixup=False))
        eq_(hooks(learn.model), {}); assert learn.loss_func is lf
    learn = text_learner()
    with pytest.raises(TypeError, match=r"ManifoldMixup: 0 gives a tuple, but mixing needs a floating point tensor"):
        learn.fit(1, cbs=ManifoldMixup(module_list=['0'])) # the encoder gives (outputs, mask)
    eq_(hooks(learn.model), {})
    with pytest.raises(ValueError, match='found no hidden place to mix'): synth_learner(cbs=ManifoldMixup()).fit(1)
    with pytest.raises(ValueError, match='cannot mix a segmentation mask'): synth_seg_learner(cbs=ManifoldMixup(module_list=['0'])).fit(1)

# --- mixing options

def test_p_zero_and_stop_pct():
    "p=0 trains exactly as without the mixer; stop_pct stops the hooks"
    def losses(cbs):
        with no_random(0): learn = tab_learner(cbs=cbs)
        with no_random(1): learn.fit(1)
        return learn.recorder.losses
    eq_(losses([ManifoldMixup(p=0)]), losses([]))
    cap = Capture([])
    learn = tab_learner(cbs=[ManifoldMixup(stop_pct=.5, use_input_mixup=False), cap])
    learn.fit(2, lr=0)
    eq_([r['lam'] is not None for r in cap.records], [True] * 5 + [False] * 5)

def test_schedule_and_choice():
    "`mix_alpha`/`mix_p` schedules reach it, also inside a per-batch MixChoice, and each batch's read-back holds"
    from fastai.callback.schedule import ParamScheduler, SchedNo
    learn = tab_learner()
    xb = learn.dls.one_batch()[:2]
    places = mixable_places(learn.model, xb)
    cap = Capture(places)
    learn.fit(1, lr=0, cbs=[MixChoice([ManifoldMixup(alpha=.1)]), cap, Inputs(), ParamScheduler({'mix_alpha': SchedNo(8., 8.)})])
    for r in cap.records: check_record(r)
    assert 0.5 <= float(torch.cat([r['lam'] for r in cap.records]).mean()) < .7 # alpha 8: shares near .5 (alpha .1: near 1)
    eq_(hooks(learn.model), {})
    cap = Capture(places)
    learn.fit(1, lr=0, cbs=[ManifoldMixup(), cap, ParamScheduler({'mix_p': SchedNo(0., 0.)})])
    assert all(r['lam'] is None for r in cap.records)

@pytest.mark.parametrize('kind', ['tab', 'cnn'])
def test_bf16(kind):
    "Under to_bf16 the activation keeps its dtype, and the share the loss uses is the one it was blended with"
    class Autocast(Callback): # fastai's `to_bf16` autocasts on CUDA only: the same on the CPU
        order = -10
        def before_batch(self): self.ac = torch.autocast('cpu', dtype=torch.bfloat16); self.ac.__enter__()
        def after_pred(self): self.ac.__exit__(None, None, None); self.learn.pred = self.pred.float() # as fastai's MixedPrecision
    learn = LEARNERS[kind](cbs=Autocast())
    places = [p for p in mixable_places(learn.model, learn.dls.one_batch()[:learn.dls.n_inp]) if p.kind != 'batch']
    mixer = ManifoldMixup(use_input_mixup=False)
    cap = Capture(places)
    learn.fit(1, lr=0, cbs=[mixer, cap, Inputs()])
    assert any(r['mixed'].dtype == torch.bfloat16 for r in cap.records)
    for r in cap.records:
        eq_(r['mixed'].dtype, r['raw'][r['i']].dtype)
        eq_(r['lam'], r['lam'].bfloat16().float()) # the shares are bf16 numbers: what the blend used
        x, xm, perm, lam = r['raw'][r['i']].float(), r['mixed'].float(), r['perm'], r['lam']
        close_(xm, torch.lerp(x[perm], x, lam.view(-1, *[1] * (x.ndim - 1))), eps=5e-2)

# --- OutputMixup

def test_output_mixup_readback():
    "The logits are blended with the shares the loss uses; the text classifier's logits too (its head's output)"
    for make in (tab_learner, text_learner):
        learn = make()
        mixer = OutputMixup(alpha=1.)
        pl = mixer.places(learn.model)
        cap = Capture(pl)
        learn.fit(1, lr=0, cbs=[mixer, cap, Inputs()])
        for r in cap.records: check_record(r)
        eq_(hooks(learn.model), {})

def test_output_mixup_onehot():
    "One-hot float targets are blended with the logits' shares, and the loss is left alone"
    learn = synth_learner(loss_func=BCEWithLogitsLossFlat(), multi_label=True)
    mixer = OutputMixup()
    cap = Capture(mixer.places(learn.model))
    learn.fit(1, lr=0, cbs=[mixer, cap])
    for r in cap.records:
        lam, perm = r['lam'], r['perm']
        close_(r['y'][0].sum(1), torch.ones(len(perm)))
        close_(r['pred'], torch.lerp(r['raw'][0][perm], r['raw'][0], lam[:, None]), eps=1e-5)

def test_output_mixup_refuses():
    from fastai.data.block import RegressionBlock
    learn = tab_learner(y_block=RegressionBlock(), loss_func=MSELossFlat())
    with pytest.raises(ValueError, match='is a regression loss'): learn.fit(1, cbs=OutputMixup())
    learn = synth_seg_learner()
    with pytest.raises(ValueError, match='OutputMixup mixes the logits of a classifier'): learn.fit(1, cbs=OutputMixup())
    with pytest.raises(ValueError, match='no mixed inputs to show'): OutputMixup().show_batch(synth_dls())
    eq_(hooks(learn.model), {})

# --- show_batch

def test_show_batch():
    "The input pick is shown, said to be so; where the inputs cannot be blended (tabular ids) it says there is nothing to show"
    fig = ManifoldMixup().show_batch(synth_dls(), max_n=4, seed=0, show=False)
    assert 'input pick' in fig._suptitle.get_text()
    eq_(len(fig.axes), 4)
    learn = tab_learner(cbs=ManifoldMixup())
    with pytest.raises(ValueError, match='no mixed inputs to show'): learn.manifold_mixup.show_batch()
    with pytest.raises(ValueError, match='use_input_mixup is False'): ManifoldMixup(use_input_mixup=False).show_batch(synth_dls())
    eq_(hooks(learn.model), {})

# --- properties

EPS = {torch.float32: 1e-5, torch.float64: 1e-9, torch.float16: 2e-3, torch.bfloat16: 2e-2}

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 9), d=st.integers(1, 6), alpha=st.floats(.05, 8.), p=st.sampled_from([0., .3, 1.]) | st.floats(0., 1.),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_property_hidden_blend(n, d, alpha, p, dtype, seed):
    "Any batch size, width, alpha, p and dtype: the hidden activation is lerp(partner, own, lam) in its dtype, lam in [.5, 1], dense targets follow"
    model = nn.Sequential(nn.Linear(3, d), nn.Linear(d, 2)).to(dtype)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, generator=g).to(dtype), torch.rand(n, 2, generator=g)
    learn = SimpleNamespace(training=True, xb=(x,), model=model, loss_func=None, cbs=[])
    mixer = ManifoldMixup(alpha, module_list=[model[0]], use_input_mixup=False, p=p)
    object.__setattr__(mixer, 'learn', learn)
    seen = {}
    def grab(key): return lambda m, a, o: seen.__setitem__(key, o.detach().clone()) # returns None: changes nothing
    h1 = model[0].register_forward_hook(grab('raw')) # set before the mixer's: sees the raw output
    (xm, ym), perm, lam = mixer.mix(learn.xb, (y,))
    h2 = model[0].register_forward_hook(grab('mixed')) # after it: sees the blend
    assert xm is learn.xb # the inputs are left as they are
    out = model(x)
    h1.remove(); h2.remove()
    eq_(hooks(model), {})
    eq_(sorted(perm.tolist()), list(range(n)))
    assert ((lam >= .5) & (lam <= 1)).all() and torch.isfinite(lam).all()
    if p == 0: eq_(lam, torch.ones(n))
    if dtype in (torch.float16, torch.bfloat16): eq_(lam, lam.to(dtype).float()) # the shares are numbers of the activation's dtype
    raw, mixed = seen['raw'], seen['mixed']
    eq_(mixed.dtype, dtype)
    close_(mixed.double(), torch.lerp(raw[perm].double(), raw.double(), lam.double()[:, None]), eps=EPS[dtype])
    close_(ym[0], lam[:, None] * y + (1 - lam[:, None]) * y[perm], eps=1e-6)
    eq_(out.dtype, dtype)

# --- the GPU

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('kind', ['cnn', 'tab'])
@pytest.mark.parametrize('mixer', [ManifoldMixup, OutputMixup])
@pytest.mark.parametrize('fp16', [False, True], ids=['fp32', 'fp16'])
def test_cuda_no_host_sync(kind, mixer, fp16):
    "A training step's draws, hooks, blend and mixed loss never wait on the GPU"
    learn = LEARNERS[kind](cbs=mixer())
    learn.dls.to('cuda'); learn.model.cuda()
    if fp16: learn.to_fp16()
    learn.fit(1) # ManifoldMixup's probe of its places, once per model at its first batch, reads its verdicts on the host: a sync, once
    fit_without_sync(learn)
    eq_(hooks(learn.model), {})

@pytest.mark.parametrize('arch,names', [('resnet18', ['input'] + [f'0.{s}.{b}' for s in range(4, 8) for b in range(2)]),
                                        ('vgg11_bn', ['input', '0.0.3', '0.0.7', '0.0.14', '0.0.21', '0.0.28'])])
def test_vision_learner_places(arch, names):
    "`vision_learner`'s model: the outermost residual blocks of its body, or a flat body's pooling outputs; never the head"
    import torchvision.models as tvm
    from fastai.vision.learner import vision_learner
    learn = vision_learner(synth_dls(shape=(3, 32, 32)), getattr(tvm, arch), pretrained=False, n_out=4, loss_func=CrossEntropyLossFlat())
    eq_([p.name for p in mixable_places(learn.model, (torch.rand(2, 3, 32, 32),))], names)

def test_half_activation_rounds_shares():
    "An activation in a half dtype the shares were not rounded through (a cast inside the model): the shares and dense targets are rounded to match"
    class Cast(nn.Module):
        def forward(self, x): return x.bfloat16()
    model = nn.Sequential(nn.Linear(3, 4), Cast(), nn.Linear(4, 2).bfloat16())
    x, y = torch.randn(8, 3), torch.rand(8, 2)
    learn = SimpleNamespace(training=True, xb=(x,), model=model, loss_func=None, cbs=[])
    mixer = ManifoldMixup(alpha=1., module_list=[model[1]], use_input_mixup=False)
    object.__setattr__(mixer, 'learn', learn)
    (xm, ym), perm, lam = mixer.mix(learn.xb, (y,))
    assert not torch.equal(lam, lam.bfloat16().float()) # float32 inputs, no autocast: not rounded yet
    model(x)
    eq_(lam, lam.bfloat16().float()) # rounded in place: the loss sees the share the blend used
    close_(ym[0], lam[:, None] * y + (1 - lam[:, None]) * y[perm], eps=1e-6)

def test_choice_on_token_ids():
    "A MixChoice holding ManifoldMixup trains a text classifier, whose inputs are token ids only"
    learn = text_learner(cbs=[MixChoice([ManifoldMixup(), OutputMixup()])])
    learn.fit(1)
    eq_(hooks(learn.model), {})

# ---- Models that hide a mix: fastai's U-Net (its skip connections), a block run twice in one forward pass, the probe
# that finds the places leaving the model as it was, OutputMixup on a model that returns a tuple ----

def hooks_by_kind(model):
    "Forward hooks and pre-hooks on each module of `model`, counted apart"
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks}

class Batches(Callback):
    "Each training batch as the mixer leaves it: the place it picked, its partners and shares, the inputs and targets"
    order, run_valid = MixHandler.order + 1, False
    def __init__(self): self.records = []
    def before_fit(self): self.records = []
    def after_batch(self): self.records.append(self.now)
    def before_batch(self):
        m = next(cb for cb in self.learn.cbs if isinstance(cb, MixHandler))
        pend = m._pending
        self.now = dict(place=pend.place.name if pend is not None else 'input', perm=m.perm, lam=m.lam, xb=self.learn.xb, yb=self.learn.yb)

# ---- fastai's U-Net, whose skip connections carry the unmixed sample around every encoder block ----

def tiny_encoder(pretrained=False):
    "A small classifier that `unet_learner` cuts into an encoder of fastai ResBlocks (which were ManifoldMixup's default places)"
    return nn.Sequential(ConvLayer(3, 8, stride=2), ResBlock(1, 8, 8), ResBlock(1, 8, 16, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))

def unet_regression(cbs=None, n=16, bs=4):
    "`unet_learner` on 16x16 images with soft masks (float targets, one channel), `n_out=1`"
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 3, 16, 16, generator=g), torch.rand(n, 1, 16, 16, generator=g)
    with no_random(0):
        dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x[:4], y[:4])), bs=bs, device='cpu')
        return unet_learner(dls, tiny_encoder, pretrained=False, n_out=1, normalize=False, loss_func=MSELossFlat(), cbs=cbs)

class MergeInput(Callback):
    "The raw input the U-Net's final `MergeLayer` joins (its skip connection), in each training batch"
    order, run_valid = MixHandler.order + 1, False
    def before_fit(self):
        merge = next(m for m in self.learn.model.modules() if isinstance(m, MergeLayer))
        self.seen, self.h = [], merge.register_forward_pre_hook(lambda m, a: self.seen.append(a[0].orig.detach().clone()) if m.training else None)
    def after_fit(self): self.h.remove()

class RawAll(Callback):
    "Each training batch as the data gives it, before any mixer"
    order, run_valid = -1, False
    def before_fit(self): self.xy = []
    def before_batch(self): self.xy.append((self.learn.xb[0], self.learn.yb[0]))

def test_unet_mixes_consistently():
    "With the default places a U-Net is mixed at its inputs: the skip connections carry the blended sample, and the soft masks are blended with its share"
    learn = unet_regression()
    fastai_hooks = hooks_by_kind(learn.model) # DynamicUnet's own hooks on its encoder (its skip connections)
    eq_([p.name for p in mixable_places(learn.model, learn.dls.one_batch()[:1])], ['input'])
    raw, seen, merge = RawAll(), Batches(), MergeInput()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with no_random(1), learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[ManifoldMixup(alpha=1.), raw, seen, merge])
    assert not [o for o in w if 'ManifoldMixup' in str(o.message)] # nothing left out: a DynamicUnet's default is its inputs
    eq_(len(seen.records), 4)
    for (x0, y0), r, orig in zip(raw.xy, seen.records, merge.seen):
        eq_(r['place'], 'input')
        lam, perm = r['lam'].view(-1, 1, 1, 1), r['perm']
        assert (lam < 1).any()
        close_(r['xb'][0], torch.lerp(x0[perm], x0, lam), eps=1e-6)
        close_(r['yb'][0], torch.lerp(y0[perm], y0, lam), eps=1e-6) # the soft masks: blended with the share the inputs were
        eq_(orig, r['xb'][0]) # the final MergeLayer joins the blended input, not the sample's own
    eq_(hooks_by_kind(learn.model), fastai_hooks)

def test_unet_module_list_bypassed_refused():
    "An encoder block in module_list is refused at the first batch, by name; the block after the skips join is mixed"
    learn = unet_regression()
    fastai_hooks, lf = hooks_by_kind(learn.model), learn.loss_func
    seen = Batches()
    with pytest.raises(ValueError, match=r"module_list: layers\.0\.1 \(ResBlock\) is bypassed by a skip connection.*leave it out of module_list"):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[ManifoldMixup(module_list=['layers.0.1']), seen])
    eq_(seen.records, []) # no batch trained
    eq_(hooks_by_kind(learn.model), fastai_hooks); assert learn.loss_func is lf
    last = next(n for n, m in learn.model.named_modules() if isinstance(m, ResBlock) and not n.startswith('layers.0')) # after MergeLayer
    eq_([p.name for p in mixable_places(learn.model, learn.dls.one_batch()[:1], module_list=[last])], ['input', last])
    with no_random(0), learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[ManifoldMixup(module_list=[last], use_input_mixup=False), seen])
    eq_({r['place'] for r in seen.records}, {last})
    eq_(hooks_by_kind(learn.model), fastai_hooks)

# ---- a block that runs twice in one forward pass (shared weights) ----

class Twice(nn.Module):
    "A stem, one residual block run twice (shared weights), another block, a head"
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.other = ConvLayer(3, 8), ResBlock(1, 8, 8), ResBlock(1, 8, 8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    def forward(self, x): return self.head(self.other(self.block(self.block(self.stem(x)))))

def twice_learner(cbs=None):
    with no_random(0): return Learner(synth_dls(n=48, bs=4), Twice(), loss_func=CrossEntropyLossFlat(), cbs=cbs)

def test_shared_block_left_out_of_defaults():
    "The default places leave out the block that runs twice (with a warning naming it): the fit trains every batch"
    learn = twice_learner()
    seen = Batches()
    with pytest.warns(UserWarning, match=r"leaves out of Twice's default places: block runs 2 times in one forward pass"):
        with no_random(0), learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[ManifoldMixup(), seen])
    eq_(len(seen.records), 12)
    eq_({r['place'] for r in seen.records}, {'input', 'other'})
    eq_(hooks_by_kind(learn.model), {})

def test_shared_block_in_module_list_refused_at_first_batch():
    "A module_list holding the block that runs twice is refused at the first batch, before any batch trains, by name"
    learn = twice_learner()
    lf, seen = learn.loss_func, Batches()
    with pytest.raises(ValueError, match=r"module_list: block \(ResBlock\) runs 2 times in one forward pass.*leave it out of module_list"):
        with no_random(0), learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[ManifoldMixup(module_list=['block', 'other']), seen])
    eq_(seen.records, [])
    eq_(hooks_by_kind(learn.model), {}); assert learn.loss_func is lf

class TwiceInTraining(Twice):
    "The block runs twice in training only: a probe in eval mode cannot see it"
    def forward(self, x):
        x = self.block(self.stem(x))
        return self.head(self.other(self.block(x) if self.training else x))

def test_runtime_error_without_module_list():
    "A default place found running twice only when picked says so, and does not tell a user who gave no module_list to edit it"
    with no_random(0): learn = Learner(synth_dls(n=48, bs=4), TwiceInTraining(), loss_func=CrossEntropyLossFlat())
    mixer = ManifoldMixup(use_input_mixup=False)
    mixer.places = lambda model, xb=None: [p for p in mixable_places(model, xb) if p.name == 'block'] # this place only
    with pytest.raises(RuntimeError, match=r"block ran more than once.*it is one of this model's default places: give module_list=\[\.\.\.\] without it") as e:
        with no_random(0), learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=mixer)
    assert 'leave it out of module_list' not in str(e.value)
    eq_(hooks_by_kind(learn.model), {})

def test_probe_leaves_model_and_random_state():
    "The probe runs in eval mode without gradients: training flags, BatchNorm statistics, the random state and the hooks are as they were"
    learn = twice_learner()
    model = learn.model.train()
    model.other.eval() # a mixed state of flags is put back as it was
    bufs = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    x = learn.dls.one_batch()[0]
    state = torch.get_rng_state()
    with pytest.warns(UserWarning, match='block runs 2 times'): eq_([p.name for p in mixable_places(model, (x,))], ['input', 'other'])
    eq_(torch.get_rng_state(), state)
    eq_([m.training for m in model.modules()], flags)
    for k, v in model.state_dict().items(): eq_(v, bufs[k])
    eq_(hooks_by_kind(model), {})

class Stateful(nn.Module):
    "A module that keeps a state between batches, reset by fastai's `reset` convention (as AWD-LSTM's hidden state)"
    def __init__(self): super().__init__(); self.lin, self.state = nn.Linear(4, 4), 'kept'
    def reset(self): self.state = None
    def forward(self, x):
        self.state = x.detach()
        return self.lin(x)

def test_probe_leaves_recurrent_state():
    "A model with a state kept between batches is not probed: its state is as it was"
    model = nn.Sequential(Stateful(), nn.Linear(4, 2))
    eq_(probe_places(model, (torch.rand(4, 4),), [Place('0', model[0], 'output')]), [None])
    eq_(model[0].state, 'kept')

# ---- OutputMixup on a model that returns a tuple ----

class TupleOut(nn.Module):
    "A classifier that returns (logits, features)"
    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 8), nn.ReLU()), nn.Linear(8, 4)
    def forward(self, x):
        f = self.body(x)
        return self.fc(f), f

def test_output_mixup_tuple_output():
    "OutputMixup on a model that returns a tuple says what it needs and what to do, without module_list (it has none)"
    def loss(out, y, reduction='mean'): return F.cross_entropy(out[0], y, reduction=reduction)
    with no_random(0): learn = Learner(synth_dls(n=16, bs=4), TupleOut(), loss_func=loss)
    with pytest.raises(TypeError, match=r"OutputMixup mixes logits \(N, C\): one floating point tensor with one row per sample \(4 in this batch\).*"
                                        r"the model output is a tuple\. Give the learner a model whose forward returns the logits alone") as e:
        with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=OutputMixup())
    assert 'module_list' not in str(e.value)
    eq_(hooks_by_kind(learn.model), {})
