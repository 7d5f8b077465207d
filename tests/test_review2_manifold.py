"Issue 20, items 6, 12 and 16: ManifoldMixup on fastai's U-Net (skip connections), a block run twice per forward pass, OutputMixup on a tuple"
import warnings
import pytest
import torch, torch.nn as nn, torch.nn.functional as F
from fastcore.test import test_close as close_, test_eq as eq_
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.layers import ConvLayer, ResBlock, MergeLayer
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, MSELossFlat
from fastai.torch_core import no_random
from fastai.vision.learner import unet_learner
from fastai_mix import ManifoldMixup, OutputMixup, MixHandler, mixable_places
from fastai_mix.manifold import Place, probe_places
from fastai_mix.test_utils import synth_dls

@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def hooks(model):
    "Forward hooks and pre-hooks on each module of `model`"
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

# --- 6: fastai's U-Net, whose skip connections carry the unmixed sample around every encoder block

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
    fastai_hooks = hooks(learn.model) # DynamicUnet's own hooks on its encoder (its skip connections)
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
    eq_(hooks(learn.model), fastai_hooks)

def test_unet_module_list_bypassed_refused():
    "An encoder block in module_list is refused at the first batch, by name; the block after the skips join is mixed"
    learn = unet_regression()
    fastai_hooks, lf = hooks(learn.model), learn.loss_func
    seen = Batches()
    with pytest.raises(ValueError, match=r"module_list: layers\.0\.1 \(ResBlock\) is bypassed by a skip connection.*leave it out of module_list"):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[ManifoldMixup(module_list=['layers.0.1']), seen])
    eq_(seen.records, []) # no batch trained
    eq_(hooks(learn.model), fastai_hooks); assert learn.loss_func is lf
    last = next(n for n, m in learn.model.named_modules() if isinstance(m, ResBlock) and not n.startswith('layers.0')) # after MergeLayer
    eq_([p.name for p in mixable_places(learn.model, learn.dls.one_batch()[:1], module_list=[last])], ['input', last])
    with no_random(0), learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[ManifoldMixup(module_list=[last], use_input_mixup=False), seen])
    eq_({r['place'] for r in seen.records}, {last})
    eq_(hooks(learn.model), fastai_hooks)

# --- 12: a block that runs twice in one forward pass (shared weights)

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
    eq_(hooks(learn.model), {})

def test_shared_block_in_module_list_refused_at_first_batch():
    "A module_list holding the block that runs twice is refused at the first batch, before any batch trains, by name"
    learn = twice_learner()
    lf, seen = learn.loss_func, Batches()
    with pytest.raises(ValueError, match=r"module_list: block \(ResBlock\) runs 2 times in one forward pass.*leave it out of module_list"):
        with no_random(0), learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[ManifoldMixup(module_list=['block', 'other']), seen])
    eq_(seen.records, [])
    eq_(hooks(learn.model), {}); assert learn.loss_func is lf

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
    eq_(hooks(learn.model), {})

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
    eq_(hooks(model), {})

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

# --- 16: OutputMixup on a model that returns a tuple

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
    eq_(hooks(learn.model), {})
