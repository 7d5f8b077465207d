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

def on_patches(pasted, patch, nearest=False):
    "How much of each (square) patch of the tiled image is the partner's: the share of its pixels, or with `nearest` all when its top-left pixel is (the official code's)"
    return pasted[:, ::patch, ::patch].flatten(1).float() if nearest else F.avg_pool2d(pasted[:, None].float(), patch)[:, 0].flatten(1)

def expected_shares(x, xm, perm, attn_in, attn, patch, area_weight=.5, prefix=1, pool='token', nearest=False):
    "The shares read from the pixels (the pasted box) and the attention by hand: area share and attention share, mixed by `area_weight`"
    pasted = (xm != x).any(1) # (n, H, W): pixels of the partner
    area = 1 - pasted.float().mean((1, 2))
    a = patch_attention_by_hand(attn_in, attn, prefix, pool)
    return area_weight * area + (1 - area_weight) * (1 - (a * on_patches(pasted, patch, nearest)).sum(1))

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
    "However the fit ends, no hook is left on the model and its fused attention is back (a KeyboardInterrupt's are inert and go at the next forward pass); the loss is the original"
    model = vit()
    fused = [b.attn.fused_attn for b in model.blocks]
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
    eq_([b.attn.fused_attn for b in model.blocks], fused)
    learn.fit(1)
    eq_(hooks(model), {})
    eq_([b.attn.fused_attn for b in model.blocks], fused)
    assert learn.loss_func is lf

def test_no_hook_outside_training_forward():
    "Validation, `validate` and `get_preds` run the model without TransMix's hooks; training runs it with three (model pre-hook, model hook, attn_drop hook)"
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
    eq_(learn.trans_mix._found[2:5], ('0.model.blocks.0.attn', 1, 'token'))
    eq_(hooks(learn.model), {})

def test_errors():
    "Clear errors: a bad attn_module at construction; a name not in the model, or a model with no attention module, at the first batch"
    with pytest.raises(TypeError, match='attn_module must be None'): TransMix(attn_module=3)
    with pytest.raises(TypeError, match='Linear is not an attention module TransMix reads'): TransMix(attn_module=nn.Linear(2, 2))
    with pytest.raises(ValueError, match='area_weight'): TransMix(area_weight=2)
    with pytest.raises(ValueError, match=r"no module named 'blocks.9.attn'.*blocks.1.attn"): vit_learner(cbs=TransMix(attn_module='blocks.9.attn')).fit(1)
    with pytest.raises(TypeError, match="'blocks.0' is a Block"): vit_learner(cbs=TransMix(attn_module='blocks.0')).fit(1)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match='found no attention module it reads in Sequential.*use CutMix'): vit_learner(cbs=TransMix(), model=cnn).fit(1)
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

# Issue 29: the union label mode, the patches counted by their pixels on the model's own grid, the attention the model computes
# (rotary embeddings, BEiT's and EVA's q/v biases), and the models TransMix reads or refuses

def test_label_mode_union_refused():
    "label_mode='union' gives each sample the union of the two multi-label vectors whatever the shares: TransMix refuses it when made, a MixChoice "
    "holding it when the choice is made, and a choice set to it afterwards before the first batch"
    with pytest.raises(ValueError, match=r"TransMix\(label_mode='union'\).*whatever the shares.*CutMix\(label_mode='union'\)"): TransMix(label_mode='union')
    with pytest.raises(ValueError, match=r"MixChoice\(label_mode='union'\) gives label_mode.*TransMix cannot mix with it"): MixChoice([TransMix(), CutMix()], label_mode='union')
    from fastai.losses import BCEWithLogitsLossFlat
    dls = DataLoaders(*[dl.new(num_workers=0) for dl in synth_dls(n=16, bs=8, shape=(3, 16, 16), c=3, multi_label=True).loaders])
    model, spy = vit(), MixSpy()
    choice = MixChoice([TransMix(), CutMix()])
    choice.label_mode = 'union' # set after the choice was made
    learn = Learner(dls, model, loss_func=BCEWithLogitsLossFlat(), cbs=[choice, spy])
    learn.no_bar().__enter__(); learn.no_logging().__enter__()
    lf = learn.loss_func
    with pytest.raises(ValueError, match=r"MixChoice\(label_mode='union'\) gives label_mode.*TransMix cannot mix with it"): learn.fit(1, lr=0)
    eq_(spy.records, []); eq_(hooks(model), {}); assert learn.loss_func is lf
    choice.label_mode = 'blend' # blended by the shares, the targets follow the attention
    learn.fit(1, lr=0)
    assert any(((r['ym'][0] > 0) & (r['ym'][0] < 1)).any() for r in spy.records)

def pixel_model(geometry):
    "A tiny timm ViT whose last block's q and k are zero (uniform attention), and the images' side: 4-px patches tiling 16 px, 2x8-px patches, the demo's ViT at 18 px (the last 2 px left out), or 18 px padded to whole patches"
    if geometry == 'demo-18px':
        from fastai_mix.demo import make_model
        model, size = make_model('vit', 3, n_in=3, size=18), 18
    else:
        size = 18 if geometry == 'padded-18px' else 16
        kw = dict(patch=(2, 8)) if geometry == 'rect-2x8' else dict(dynamic_img_pad=True, dynamic_img_size=True) if geometry == 'padded-18px' else {}
        model = vit(size, **kw)
    attn = model.blocks[-1].attn
    with torch.no_grad(): attn.qkv.weight[:2 * attn.attn_dim].zero_(); attn.qkv.bias[:2 * attn.attn_dim].zero_() # q and k
    return model, size

GEOMETRIES = ['square-4px', 'rect-2x8', 'demo-18px', 'padded-18px']

@pytest.mark.parametrize('per_sample', [False, True], ids=['batch', 'sample'])
@pytest.mark.parametrize('geometry', GEOMETRIES)
def test_uniform_attention_gives_pixel_shares(geometry, per_sample):
    "With uniform attention and area_weight=0, each share is the share of the pixels the model reads that the sample keeps, on the model's own patch grid: CutMix's area share where the patches tile the image or pad it"
    set_seed(3)
    model, size = pixel_model(geometry)
    spy = MixSpy()
    vit_learner(cbs=[TransMix(per_sample=per_sample, area_weight=0), spy], model=model, size=size).fit(1, lr=0)
    assert len(spy.records) == 2
    for r in spy.records:
        pasted = (r['xm'] != r['x']).any(1).float()
        if geometry == 'demo-18px': pasted = pasted[:, :16, :16] # timm's patches of 4 px cover 16 of the 18 px: the model reads no more
        close_(r['lam'], 1 - pasted.mean((1, 2)), eps=1e-6)
        if geometry == 'square-4px': # the boxes do not follow the patches here, so counting patches by one pixel would be off
            assert (1 - on_patches(pasted > 0, 4, nearest=True).mean(1) - r['lam']).abs().max() > .01

def test_uniform_attention_padded_is_cutmix():
    "With timm's dynamic_img_pad (18 px padded to 5x5 patches of 4 px), uniform attention gives exactly CutMix's shares from the same draws"
    def run(mixer):
        set_seed(1)
        spy = MixSpy()
        model, size = pixel_model('padded-18px')
        vit_learner(cbs=[mixer, spy], model=model, size=size).fit(1, lr=0)
        return spy.records
    for a, b in zip(run(TransMix(per_sample=True, area_weight=0)), run(CutMix(per_sample=True))):
        eq_(a['perm'], b['perm']); eq_(a['xm'], b['xm'])
        close_(a['lam'], torch.where(moved(a['perm']), torch.as_tensor(b['lam']), 1.), eps=1e-6)

@pytest.mark.parametrize('pool', ['token', 'avg'])
def test_nearest_patch_share_is_official(pool):
    "patch_share='nearest' counts a patch as pasted when the official code's nearest sampling does (its top-left pixel, on a tiling grid)"
    set_seed(0)
    model = vit(**(dict(global_pool='avg', class_token=False) if pool == 'avg' else {}))
    attn = model.blocks[-1].attn
    spy, inp = MixSpy(), AttnInputs(attn)
    vit_learner(cbs=[TransMix(per_sample=True, patch_share='nearest'), spy, inp], model=model).fit(1, lr=0)
    for r, a_in in zip(spy.records, inp.xs):
        ok = moved(r['perm'])
        want = expected_shares(r['x'], r['xm'], r['perm'], a_in, attn, 4, prefix=0 if pool == 'avg' else 1, pool=pool, nearest=True)
        close_(r['lam'][ok], want[ok], eps=1e-5)
    with pytest.raises(ValueError, match="patch_share must be 'pixels'.*or 'nearest'.*got 'box'"): TransMix(patch_share='box')

class AttnCalls(Callback):
    "Record the arguments (positional and keyword: EVA's `rope`) of an attention module in each training forward pass (a test hook, set for the fit)"
    order = -2
    def __init__(self, attn): self.attn = attn
    def before_fit(self):
        self.calls = []
        def rec(m, a, kw):
            if m.training: self.calls.append((tuple(o.detach().clone() for o in a), {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}))
        self.h = self.attn.register_forward_pre_hook(rec, with_kwargs=True)
    def after_fit(self): self.h.remove()

def model_attention(attn, args, kwargs):
    "The attention matrix the module computes on these arguments: its non-fused path, read where it enters `attn_drop` (both put back)"
    seen, old = [], attn.fused_attn
    h = attn.attn_drop.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().float()))
    try:
        attn.fused_attn = False
        with torch.no_grad(): attn(*args, **kwargs)
    finally: attn.fused_attn = old; h.remove()
    eq_(len(seen), 1)
    return seen[0]

def tiny(kind):
    "Tiny timm models built from code (no weights), 16 px in patches of 4 px: EVA with rotary embeddings (with and without its q/v biases, pooled by the class token or the patches' mean), BEiT (its q/v biases and relative position bias), and the relative-position ViT (no class token, the patches' mean)"
    from timm.models.eva import Eva
    from timm.models.beit import Beit
    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    if kind == 'beit': return Beit(**kw, use_rel_pos_bias=True)
    if kind == 'relpos':
        from timm.models.vision_transformer_relpos import VisionTransformerRelPos
        return VisionTransformerRelPos(**kw)
    return Eva(**kw, use_rot_pos_emb=True, qkv_bias='bias' in kind, global_pool='avg' if 'avg' in kind else 'token')

@pytest.mark.parametrize('kind', ['eva-rope-token', 'eva-rope-avg', 'eva-rope-bias-token', 'beit', 'relpos'])
def test_shares_from_the_model_attention(kind):
    "Through `Learner.fit` on EVA with rotary embeddings and on BEiT: the shares are the class token's (or the patch tokens' mean) attention that the model computes, rotary embedding, biases and all, weighed by the pixels pasted"
    set_seed(0)
    model = tiny(kind)
    attn, (prefix, pool) = model.blocks[-1].attn, (0 if kind == 'relpos' else 1, 'avg' if kind in ('eva-rope-avg', 'beit', 'relpos') else 'token')
    fused = attn.fused_attn
    spy, calls = MixSpy(), AttnCalls(attn)
    learn = vit_learner(cbs=[TransMix(per_sample=True), spy, calls], model=model)
    learn.fit(1, lr=0)
    eq_(len(spy.records), len(calls.calls)); eq_(len(spy.records), 2)
    for r, (args, kw) in zip(spy.records, calls.calls):
        if 'rope' in kind: assert kw.get('rope') is not None
        A = model_attention(attn, args, kw) # (n, heads, N, N)
        if 'rope' in kind: assert (model_attention(attn, args, {**kw, 'rope': None}) - A).abs().max() > 1e-3 # the rotary embedding matters here
        rows = A[:, :, 0] if pool == 'token' else A[:, :, prefix:].mean(2)
        a = rows.mean(1)[:, prefix:]; a = a / a.sum(1, keepdim=True)
        pasted = (r['xm'] != r['x']).any(1)
        want = .5 * (1 - pasted.float().mean((1, 2))) + .5 * (1 - (a * on_patches(pasted, 4)).sum(1))
        ok = moved(r['perm'])
        close_(r['lam'][ok], want[ok], eps=1e-5)
    eq_(hooks(model), {}); eq_(attn.fused_attn, fused)

def test_gradient_checkpointing():
    "A ViT trained with gradient checkpointing: TransMix reads the same shares, and the backward pass recomputes the blocks as the forward ran them"
    def run(ckpt):
        set_seed(0)
        model, spy = vit(), MixSpy()
        model.set_grad_checkpointing(ckpt)
        vit_learner(cbs=[TransMix(per_sample=True), spy], model=model).fit(1)
        return [r['lam'] for r in spy.records], model
    (a, _), (b, m) = run(False), run(True)
    for x, y in zip(a, b): close_(x, y, eps=1e-5)
    eq_(hooks(m), {})

def swin():
    "A tiny timm Swin: windowed attention, 2x2 windows over 8x8 patches of 2 px"
    from timm.models.swin_transformer import SwinTransformer
    return SwinTransformer(img_size=16, patch_size=2, window_size=2, embed_dim=16, depths=(1, 1), num_heads=(1, 1), num_classes=3)

REFUSED = {'swin': (swin, {}, ValueError, r'found no attention module it reads in SwinTransformer \(it has WindowAttention\).*windowed transformer \(Swin\)'),
           'swin-named': (swin, dict(attn_module='layers.1.blocks.0.attn'), TypeError, r"'layers.1.blocks.0.attn' is a WindowAttention.*not one of the timm attention classes.*Swin's windowed attention"),
           'map-pool': (lambda: vit(class_token=False, global_pool='map'), {}, ValueError, r"global_pool='map'\) pools its tokens by a learned query"),
           'max-pool': (lambda: vit(class_token=False, global_pool='max'), {}, ValueError, r"global_pool='max'\) pools its tokens by their maximum"),
           'avg-with-prefix': (lambda: vit(global_pool='avg', pool_include_prefix=True), {}, ValueError, 'pool_include_prefix=True')}

@pytest.mark.parametrize('case', list(REFUSED))
def test_models_refused(case):
    "The models TransMix does not read are refused at the first batch, before anything is mixed, saying why; the learner is left as found"
    make, kw, exc, msg = REFUSED[case]
    model, spy = make(), MixSpy()
    learn = vit_learner(cbs=[TransMix(**kw), spy], model=model)
    lf = learn.loss_func
    with pytest.raises(exc, match=msg): learn.fit(1)
    eq_(spy.records, []); eq_(hooks(model), {}); assert learn.loss_func is lf
    if case == 'swin': # and given as the module, when made
        with pytest.raises(TypeError, match='WindowAttention is not an attention module TransMix reads'): TransMix(attn_module=model.layers[0].blocks[0].attn)

SYNCS = ('item', 'tolist', '__bool__', '__int__', '__float__', '__index__')

def raise_on_sync(monkeypatch, obj, name):
    "Wrap `obj.name` so that while it runs, the tensor methods that wait on the GPU (`.item()`, `bool(t)`, ...) raise: a CPU probe of the no-host-sync promise"
    f = getattr(obj, name)
    def wrapped(*args, **kwargs):
        old = {k: getattr(torch.Tensor, k) for k in SYNCS}
        def refuse(k):
            def g(self, *a, **kw): raise AssertionError(f'host sync: Tensor.{k} in {name}')
            return g
        try:
            for k in SYNCS: setattr(torch.Tensor, k, refuse(k))
            return f(*args, **kwargs)
        finally:
            for k, v in old.items(): setattr(torch.Tensor, k, v)
    monkeypatch.setattr(obj, name, wrapped)

@pytest.mark.parametrize('planted', [False, True], ids=['transmix', 'planted'])
def test_no_host_sync_probe(monkeypatch, planted):
    "On the CPU: the pasting and the share reading of a training step (per sample, pooled by the class token and pixel-weighed) call no tensor method that waits on the GPU; a planted `.item()` is caught"
    import fastai_mix.transmix as tm
    if planted:
        shares = tm.attention_shares
        monkeypatch.setattr(tm, 'attention_shares', lambda a, p, px=None: shares(a, p, px) * (1 + 0 * (a.sum().item())))
    raise_on_sync(monkeypatch, TransMix, 'mix'); raise_on_sync(monkeypatch, TransMix, '_in_forward')
    learn = vit_learner(cbs=TransMix(per_sample=True))
    if planted:
        with pytest.raises(AssertionError, match=r'host sync: Tensor.item in _in_forward'): learn.fit(1)
    else: learn.fit(1)
    eq_(hooks(learn.model), {})

class ClassFused(nn.Module):
    "An attention module of a user's own, written as timm's: its `fused_attn` set on the class, the fused path skipping `attn_drop`"
    fused_attn = True
    def __init__(self, dim, num_heads=2):
        super().__init__()
        self.num_heads, self.qkv, self.attn_drop, self.proj = num_heads, nn.Linear(dim, dim * 3), nn.Dropout(0.), nn.Linear(dim, dim)
    def forward(self, x, attn_mask=None, **kw):
        n, T, d = x.shape
        q, k, v = self.qkv(x).reshape(n, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if self.fused_attn: o = F.scaled_dot_product_attention(q, k, v)
        else: o = self.attn_drop((q * q.shape[-1] ** -.5 @ k.transpose(-2, -1)).softmax(-1)) @ v
        return self.proj(o.transpose(1, 2).reshape(n, T, d))

def test_fused_attn_on_the_class():
    "A user's attention module whose `fused_attn` is a class attribute: TransMix turns it off for its own read and puts the class's value back (no instance attribute left)"
    set_seed(0)
    model = vit()
    for b in model.blocks: b.attn = ClassFused(32)
    spy = MixSpy()
    vit_learner(cbs=[TransMix(), spy], model=model).fit(1, lr=0)
    assert spy.records and all('fused_attn' not in b.attn.__dict__ for b in model.blocks) and ClassFused.fused_attn is True
    eq_(hooks(model), {})
