"Sweeps of the functional core: shapes, ranks, dtypes, memory formats, shares read back from the pixels"
import math
import pytest, torch, torch.nn.functional as F
from fastcore.test import test_close as close_, test_eq as eq_
from fastai_mix.core import (reduce_loss, mix_loss, beta_sample, mixup, cutmix, resizemix, cutmix_box, resize_box,
    box_share, paste_resized, check_alpha, check_lam_range, check_interpolation)
from fastai_mix.test_utils import blend_shares, paste_shares

def gen(seed=0): return torch.Generator().manual_seed(seed)
def moved(perm): return perm != torch.arange(len(perm)) # samples not paired with themselves

@pytest.mark.parametrize('reduction,expected', [('mean', 2.), ('sum', 6.), ('none', torch.tensor([1., 2., 3.]))])
def test_reduce_loss(reduction, expected): eq_(reduce_loss(torch.tensor([1., 2., 3.]), reduction), expected)

@pytest.mark.parametrize('bad', [0, -0.5, float('nan'), float('inf'), '1', None, True, [1.]])
def test_alpha_refused(bad):
    with pytest.raises(ValueError, match=r"alpha must be a finite number > 0.*got"): check_alpha(bad)

@pytest.mark.parametrize('lo,hi,msg', [(-.1, .5, 'lam_min must be a number in'), (.1, 1.5, 'lam_max must be a number in'),
                                       (.8, .2, 'lam_min must be <= lam_max'), ('a', .5, 'lam_min')])
def test_lam_range_refused(lo, hi, msg):
    with pytest.raises(ValueError, match=msg): check_lam_range(lo, hi)

def test_interpolation_refused():
    with pytest.raises(ValueError, match=r"interpolation must be one of .*got 'cubic'"): check_interpolation('cubic')

def test_beta_sample_moments():
    for a in (.2, 1., 4.):
        d = beta_sample(a, 200_000, generator=gen())
        close_(d.mean(), .5, eps=5e-3)
        close_(d.var(), 1/(4*(2*a+1)), eps=5e-3) # variance of Beta(a, a)

@pytest.mark.parametrize('shape', [(6,), (6, 5), (6, 3, 7), (6, 3, 5, 4), (6, 2, 3, 4, 5)])
def test_mixup_any_shape(shape):
    x = torch.rand(shape)
    xm, perm, lam = mixup(x, generator=gen())
    w = lam.view(-1, *[1]*(x.ndim-1))
    close_(xm, w*x + (1-w)*x[perm])
    assert (lam >= .5).all() and (lam <= 1).all()
    if x.ndim > 1: close_(blend_shares(x, xm, perm)[moved(perm)], lam[moved(perm)], eps=1e-4)

@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize('fn', [mixup, cutmix, resizemix])
def test_dtype_and_channels_last_kept(fn, dtype):
    x = torch.rand(5, 3, 8, 6).to(dtype).to(memory_format=torch.channels_last)
    xm, perm, lam = fn(x, generator=gen())
    eq_(xm.dtype, dtype); assert xm.is_contiguous(memory_format=torch.channels_last)

@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_mixup_share_exact_in_half(dtype):
    "The share the loss gets is the weight the half-precision blend used, not the float32 draw"
    x = torch.rand(64, 3, 4, 4).to(dtype)
    xm, perm, lam = mixup(x, generator=gen(3))
    eq_(lam, lam.to(dtype).float())
    eq_(xm, x[perm].lerp(x, lam.to(dtype).view(-1, 1, 1, 1)))

@pytest.mark.parametrize('fn', [mixup, cutmix, resizemix])
def test_batch_of_one(fn):
    x = torch.rand(1, 3, 8, 8)
    xm, perm, lam = fn(x, generator=gen())
    eq_(perm, torch.tensor([0]))
    if fn is resizemix: eq_(xm.shape, x.shape) # the sample, with a shrunk copy of itself pasted in
    else: close_(xm, x) # mixed with itself

@pytest.mark.parametrize('shape', [(8, 2, 40), (8, 3, 12, 20), (8, 3, 20, 12), (8, 1, 6, 10, 8)])
def test_cutmix_share_from_pixels(shape):
    for seed in range(10):
        x = torch.rand(shape)
        xm, perm, lam = cutmix(x, generator=gen(seed))
        close_(paste_shares(x, xm, perm)[moved(perm)], torch.full((int(moved(perm).sum()),), lam))
        assert torch.isfinite(xm).all()
        changed = xm != x
        close_(xm[changed], x[perm][changed]) # every changed value comes from the partner

def test_cutmix_box_is_one_box_clipped():
    for seed in range(50):
        box = cutmix_box((13, 29), .6, generator=gen(seed))
        for s, n in zip(box, (13, 29)): assert 0 <= s.start <= s.stop <= n
        for s, n in zip(box, (13, 29)): assert s.stop - s.start <= round(n*math.sqrt(.4))

def test_cutmix_mean_area():
    "Before clipping the box covers 1-lam; with lam ~ U(0,1) the mean pasted share is below 1/2 only by the clipping"
    shares = [1 - cutmix(torch.zeros(2, 1, 64, 64), generator=gen(s))[2] for s in range(400)]
    m = sum(shares)/len(shares)
    assert .25 < m < .5, m

def test_not_inplace_leaves_input():
    for fn in (cutmix, resizemix):
        x = torch.rand(6, 3, 10, 10); x0 = x.clone()
        xm, _, lam = fn(x, generator=gen(1))
        eq_(x, x0); assert lam < 1 and not torch.equal(xm, x)
        xm2, _, _ = fn(x, generator=gen(1), inplace=True)
        assert xm2 is x; eq_(xm2, xm)

@pytest.mark.parametrize('fn', [cutmix, resizemix])
def test_no_spatial_dims_refused(fn):
    with pytest.raises(ValueError, match='has none: use MixUp'): fn(torch.rand(4, 10))

def test_spatial_sizes_must_agree():
    with pytest.raises(ValueError, match='one spatial size'): cutmix((torch.rand(4, 3, 8, 8), torch.rand(4, 1, 4, 4)))

@pytest.mark.parametrize('fn', [mixup, cutmix, resizemix])
def test_several_inputs_same_partner_and_share(fn):
    a, b, ids = torch.rand(6, 3, 8, 8), torch.rand(6, 1, 8, 8), torch.arange(6)
    (am, bm, idm), perm, lam = fn((a, b, ids), generator=gen(2))
    assert idm is ids # not floating point: left as it is
    if fn is mixup:
        close_(blend_shares(a, am, perm)[moved(perm)], lam[moved(perm)], eps=1e-4)
        close_(blend_shares(b, bm, perm)[moved(perm)], lam[moved(perm)], eps=1e-4)
    else: eq_((am != a).any(1)[moved(perm)], (bm != b).any(1)[moved(perm)]) # the same box in both
    if fn is cutmix: close_(paste_shares(b, bm, perm)[moved(perm)], torch.full((int(moved(perm).sum()),), lam))

def test_same_tensor_twice_mixed_once():
    x = torch.rand(6, 3, 8, 8); x0 = x.clone()
    (xa, xb_), perm, lam = cutmix((x, x), generator=gen(0), inplace=True)
    assert xa is xb_ is x
    ref, _, _ = cutmix(x0, generator=gen(0))
    eq_(x, ref)

def test_generator_reproducible():
    for fn in (mixup, cutmix, resizemix):
        x = torch.rand(8, 3, 9, 7)
        a, b = fn(x, generator=gen(5)), fn(x, generator=gen(5))
        eq_(a[0], b[0]); eq_(a[1], b[1]); eq_(a[2], b[2])

@pytest.mark.parametrize('size', [(40,), (16, 24), (6, 8, 10)])
@pytest.mark.parametrize('mode', ['bilinear', 'nearest', 'nearest-exact', 'area', 'bicubic'])
def test_resizemix_pastes_whole_resized_partner(size, mode):
    x = torch.rand(5, 2, *size)
    if mode == 'bicubic' and len(size) != 2:
        with pytest.raises(ValueError, match='bicubic'): resizemix(x, interpolation=mode, generator=gen())
        return
    xm, perm, lam = resizemix(x, interpolation=mode, generator=gen(4))
    changed = (xm != x).flatten(2).any(1).view(5, *size)[moved(perm)]
    close_(changed.float().flatten(1).mean(1), torch.full((len(changed),), 1 - lam), eps=.03) # the box, up to equal pixels
    assert .1 - .1 <= lam <= .8 + .1

def test_resizemix_box_content_and_share():
    x = torch.rand(4, 3, 20, 30)
    g = gen(7)
    xm, perm, lam = resizemix(x, generator=gen(7))
    # replay the draws: lam, perm, box
    lam0 = .1 + .7*beta_sample(1., 1, generator=g).item(); torch.randperm(4, generator=g)
    box = resize_box((20, 30), lam0, g)
    eq_(lam, box_share(box, (20, 30)))
    h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
    close_(xm[:, :, box[0], box[1]], F.interpolate(x, size=(h, w), mode='bilinear', align_corners=False)[perm])
    # the box lies inside and keeps the aspect ratio up to rounding
    close_(h/20, w/30, eps=.06)

def test_resizemix_extremes():
    x = torch.rand(4, 3, 8, 8)
    xm, perm, lam = resizemix(x, lam_min=1., lam_max=1., generator=gen())
    eq_(lam, 1.); eq_(xm, x)
    xm, perm, lam = resizemix(x, lam_min=0., lam_max=0., generator=gen())
    eq_(lam, 0.); close_(xm, x[perm])

def test_resizemix_share_range():
    lams = [resizemix(torch.zeros(2, 1, 64, 64), lam_min=.3, lam_max=.6, generator=gen(s))[2] for s in range(200)]
    assert min(lams) >= .3 - .03 and max(lams) <= .6 + .03

def test_mix_loss_per_sample_and_sequence_targets():
    "A per-sample share weighs every element of that sample's unreduced loss"
    pred, y = torch.randn(4, 5, 3), torch.randint(0, 3, (4, 5))
    perm, lam = torch.tensor([2, 3, 0, 1]), torch.tensor([.9, .6, .8, .5])
    from fastai.losses import CrossEntropyLossFlat
    lf = CrossEntropyLossFlat()
    got = mix_loss(lf, pred, (y,), (y[perm],), lam)
    ce = lambda t: F.cross_entropy(pred.transpose(1, 2), t, reduction='none') # (4, 5)
    close_(got, (lam[:, None]*ce(y) + (1-lam[:, None])*ce(y[perm])).mean())

def test_mix_loss_reductions():
    pred, y, perm = torch.randn(6, 3), torch.randint(0, 3, (6,)), torch.tensor([1, 0, 3, 2, 5, 4])
    for red in ('mean', 'sum', 'none'):
        lf = torch.nn.CrossEntropyLoss(reduction=red)
        got = mix_loss(lf, pred, (y,), (y[perm],), .3)
        exp = .3*F.cross_entropy(pred, y, reduction='none') + .7*F.cross_entropy(pred, y[perm], reduction='none')
        close_(got, reduce_loss(exp, red)); eq_(lf.reduction, red)

def test_agrees_with_fastai_cutmix_box():
    "Same seed, same draws as fastai's CutMix: same box start, and our box keeps its whole width when it is odd"
    from fastai.callback.mixup import CutMix as FastaiCutMix
    from fastai.torch_core import no_random
    import fastai.callback.mixup as fm
    for seed in range(20):
        x = torch.rand(4, 3, 15, 22)
        with no_random(seed): xm, perm, lam = cutmix(x)
        with no_random(seed):
            lam_f = fm.Beta(torch.tensor(1.), torch.tensor(1.)).sample((1,))
            perm_f = torch.randperm(4)
            cb = FastaiCutMix(); cb.learn = type('L', (), {'x': x})()
            x1, y1, x2, y2 = (int(v) for v in cb.rand_bbox(22, 15, lam_f))
        eq_(perm, perm_f)
        H, W = 15, 22
        cut_h, cut_w = round(H*math.sqrt(1-lam_f.item())), round(W*math.sqrt(1-lam_f.item()))
        changed = (xm != x).any(1).any(0) # (H, W) positions pasted in some sample
        if changed.any():
            ys, xs = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
            eq_((int(ys.min()), int(xs.min())), (y1, x1))
            assert int(ys.max()) + 1 - y2 in (0, cut_h % 2) and int(xs.max()) + 1 - x2 in (0, cut_w % 2)
