"ManifoldMixup and OutputMixup: activation read-back on a CNN, a TabularModel and an AWD-LSTM classifier, hooks gone on every way out, errors"
import pickle, tempfile
from pathlib import Path
from types import SimpleNamespace
import pytest
import numpy as np, pandas as pd
import torch, torch.nn as nn, torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck
from fastcore.test import test_close as close_, test_eq as eq_
from fastai.callback.core import Callback, CancelBatchException, CancelFitException
from fastai.callback.rnn import RNNCallback
from fastai.data.core import Datasets
from fastai.data.transforms import ItemGetter
from fastai.layers import ResBlock, ConvLayer
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat, BCEWithLogitsLossFlat, MSELossFlat
from fastai.tabular.data import TabularDataLoaders
from fastai.tabular.learner import tabular_learner
from fastai.tabular.core import Categorify, Normalize
from fastai.text.models.awdlstm import AWD_LSTM
from fastai.text.models.core import get_text_classifier
from fastai.torch_core import no_random
from torchvision.models.resnet import BasicBlock
from fastai_mix import ManifoldMixup, OutputMixup, MixChoice, MixUp, CutMix, MixHandler, mixable_places
from fastai_mix.test_utils import synth_dls, synth_learner, synth_seg_learner, blend_shares

@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    "These tiny models train faster on one thread than on threads that wait on each other"
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

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
        self.pend = getattr(mixer, '_pending', None)
        self.later = [] # after the mixer's hook: they see what it returns
        if self.pend is not None:
            i = next(i for i, pl in enumerate(self.places) if pl.module is self.pend.place.module and pl.kind == self.pend.place.kind)
            f = lambda m, args, out=None: self.raw.setdefault('mixed', (args[0] if out is None else out).detach().clone())
            mod = self.pend.place.module
            self.later.append(mod.register_forward_hook(f) if self.pend.place.kind == 'output' else mod.register_forward_pre_hook(f))
            self.i = i
    def after_pred(self):
        for h in self.later: h.remove()
    def after_loss(self):
        mixer = mixer_of(self.learn)
        self.records.append(dict(pend=self.pend, i=getattr(self, 'i', None) if self.pend else None, raw=self.raw.get('raw', {}), mixed=self.raw.get('mixed'),
                                 x=self.learn.inputs.x0, xm=tuple(o.detach() for o in self.learn.xb), y=self.learn.yb, perm=mixer.perm, lam=mixer.lam,
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
