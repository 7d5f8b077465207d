"TransMix: the shares read back from the block's own q and k, uniform attention gives CutMix's shares, hooks only in the training forward pass, every exit, fp16/bf16, bs 1, export, MixChoice, show_batch, errors"
import math, pickle
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from fastcore.test import test_close as close_, test_eq as eq_
from fastai.callback.core import Callback, CancelBatchException, CancelFitException
from fastai.learner import Learner, load_learner
from fastai.data.core import DataLoaders
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed
import fastai.callback.progress # Learner.no_bar
from fastai_mix import TransMix, CutMix, MixChoice
from fastai_mix.test_utils import synth_dls, MixSpy
timm = pytest.importorskip('timm')

def vit(size=16, patch=4, **kw):
    "A tiny timm ViT: 2 blocks of 2 heads, 32 wide"
    return timm.create_model('vit_tiny_patch16_224', pretrained=False, **{**dict(img_size=size, patch_size=patch, embed_dim=32, depth=2, num_heads=2, num_classes=3), **kw})

def dls_of(n=16, bs=8, size=16):
    "16 random images (2 batches), loaded in this process (no worker processes to start)"
    return DataLoaders(*[dl.new(num_workers=0) for dl in synth_dls(n=n, bs=bs, shape=(3, size, size), c=3).loaders])

def vit_learner(cbs=None, n=16, bs=8, size=16, model=None, **kw):
    "A learner of the tiny ViT on 16 random images (2 batches), quiet"
    learn = Learner(dls_of(n, bs, size), model if model is not None else vit(size, **kw), loss_func=CrossEntropyLossFlat(), cbs=cbs)
    learn.no_bar().__enter__(); learn.no_logging().__enter__() # the tests print nothing
    return learn

def hooks(model): return {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks}
def moved(perm): return perm != torch.arange(len(perm))

class AttnInputs(Callback):
    "Record the input of an attention module in each training forward pass (a test hook, set for the fit)"
    order = -2
    def __init__(self, attn): self.attn = attn
    def before_fit(self):
        self.xs = []
        self.h = self.attn.register_forward_pre_hook(lambda m, a: self.xs.append(a[0].detach().float().clone()) if m.training else None)
    def after_fit(self): self.h.remove()

def patch_attention_by_hand(x, attn, prefix=1, pool='token'):
    "Each patch's attention, mean over heads, of the class token (or the mean of the patch tokens), from the block's own q and k, renormalised over the patches"
    B, N, C = x.shape
    h, W, b = attn.num_heads, attn.qkv.weight.detach(), attn.qkv.bias.detach()
    q, k = (F.linear(x, W[i * C:(i + 1) * C], b[i * C:(i + 1) * C]).view(B, N, h, -1).transpose(1, 2) for i in (0, 1))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // h), -1) # (B, heads, N, N)
    rows = a[:, :, 0] if pool == 'token' else a[:, :, prefix:].mean(2)
    r = rows.mean(1)[:, prefix:]
    return r / r.sum(1, keepdim=True)

def expected_shares(x, xm, perm, attn_in, attn, patch, area_weight=.5, prefix=1, pool='token'):
    "The shares read from the pixels (the pasted box) and the attention by hand: area share and attention share, mixed by `area_weight`"
    pasted = (xm != x).any(1) # (n, H, W): pixels of the partner
    area = 1 - pasted.float().mean((1, 2))
    on_patches = pasted[:, ::patch, ::patch].flatten(1).float() # a patch is the partner's when its top-left pixel is (the official code's nearest)
    a = patch_attention_by_hand(attn_in, attn, prefix, pool)
    return area_weight * area + (1 - area_weight) * (1 - (a * on_patches).sum(1))

@pytest.mark.parametrize('per_sample', [False, True], ids=['batch', 'sample'])
@pytest.mark.parametrize('pool', ['token', 'avg'])
def test_shares_read_back(per_sample, pool):
    "Through `Learner.fit`: each sample's share is the mean of its area share and the attention share recomputed by hand from the last block's q and k"
    set_seed(0)
    model = vit(**(dict(global_pool='avg', class_token=False) if pool == 'avg' else {}))
    attn = model.blocks[-1].attn
    spy, inp = MixSpy(), AttnInputs(attn)
    learn = vit_learner(cbs=[TransMix(per_sample=per_sample), spy, inp], model=model)
    learn.fit(1, lr=0) # the weights stay as they are, so the test reads the same q and k
    eq_(len(spy.records), len(inp.xs)); eq_(len(spy.records), 2)
    for r, a_in in zip(spy.records, inp.xs):
        ok = moved(r['perm'])
        assert r['lam'].shape == (8,) and r['lam'].dtype == torch.float32 and not r['lam'].requires_grad
        want = expected_shares(r['x'], r['xm'], r['perm'], a_in, attn, 4, prefix=0 if pool == 'avg' else 1, pool=pool)
        close_(r['lam'][ok], want[ok], eps=1e-5)
    eq_(hooks(model), {})

@pytest.mark.parametrize('per_sample', [False, True], ids=['batch', 'sample'])
def test_uniform_attention_gives_cutmix_shares(per_sample):
    "With q and k zero the attention is uniform: with patches of one pixel, TransMix's shares are CutMix's, from the same draws"
    def run(mixer):
        set_seed(1)
        model = vit(size=8, patch=1)
        with torch.no_grad(): model.blocks[-1].attn.qkv.weight[:64].zero_(); model.blocks[-1].attn.qkv.bias[:64].zero_() # q and k
        spy = MixSpy()
        vit_learner(cbs=[mixer, spy], model=model, size=8).fit(1, lr=0)
        return spy.records
    tm, cm = run(TransMix(per_sample=per_sample, area_weight=0)), run(CutMix(per_sample=per_sample))
    eq_(len(tm), len(cm))
    for a, b in zip(tm, cm):
        eq_(a['perm'], b['perm']); eq_(a['xm'], b['xm']) # pasted as CutMix does
        ok = moved(a['perm'])
        lam_c = torch.as_tensor(b['lam']).expand(len(ok))
        close_(a['lam'][ok], lam_c[ok], eps=1e-5)
        assert (a['lam'][~ok] == 1).all() # a sample pasted with itself keeps all of its label

class Raise(Callback):
    order = 95
    def __init__(self, exc, event): self.exc, self.event = exc, event
    def __getattr__(self, name):
        if name == self.event:
            def f():
                if self.learn.training: raise self.exc('stop')
            return f
        return super().__getattr__(name)

EXITS = [(None, None), (RuntimeError, 'forward'), (KeyboardInterrupt, 'forward'), (CancelBatchException, 'after_pred'),
         (CancelFitException, 'before_batch'), (RuntimeError, 'after_loss')]

@pytest.mark.parametrize('exc,event', EXITS, ids=[f'{e.__name__ if e else "normal"}-{ev}' for e, ev in EXITS])
def test_hooks_gone_loss_restored(exc, event):
    "However the fit ends, no hook is left on the model (a KeyboardInterrupt's is inert and goes at the next forward pass) and the loss is the original"
    model = vit()
    learn = vit_learner(cbs=TransMix(), model=model)
    lf, cbs, h = learn.loss_func, [], None
    if event == 'forward':
        def f(m, a, o):
            if m.training: raise exc('stop')
        h = model.head.register_forward_hook(f)
    elif event: cbs = [Raise(exc, event)]
    try: learn.fit(1, cbs=cbs)
    except (RuntimeError, KeyboardInterrupt): assert exc in (RuntimeError, KeyboardInterrupt)
    if h is not None: h.remove()
    assert learn.loss_func is lf
    left = hooks(model)
    if left: # a KeyboardInterrupt inside the forward pass, where fastai runs no event: the hooks stay, inert
        assert exc is KeyboardInterrupt, left
        x = learn.dls.one_batch()[0]
        model.train()
        with torch.no_grad(): model(x)
    learn.fit(1)
    eq_(hooks(model), {})
    assert learn.loss_func is lf

def test_no_hook_outside_training_forward():
    "Validation, `validate` and `get_preds` run the model without TransMix's hooks; training runs it with three (model pre-hook, model hook, qkv hook)"
    model = vit()
    learn = vit_learner(cbs=TransMix(), model=model)
    seen = []
    h = model.register_forward_pre_hook(lambda m, a: seen.append((m.training, sum(hooks(model).values()))))
    learn.fit(1); learn.validate(); learn.get_preds()
    h.remove()
    assert all(n == 1 for t, n in seen if not t) and any(not t for t, _ in seen)
    assert all(n == 4 for t, n in seen if t) and any(t for t, _ in seen)
    eq_(hooks(model), {})

def test_bf16_autocast():
    "Under bf16 autocast (as `to_bf16`) the shares are float32, detached, and those read by hand from the bf16 activations"
    class Autocast(Callback): # fastai's `to_bf16` autocasts on CUDA only: the same on the CPU
        order = -10
        def before_batch(self): self.ac = torch.autocast('cpu', dtype=torch.bfloat16); self.ac.__enter__()
        def after_pred(self): self.ac.__exit__(None, None, None); self.learn.pred = self.pred.float()
    set_seed(0)
    model = vit()
    attn = model.blocks[-1].attn
    spy, inp = MixSpy(), AttnInputs(attn)
    vit_learner(cbs=[Autocast(), TransMix(area_weight=0), spy, inp], model=model).fit(1, lr=0)
    for r, a_in in zip(spy.records, inp.xs):
        assert r['lam'].dtype == torch.float32 and not r['lam'].requires_grad
        ok = moved(r['perm'])
        close_(r['lam'][ok], expected_shares(r['x'], r['xm'], r['perm'], a_in, attn, 4, area_weight=0)[ok], eps=3e-2) # q, k in bf16

def test_bs1():
    "Batch size 1: the sample is its own partner, its share is 1 and the loss the plain one"
    spy = MixSpy()
    learn = vit_learner(cbs=[TransMix(), spy], n=4, bs=1)
    learn.fit(1, lr=0)
    for r in spy.records:
        eq_(r['lam'], torch.ones(1))
        close_(r['loss'], F.cross_entropy(r['pred'], r['y'][0]), eps=1e-6)

def test_export_load(tmp_path):
    "The learner exports and loads with TransMix on it, no state or hook pickled; the loaded one trains and leaves no hook"
    learn = vit_learner(cbs=TransMix(attn_module='blocks.0.attn', per_sample=True))
    learn.fit(1)
    learn.export(tmp_path/'m.pkl')
    learn2 = load_learner(tmp_path/'m.pkl')
    m = learn2.trans_mix
    eq_((m.attn_module, m.per_sample), ('blocks.0.attn', True)); assert m._pending is None and m._found is None
    learn2.dls = learn.dls
    learn2.fit(1)
    eq_(hooks(learn2.model), {})
    pickle.loads(pickle.dumps(TransMix(area_weight=.2)))

def test_mixchoice():
    "MixChoice picking per batch holds TransMix: its batches get attention shares, the others CutMix's; per sample it is refused"
    set_seed(0)
    spy = MixSpy()
    choice = MixChoice([TransMix(area_weight=0), CutMix()])
    learn = vit_learner(cbs=[choice, spy], n=64, bs=4)
    learn.fit(1, lr=0)
    eq_(hooks(learn.model), {})
    kinds = [r['lam'] is not None and isinstance(r['lam'], torch.Tensor) for r in spy.records]
    assert any(kinds) and not all(kinds) # both picked: TransMix's shares per sample, CutMix's per batch (a float)
    with pytest.raises(ValueError, match='per_sample=False'): MixChoice([TransMix(), CutMix()], per_sample=True)

def test_vision_learner_and_named_module():
    "A timm ViT through fastai's `vision_learner`: the last block's attention is found inside the body; a named module is read instead"
    from fastai.vision.learner import vision_learner
    set_seed(0)
    dls = dls_of()
    kw = dict(pretrained=False, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    learn = vision_learner(dls, 'vit_tiny_patch16_224', n_out=3, loss_func=CrossEntropyLossFlat(), cbs=TransMix(), **kw)
    learn.fit(1)
    eq_(learn.trans_mix._found[2], '0.model.blocks.1.attn')
    learn = vision_learner(dls, 'vit_tiny_patch16_224', n_out=3, loss_func=CrossEntropyLossFlat(), cbs=TransMix(attn_module='0.model.blocks.0.attn'), **kw)
    learn.fit(1)
    eq_(learn.trans_mix._found[2:], ('0.model.blocks.0.attn', 1, 'token'))
    eq_(hooks(learn.model), {})

def test_errors():
    "Clear errors: a bad attn_module at construction; a name not in the model, or a model with no attention module, at the first batch"
    with pytest.raises(TypeError, match='attn_module must be None'): TransMix(attn_module=3)
    with pytest.raises(TypeError, match='needs a linear layer `qkv`'): TransMix(attn_module=nn.Linear(2, 2))
    with pytest.raises(ValueError, match='area_weight'): TransMix(area_weight=2)
    with pytest.raises(ValueError, match=r"no module named 'blocks.9.attn'.*blocks.1.attn"): vit_learner(cbs=TransMix(attn_module='blocks.9.attn')).fit(1)
    with pytest.raises(TypeError, match="'blocks.0' is a Block"): vit_learner(cbs=TransMix(attn_module='blocks.0')).fit(1)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match='found no attention module in Sequential.*attn_module='): vit_learner(cbs=TransMix(), model=cnn).fit(1)
    learn = vit_learner(cbs=TransMix(attn_module=vit().blocks[0].attn))
    with pytest.raises(ValueError, match='not a module of the learner'): learn.fit(1)
    assert hooks(learn.model) == {} and not isinstance(learn.loss_func, type(None))

def test_show_batch_leaves_model_and_random_states():
    "show_batch titles the samples with the shares of an eval-mode forward pass; the model's modes, BatchNorm statistics, weights and random states are as they were"
    from fastai.vision.learner import vision_learner
    import matplotlib; matplotlib.use('Agg')
    set_seed(0)
    dls = dls_of()
    learn = vision_learner(dls, 'vit_tiny_patch16_224', n_out=3, loss_func=CrossEntropyLossFlat(), cbs=TransMix(per_sample=True), pretrained=False, img_size=16, patch_size=4, embed_dim=32,
                           depth=2, num_heads=2, drop_rate=.5)
    learn.model.train()
    learn.model[1][0].eval() # a mix of modes, put back as it is
    modes = [m.training for m in learn.model.modules()]
    state = {k: v.clone() for k, v in learn.model.state_dict().items()}
    rng = torch.get_rng_state()
    fig = learn.trans_mix.show_batch(seed=3, show=False, max_n=4)
    eq_([m.training for m in learn.model.modules()], modes)
    for k, v in learn.model.state_dict().items(): eq_(v, state[k])
    eq_(torch.get_rng_state(), rng)
    eq_(hooks(learn.model), {})
    titles = [ax.get_title() for ax in fig.axes]
    eq_(len(titles), 4); assert all(titles)
    with pytest.raises(ValueError, match='from the learner'): TransMix().show_batch(dls)

def test_mix_outside_training_reads_eval_attention():
    "Called outside a training batch (as show_batch does), `mix` reads the shares from one eval-mode forward pass of the mixed batch, by hand the same"
    set_seed(0)
    learn = vit_learner(cbs=TransMix(per_sample=True), drop_rate=.5)
    x, y = learn.dls.one_batch()
    (xm, _), perm, lam = learn.trans_mix.mix((x,), (y,))
    eq_(hooks(learn.model), {}); assert learn.model.training
    attn, seen = learn.model.blocks[-1].attn, []
    h = attn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    learn.model.eval()
    with torch.no_grad(): learn.model(xm[0])
    h.remove()
    ok = moved(perm)
    close_(lam[ok], expected_shares(x, xm[0], perm, seen[0], attn, 4)[ok], eps=1e-5)

def test_demo_vit_and_transmix(capsys):
    "The demo's 'vit' arch is a timm ViT at the data's size (1 or 3 channels) that TransMix reads; --mix transmix without it is refused"
    from fastai_mix.demo import make_model, make_mixer, main
    m = make_model('vit', 10, n_in=1, size=28)
    eq_(m(torch.zeros(2, 1, 28, 28)).shape, (2, 10)); eq_(m.patch_embed.num_patches, 49)
    assert isinstance(make_mixer('transmix'), TransMix)
    with pytest.raises(SystemExit): main(['demo', '--mix', 'none,transmix', '--arch', 'small'])
    assert 'give --arch vit' in capsys.readouterr().err

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('per_sample', [False, True], ids=['batch', 'sample'])
def test_cuda_no_host_sync(per_sample):
    "On CUDA under to_fp16, a training step's pasting, share reading and mixed loss never wait on the GPU"
    import fastai.callback.fp16 # noqa: F401  (to_fp16)
    from test_callback import fit_without_sync
    learn = vit_learner(cbs=TransMix(per_sample=per_sample), n=32, bs=16)
    learn.dls.to('cuda'); learn.model.cuda()
    learn.to_fp16()
    fit_without_sync(learn)
    eq_(hooks(learn.model), {})

def test_partner_policy_and_decoupled():
    "TransMix pairs by `partner` (here within a class: lone samples left alone, share 1) and trains with the decoupled loss; remix is refused"
    set_seed(0)
    spy = MixSpy()
    learn = vit_learner(cbs=[TransMix(partner='same_class', decoupled=.1), spy])
    learn.fit(1, lr=0)
    assert spy.records
    for r in spy.records:
        y, perm = r['y'][0] if isinstance(r['y'], tuple) else r['y'], r['perm']
        eq_(y[perm], y)
        eq_(r['lam'][~moved(perm)], torch.ones(int((~moved(perm)).sum())))
    eq_(hooks(learn.model), {})
    with pytest.raises(ValueError, match='remix=None'): TransMix(remix=(3, .5))
