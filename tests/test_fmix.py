"FMix: the share the loss uses is the share in the pixels, exactly, for signals, images and volumes, per batch and per sample; targets follow; properties; errors"
import math, pickle
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from hypothesis import given, strategies as st
from fastcore.test import test_close as close_, test_eq as eq_
from fastai.callback.core import Callback
from fastai.callback.schedule import ParamScheduler, SchedLin
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat, BCEWithLogitsLossFlat
from fastai.torch_core import no_random
import fastai.callback.fp16  # noqa: F401  (to_fp16, to_bf16)
from fastai_mix import FMix, fmix, fourier_noise, fourier_freqs, rank_positions, soft_mask, MixChoice, CutMix, MixCollate, mix_title
from fastai_mix.show import untouched
from fastai_mix.test_utils import synth_learner, synth_seg_learner, MixSpy, paste_shares
from test_properties import SETTINGS, alphas, shares, batches, check_common, check_loss, paste_props
from test_show import named_dls, shown, VOCAB
from test_callback import fit_without_sync

SHAPES = [(2, 30), (3, 12, 16), (1, 6, 8, 10)] # signals, images, volumes
def moved(perm): return perm != torch.arange(len(perm), device=perm.device)
def as_shares(lam, n): return lam if isinstance(lam, torch.Tensor) else torch.full((n,), float(lam))

def id_learner(cbs, shape, n=32, bs=8, loss_func=None):
    "A linear classifier on inputs whose samples never share a value (sample k lies in [k, k+.5]), so each position's blend can be read back"
    g = torch.Generator().manual_seed(0)
    x = torch.arange(n).float().view(n, *[1] * len(shape)) + .5 * torch.rand(n, *shape, generator=g)
    items = list(zip(x, torch.arange(n) % 4))
    dls = DataLoaders(DataLoader(items, bs=bs, shuffle=True), DataLoader(items, bs=bs))
    return Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 4)), loss_func=loss_func or CrossEntropyLossFlat(), cbs=cbs)

def weights_back(x, xm, perm):
    "Share of the original at each position, read from a blend `m*x + (1-m)*x[perm]` (exactly 0 or 1 for a paste); NaN where a sample is its own partner"
    xp = x[perm].double()
    return ((xm.double() - xp) / (x.double() - xp))

@pytest.mark.parametrize('shape', SHAPES, ids=['1d', '2d', '3d'])
@pytest.mark.parametrize('per_sample', [False, True], ids=['batch', 'sample'])
@pytest.mark.parametrize('max_soft', [0., .1], ids=['hard', 'soft'])
@pytest.mark.parametrize('reduction', ['mean', 'sum'])
def test_loss_share_is_mask_share(shape, per_sample, max_soft, reduction):
    "The share the learner's loss uses is the share of the original in the mixed input, read back from the pixels"
    lf, spy = CrossEntropyLossFlat(reduction=reduction), MixSpy()
    learn = id_learner([FMix(per_sample=per_sample, max_soft=max_soft), spy], shape, loss_func=lf)
    learn.fit(1, lr=0)
    assert learn.loss_func is lf and len(spy.records) == 4
    for r in spy.records:
        perm, lam, n = r['perm'], r['lam'], len(r['perm'])
        if per_sample: eq_((type(lam), lam.dtype, lam.shape), (torch.Tensor, torch.float32, (n,)))
        else: assert type(lam) is float
        w, ok = weights_back(r['x'], r['xm'], perm), moved(perm)
        if not max_soft: assert ((w == 0) | (w == 1))[ok].all() # each position is the original's or the partner's
        share = w.flatten(1).mean(1)
        if max_soft or per_sample: close_(share[ok], as_shares(lam, n)[ok].double(), eps=1e-6 if not max_soft else 1e-5)
        else: assert (share[ok] == lam).all() # exactly the Python float
        share = torch.where(ok, share, as_shares(lam, n).double()).float() # a sample paired with itself: any share gives its loss
        l0, l1 = (F.cross_entropy(r['pred'], t, reduction='none') for t in (r['y'][0], r['y'][0][perm]))
        exp = share * l0 + (1 - share) * l1
        exp = exp.sum() if reduction == 'sum' else exp.mean()
        close_(r['loss'], exp, eps=1e-6 * max(1, exp.abs().item())) # relative, for the sum

@pytest.mark.parametrize('per_sample', [False, True], ids=['batch', 'sample'])
def test_one_mask_per_batch_or_per_sample(per_sample):
    g = torch.Generator().manual_seed(0)
    x = torch.arange(16.).view(16, 1, 1, 1) + .5 * torch.rand(16, 3, 16, 16, generator=g)
    xm, perm, lam = fmix(x, per_sample=per_sample, generator=g, alpha=4.)
    own = (xm == x).all(1)[moved(perm)].flatten(1)
    eq_(len({tuple(o.tolist()) for o in own}) == 1, not per_sample)

@pytest.mark.parametrize('size', [(20,), (8, 8), (4, 6, 6)], ids=['1d', '2d', '3d'])
@pytest.mark.parametrize('mixer', [FMix(), FMix(per_sample=True), FMix(per_sample=True, max_soft=.2)], ids=repr)
def test_segmentation_masks_follow(size, mixer):
    spy = MixSpy()
    learn = synth_seg_learner(cbs=[mixer, spy], size=size)
    lf = learn.loss_func
    learn.fit(1, lr=0)
    assert learn.loss_func is lf
    for r in spy.records:
        x, xm, perm, m = r['x'], r['xm'], r['perm'], r['y'][0]
        own = ((xm - x[perm]).abs() > (xm - x).abs()).all(1) | ~moved(perm).view(-1, *[1] * len(size)) # the original has more than half
        eq_(r['ym'][0], torch.where(own, m, m[perm]))
        eq_(r['ym'][0].dtype, m.dtype)
        close_(r['loss'], lf(r['pred'], r['ym'][0])) # the loss is left alone: the original loss on the mixed masks

@pytest.mark.parametrize('per_sample', [False, True])
@pytest.mark.parametrize('max_soft', [0., .2])
def test_inputs_untouched_and_several_inputs_alike(per_sample, max_soft):
    g = torch.Generator().manual_seed(1)
    x = torch.arange(8.).view(8, 1, 1, 1) + .5 * torch.rand(8, 3, 10, 12, generator=g)
    h, ids = (torch.arange(8.).view(8, 1, 1, 1) + .5 * torch.rand(8, 1, 10, 12, generator=g)).double(), torch.arange(8).view(8, 1).expand(8, 5)
    y = (torch.arange(8) % 3, F.one_hot(torch.arange(8) % 3, 3).float(), torch.arange(8).view(8, 1, 1).expand(8, 10, 12).clone())
    before = [o.clone() for o in (x, h, ids, *y)]
    ((xm, hm, im), ym), perm, lam = fmix((x, h, ids), max_soft=max_soft, per_sample=per_sample, y=y, generator=g)
    for o, b in zip((x, h, ids, *y), before): eq_(o, b) # nothing given is written
    assert im is ids and ym[0] is y[0] and xm.dtype == torch.float32 and hm.dtype == torch.float64
    ok = moved(perm)
    wx, wh = weights_back(x, xm, perm)[ok].mean(1), weights_back(h, hm, perm)[ok].mean(1) # one weight per position, channels alike
    close_(wx, wh, eps=1e-5) # the same mask in every input
    close_(wh.flatten(1).mean(1), as_shares(lam, 8)[ok].double(), eps=1e-6)
    eq_(ym[2][ok], torch.where(wh > .5, torch.arange(8)[ok].view(-1, 1, 1), perm[ok].view(-1, 1, 1)))

def test_reproducible():
    x = torch.rand(8, 3, 16, 16)
    for kw in dict(), dict(per_sample=True), dict(per_sample=True, max_soft=.1, p=.5):
        a, b = (fmix(x, generator=torch.Generator().manual_seed(3), **kw) for _ in range(2))
        eq_(a[0], b[0]); eq_(a[1], b[1]); eq_(a[2], b[2])
        c = fmix(x, generator=torch.Generator().manual_seed(4), **kw)
        assert not torch.equal(a[0], c[0])
    def once():
        spy = MixSpy()
        with no_random(3): synth_learner(cbs=[FMix(per_sample=True), spy]).fit(1, lr=0)
        return spy.records
    for ra, rb in zip(once(), once()): eq_(ra['xm'], rb['xm']); eq_(ra['lam'], rb['lam'])

@pytest.mark.parametrize('size', [(4, 6, 10), (5, 7, 9)], ids=['even', 'odd'])
def test_noise_spectrum_on_every_axis(size):
    "On average, the noise's power at each frequency is 2*scale**2 (a complex normal times the scale), on every axis of a volume with three different sides, at every frequency (the last axis' 0 and Nyquist bins too)"
    d = 2.
    grey = fourier_noise(4000, size, d, generator=torch.Generator().manual_seed(0))
    power = torch.fft.rfftn(grey, dim=(1, 2, 3)).abs().square().mean(0)
    f = fourier_freqs(size)
    f0 = 1 / max(size)
    ratio = power / (2 * ((f0 / f.clamp(min=f0)) ** d) ** 2)
    assert ((ratio > .85) & (ratio < 1.15)).all(), ratio

def edges(m):
    "Mean number of neighbour pairs across an edge of the boolean masks `m` (n, H, W): along H (vertical pairs), along W"
    return (m[:, 1:] != m[:, :-1]).sum((1, 2)).double().mean().item(), (m[:, :, 1:] != m[:, :, :-1]).sum((1, 2)).double().mean().item()

def test_masks_isotropic():
    "On square images, FMix's masks have as many edges along W as along H (the f_W = 0 column of the half spectrum has its full power)"
    n = 2000 # the ratio's spread over 2000 masks is about 0.013
    x = torch.arange(n).float().view(n, 1, 1, 1).expand(n, 1, 32, 32)
    xm, perm, lam = fmix(x, per_sample=True, generator=torch.Generator().manual_seed(0))
    kept = (xm == x)[:, 0] # where each sample keeps its own values
    eh, ew = edges(kept[perm != torch.arange(n)])
    assert .93 < ew / eh < 1.07, (eh, ew) # it was 1.24 with the half spectrum as drawn

def test_blob_size_as_the_papers():
    "At half the positions kept, a 32x32 mask has about as many regions (4-connected, both parts) as the paper's reference code gives"
    ndi = pytest.importorskip('scipy.ndimage')
    m = (rank_positions(fourier_noise(1000, (32, 32), generator=torch.Generator().manual_seed(0))) < 512).numpy()
    regions = sum(ndi.label(a)[1] + ndi.label(~a)[1] for a in m) / len(m)
    assert 3.8 < regions < 4.55, regions # the paper's reference code (ecs-vlc/FMix, fmix.py): 4.15; this mean's spread is about 0.035

@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_soft_mask_mean_exact_in_every_dtype(dtype):
    "The soft edge's values, rounded to the input's dtype, still sum to exactly `num`: the share stays exact in half precision"
    ranks = rank_positions(torch.randn(6, 37, 41, generator=torch.Generator().manual_seed(0)))
    num = torch.tensor([0, 1, 333, 758, 1516, 37 * 41])
    for max_soft in (.01, .1, .37, .5):
        m = soft_mask(ranks, num, max_soft, dtype)
        eq_(m.dtype, dtype); assert ((m >= 0) & (m <= 1)).all()
        eq_(m.double().flatten(1).sum(1), num.double())
        hard = ranks.flatten(1) < num[:, None] # the positions masks of class indices give the original: never less than half
        assert (m.flatten(1)[hard] >= .5).all() and (m.flatten(1)[~hard] <= .5).all()
    for n in num.tolist(): eq_(soft_mask(ranks, n, .1, dtype).double().flatten(1).sum(1), torch.full((6,), float(n), dtype=torch.float64))

@SETTINGS
@given(b=batches(), alpha=alphas, p=shares, per_sample=st.booleans(), decay_power=st.floats(.5, 6.), seed=st.integers(0, 2**16))
def test_fmix_properties(b, alpha, p, per_sample, decay_power, seed):
    paste_props(FMix(alpha=alpha, decay_power=decay_power, p=p, per_sample=per_sample), b, seed)

@SETTINGS
@given(b=batches(), alpha=alphas, p=shares, per_sample=st.booleans(), max_soft=st.floats(0., .5), seed=st.integers(0, 2**16))
def test_fmix_soft_properties(b, alpha, p, per_sample, max_soft, seed):
    "With soft edges: the mask's mean is exactly the share, in the inputs (up to their dtype's rounding) and in a float64 mask target"
    x, y, onehot, mask = b
    x0, n = x.clone(), len(x)
    ids = torch.arange(n, dtype=torch.float64).view(n, 1, *[1] * (x.ndim - 2)).expand(n, 1, *x.shape[2:]).clone() # a float mask: blended
    with no_random(seed): ((xm,), (*ym, mm, im)), perm, lam = FMix(alpha=alpha, p=p, per_sample=per_sample, max_soft=max_soft).mix((x,), (y, onehot, mask, ids))
    eq_(x, x0)
    lam = check_common(x, y, onehot, xm, ym, perm, lam)
    ok = moved(perm)
    w = ((im - ids[perm]) / (ids - ids[perm]))[:, 0] # the mask, read back exactly from the float64 target
    assert ((w >= 0) & (w <= 1))[ok].all()
    close_(w[ok].flatten(1).mean(1), lam[ok].double(), eps=1e-6)
    tol = {torch.float32: 1e-5, torch.float64: 1e-9, torch.float16: 4e-3, torch.bfloat16: 4e-2}[x.dtype] # the blend rounds to the input's dtype
    close_(weights_back(x, xm, perm)[ok].mean(1), w[ok], eps=tol)
    eq_(mm[ok], torch.where(w[ok] > .5, torch.arange(n)[ok].view(-1, *[1] * (mm.ndim - 1)), perm[ok].view(-1, *[1] * (mm.ndim - 1)))) # class indices: hard
    check_loss(torch.where(ok, w.flatten(1).mean(1).float(), lam), y, perm, lam)

@pytest.mark.parametrize('mixer', [FMix(), FMix(per_sample=True, max_soft=.1)], ids=repr)
def test_show_batch_titled_with_pixel_shares(mixer):
    dls = named_dls()
    fig = mixer.show_batch(dls, seed=3, max_n=8, show=False)
    dl = dls.train
    with untouched(dl, 3): # the same draws again
        x, y = dl.one_batch()
        _, perm, lam = mixer.mix((x,), (y,))
    x, xm = dl.decode((x,))[0], shown(fig) # as shown
    shares = paste_shares(x, xm, perm) if not mixer.max_soft else as_shares(lam, len(perm))
    for i, ax in enumerate(fig.axes):
        pct = 100 if perm[i] == i else round(100 * shares[i].item())
        eq_(ax.get_title(), mix_title(VOCAB[y[i]], VOCAB[y[perm[i]]], pct))
    assert any(perm[i] != i and 0 < shares[i] < 1 for i in range(8))

def test_with_choice_schedules_p_and_stop_pct():
    spy = MixSpy()
    learn = synth_learner(cbs=[MixChoice([FMix(per_sample=True), CutMix()], per_sample=True), spy], n=64, bs=32)
    learn.fit(1, lr=0)
    for r in spy.records: assert ((r['xm'] == r['x']) | (r['xm'] == r['x'][r['perm']])).all()
    def losses(cbs, fit_cbs=None):
        with no_random(0): learn = synth_learner(cbs=cbs)
        with no_random(1): learn.fit(1, cbs=fit_cbs)
        return learn.recorder.losses
    plain = losses([])
    eq_(losses([FMix(p=0)]), plain)
    eq_(losses([FMix()], ParamScheduler({'mix_p': SchedLin(0., 0.)})), plain)
    assert losses([FMix(p=.5)]) != plain
    spy = MixSpy()
    synth_learner(cbs=[FMix(stop_pct=.5), spy], n=64, bs=16).fit(2, lr=0)
    eq_([r['lam'] is not None for r in spy.records], [True] * 4 + [False] * 4)

def test_in_a_dataloader_collate():
    "MixCollate(fmix, ...) in a plain PyTorch DataLoader: the blended one-hot targets carry the shares read back from the pixels"
    from torch.utils.data import DataLoader as TorchDL
    g = torch.Generator().manual_seed(0)
    samples = [(i + .5 * torch.rand(3, 12, 12, generator=g), i % 4) for i in range(32)] # samples never share a value
    dl = TorchDL(samples, batch_size=8, collate_fn=MixCollate(fmix, num_classes=4, per_sample=True, generator=torch.Generator().manual_seed(0)))
    mixed = 0
    for b, (xm, ym) in enumerate(dl):
        ids = xm.floor().long()[:, 0] # whose value each position holds
        for i in range(8):
            own = 8 * b + i
            share = (ids[i] == own).float().mean()
            partner = ids[i][ids[i] != own].unique().tolist() or [own]
            assert len(partner) == 1 and 8 * b <= partner[0] < 8 * b + 8 # one partner, from the same batch
            exp = share * F.one_hot(torch.tensor(own % 4), 4) + (1 - share) * F.one_hot(torch.tensor(partner[0] % 4), 4)
            close_(ym[i], exp.float(), eps=1e-6)
            mixed += 0 < share < 1
    assert mixed > 8

@pytest.mark.parametrize('precision', ['to_fp16', 'to_bf16'])
def test_mixed_precision_export_and_repr(precision, tmp_path):
    lf = CrossEntropyLossFlat()
    learn = getattr(synth_learner(loss_func=lf, cbs=FMix(per_sample=True, max_soft=.1)), precision)()
    learn.fit(1)
    assert learn.loss_func is lf
    learn.path = tmp_path
    learn.export('m.pkl')
    back = load_learner(tmp_path/'m.pkl')
    assert isinstance(back.loss_func, CrossEntropyLossFlat) and len(back.cbs.filter(lambda o: isinstance(o, FMix))) == 1
    eq_(repr(pickle.loads(pickle.dumps(FMix(decay_power=2)))), 'FMix(alpha=1.0, decay_power=2.0, max_soft=0.0, p=1.0, per_sample=False, stop_pct=1.0)')

@pytest.mark.parametrize('kw', [dict(), dict(per_sample=True), dict(per_sample=True, max_soft=.1)], ids=repr)
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_and_channels_last_kept(kw, dtype):
    x = torch.rand(4, 3, 10, 12).to(dtype).to(memory_format=torch.channels_last)
    xm, perm, lam = fmix(x, generator=torch.Generator().manual_seed(0), **kw)
    eq_(xm.dtype, dtype); assert xm.is_contiguous(memory_format=torch.channels_last)

class BoomModel(nn.Module):
    def __init__(self): super().__init__(); self.lin = nn.Linear(192, 4)
    def forward(self, x): raise RuntimeError('boom')

def test_loss_restored_when_model_raises():
    lf = CrossEntropyLossFlat()
    learn = synth_learner(loss_func=lf, cbs=FMix(per_sample=True))
    learn.model = BoomModel()
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1)
    assert learn.loss_func is lf

@pytest.mark.parametrize('kwargs,msg', [
    (dict(alpha=0), r'alpha must be a finite number > 0.*got 0'), (dict(alpha=float('nan')), 'alpha must be'),
    (dict(decay_power=0), r'decay_power must be a finite number > 0.*got 0'), (dict(decay_power=float('inf')), 'decay_power must be'),
    (dict(decay_power='3'), 'decay_power must be'), (dict(max_soft=-.1), r'max_soft must be a number in \[0, 0.5\].*got -0.1'),
    (dict(max_soft=.6), 'max_soft must be'), (dict(max_soft=True), 'max_soft must be'), (dict(p=1.5), r'p must be a number in \[0, 1\]'),
    (dict(stop_pct=-1), 'stop_pct must be')])
def test_bad_args_at_construction_and_call(kwargs, msg):
    with pytest.raises(ValueError, match=msg): FMix(**kwargs)
    if 'stop_pct' not in kwargs:
        with pytest.raises(ValueError, match=msg): fmix(torch.rand(4, 3, 8, 8), **kwargs)

def test_per_sample_must_be_a_bool():
    for bad in (1, 'yes', None):
        with pytest.raises(TypeError, match='per_sample must be True or False'): FMix(per_sample=bad)
        with pytest.raises(TypeError, match='per_sample must be True or False'): fmix(torch.rand(4, 3, 8, 8), per_sample=bad)

def test_bad_inputs():
    with pytest.raises(ValueError, match=r'shape \(4, 12\), which has none: use MixUp'): fmix(torch.rand(4, 12))
    with pytest.raises(ValueError, match='need one spatial size'): fmix((torch.rand(4, 3, 8, 8), torch.rand(4, 3, 6, 6)))
    with pytest.raises(TypeError, match='mixes floating point inputs'): fmix(torch.ones(4, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match='target has batch size 3'): fmix(torch.rand(4, 3, 8, 8), y=torch.zeros(3, dtype=torch.long))
    lf = CrossEntropyLossFlat()
    learn = synth_learner(loss_func=lf, cbs=FMix(), shape=(12,))
    with pytest.raises(ValueError, match='use MixUp'): learn.fit(1)
    assert learn.loss_func is lf

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('mixer', [FMix(), FMix(per_sample=True), FMix(per_sample=True, max_soft=.1, p=.5)], ids=repr)
@pytest.mark.parametrize('loss_func', [CrossEntropyLossFlat(), BCEWithLogitsLossFlat()], ids=['index', 'dense'])
def test_cuda_no_host_sync(mixer, loss_func):
    "A training step's noise, masks, mixing and mixed loss never wait on the GPU"
    multi = isinstance(loss_func, BCEWithLogitsLossFlat)
    learn = synth_learner(loss_func=loss_func, cbs=mixer, multi_label=multi, n=64, bs=16, shape=(3, 32, 32))
    learn.dls.to('cuda'); learn.model.cuda()
    fit_without_sync(learn)
    assert learn.loss_func is loss_func
    x = torch.arange(8., device='cuda').view(8, 1, 1, 1) + .5 * torch.rand(8, 3, 16, 16, device='cuda')
    xm, perm, lam = fmix(x, per_sample=True, generator=torch.Generator('cuda').manual_seed(0))
    close_(paste_shares(x, xm, perm)[moved(perm)].cpu(), lam[moved(perm)].cpu(), eps=1e-6) # the same exact share on the GPU
