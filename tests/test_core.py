"The functional core (mixup, cutmix, resizemix, their boxes and argument checks): sweeps of shapes, ranks, dtypes, memory formats, shares read back from the pixels, and the edge cases"
import math
import numpy as np
import pytest, torch, torch.nn.functional as F
from fastcore.test import test_close as close_, test_eq as eq_
from fastai.torch_core import TensorMask
from fastai_mix.core import (reduce_loss, beta_sample, mixup, cutmix, resizemix, cutmix_box, resize_box,
    box_share, paste_resized, check_alpha, check_lam_range, check_interpolation, is_mask, draw_boxes, check_share, check_minmax)
from fastai_mix.test_utils import blend_shares, paste_shares

def gen(seed=0, device='cpu'): return torch.Generator(device).manual_seed(seed)
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

# ---- Edge cases of the functions: 1-D masks, samples left exactly as they were, shares when p = 0, numbers and flags,
# memory formats, resized boxes read as F.interpolate reads them (MixCollate: tests/test_collate.py) ----

def bits(t): return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16) # NaN-safe, sign-of-zero-safe

# a float (N, L) target of a 1-D signal: a plain tensor is dense (blended), a fastai `TensorMask` is a mask (pasted)
@pytest.mark.parametrize('per_sample', [False, True])
@pytest.mark.parametrize('fn', [cutmix, resizemix])
def test_float_1d_mask_marked_by_tensormask(fn, per_sample):
    x, m = torch.rand(16, 2, 24), torch.rand(16, 24)
    assert is_mask(TensorMask(m), 16, (24,)) and not is_mask(m, 16, (24,))
    (xm, ym), perm, lam = fn(x, y=m, per_sample=per_sample, generator=gen(1)) # plain: dense, blended with the share
    w = lam.view(-1, 1) if per_sample else lam
    close_(ym, m[perm] * (1 - w) + m * w)
    (xm, ym), perm, lam = fn(x, y=TensorMask(m), per_sample=per_sample, interpolation='nearest', generator=gen(1)) \
        if fn is resizemix else fn(x, y=TensorMask(m), per_sample=per_sample, generator=gen(1))
    inbox = (xm != x).any(1)
    assert inbox.any()
    eq_(ym[~inbox], m[~inbox]) # outside the box: the original's mask, not a blend
    for i in range(16): assert torch.isin(ym[i][inbox[i]], m[perm[i]]).all() # inside: the partner's values, not blended

def test_mask_rules_kept():
    "Backward compatible: (N, 1, L) float and int (N, L) are masks; float (N, L), class indices and other shapes are not"
    n, size = 4, (12,)
    eq_([is_mask(t, n, size) for t in (torch.rand(4, 1, 12), torch.randint(0, 3, (4, 12)), torch.rand(4, 12),
                                       torch.zeros(4).long(), TensorMask(torch.rand(4, 13)), TensorMask(torch.zeros(4).long()))],
        [True, True, False, False, False, False])
    eq_(is_mask(TensorMask(torch.rand(4, 8, 8)), 4, (8, 8)), True)

# MixUp with p < 1 leaves the other samples bit for bit, whatever their partners hold
def test_mixup_unmixed_samples_exact():
    x = torch.randn(64, 3, 5)
    x[::3] = float('inf'); x[1::3, 0] = float('nan'); x[2::3, 1, 0] = -0.
    y = x[:, 0].clone() # dense float targets: the same guarantee
    (xm, ym), perm, lam = mixup(x, p=.5, y=y, generator=gen())
    keep = lam == 1
    assert 10 < keep.sum() < 54 and (perm[keep] != torch.arange(64)[keep]).any()
    eq_(bits(xm[keep]), bits(x[keep])); eq_(bits(ym[keep]), bits(y[keep]))

def test_mixup_share_one_exact():
    "A share of exactly 1 (Beta draws round to 1 often with a small alpha, or in half precision) keeps its sample exactly"
    x = torch.randn(64, 4); x[x[:, 0] > 0] = float('inf')
    fin = torch.isfinite(x).all(1)
    x[fin, 1] = -0.
    xm, perm, lam = mixup(x, alpha=.01, generator=gen())
    keep = (lam == 1) & fin # finite samples whose partner may hold inf
    assert keep.sum() > 5 and (~torch.isfinite(x[perm[keep]])).any()
    eq_(bits(xm[keep]), bits(x[keep]))

# p = 0 gives per-sample shares as a tensor, where a tensor is promised
@pytest.mark.parametrize('fn,kw', [(mixup, {}), (cutmix, dict(per_sample=True)), (resizemix, dict(per_sample=True))])
def test_p0_per_sample_share_is_tensor(fn, kw):
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6)
    (xm, ym), perm, lam = fn(x, p=0., y=y, **kw)
    assert isinstance(lam, torch.Tensor) and xm is x and ym is y
    eq_(lam, torch.ones(6)); eq_(lam.dtype, torch.float32); eq_(lam.device, x.device); eq_(perm, torch.arange(6))
    lam.view(-1, 1, 1, 1) # what an annealing loop does with it

@pytest.mark.parametrize('fn', [cutmix, resizemix])
def test_p0_batch_share_stays_float(fn):
    xm, perm, lam = fn(torch.rand(6, 3, 8, 8), p=0.)
    assert isinstance(lam, float) and lam == 1.

# numbers as numpy or 0-d tensors, flags, bicubic on volumes, non-tensor inputs
def test_numpy_and_tensor_numbers_accepted():
    for v in (np.float32(.5), np.float64(.5), np.int64(1), torch.tensor(.5), torch.tensor(1), np.array(.5)):
        eq_(type(check_alpha(v)), float); eq_(type(check_share(v, 'p')), float); close_(check_share(v, 'p'), float(v))
    eq_(check_minmax(np.array([.2, .5])), (.2, .5)); eq_(check_minmax(torch.tensor([.25, .5])), (.25, .5))
    eq_(check_minmax((np.float32(.25), torch.tensor(.5))), (.25, .5))
    eq_(check_lam_range(np.float32(.25), torch.tensor(.5)), (.25, .5))
    x = torch.rand(4, 3, 8, 8)
    for fn in (mixup, cutmix, resizemix): fn(x, alpha=np.float32(1.), p=torch.tensor(.5), generator=gen())

@pytest.mark.parametrize('bad', [np.bool_(True), torch.tensor(True), float('nan'), torch.tensor(float('nan')), np.float64('nan'),
                                 torch.tensor([.5]), np.array([.5]), torch.tensor(.5+0j), '0.5', None])
def test_numbers_refused(bad):
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\], got"): check_share(bad, 'p')
    with pytest.raises(ValueError, match=r"alpha must be a finite number > 0.*got"): check_alpha(bad)

def test_check_flag():
    from fastai_mix.core import check_flag
    eq_(check_flag(True, 'per_sample'), True); eq_(check_flag(np.bool_(False), 'per_sample'), False)
    assert type(check_flag(np.bool_(True), 'x')) is bool
    for bad in ('False', 'True', 1, 0, None, 1., torch.tensor(True)):
        with pytest.raises(TypeError, match=r"per_sample must be True or False, got"): check_flag(bad, 'per_sample')
    x = torch.rand(4, 3, 8, 8)
    for fn in (cutmix, resizemix):
        with pytest.raises(TypeError, match=r"per_sample must be True or False, got 'False'"): fn(x, per_sample='False')
        with pytest.raises(TypeError, match=r"inplace must be True or False, got 'no'"): fn(x, inplace='no')

@pytest.mark.parametrize('per_sample', [False, True])
@pytest.mark.parametrize('shape', [(4, 2, 20), (4, 2, 6, 8, 10)], ids=['1d', '3d'])
def test_bicubic_needs_images(shape, per_sample):
    g = gen(); state = g.get_state()
    with pytest.raises(ValueError, match=r"interpolation='bicubic' works on images \(2 spatial dims\) only, got 3 dims|got 1 dim"):
        resizemix(torch.rand(shape), interpolation='bicubic', per_sample=per_sample, generator=g)
    eq_(g.get_state(), state) # refused before anything was drawn
    with pytest.raises(ValueError, match=r"interpolation='bicubic' works on images"): check_interpolation('bicubic', ndim=len(shape) - 2)
    eq_(check_interpolation('bicubic', True, ndim=2), 'bicubic')

def test_non_tensor_input_named():
    with pytest.raises(TypeError, match=r"x\[1\] is a list"): mixup((torch.rand(4, 3), [1, 2]))
    with pytest.raises(TypeError, match=r"x\[0\] is a numpy.ndarray"): cutmix([np.zeros((4, 3, 8, 8)), torch.rand(4, 3, 8, 8)])
    with pytest.raises(TypeError, match=r"x must be a tensor or a non-empty sequence of tensors, got an empty tuple"): mixup(())
    with pytest.raises(TypeError, match=r"x must be a tensor or a non-empty sequence of tensors, got a str"): mixup('abc')
    with pytest.raises(TypeError, match=r"y\[1\] is a str"): mixup(torch.rand(4, 3), y=(torch.zeros(4), 'a'))

# memory formats kept by the per-sample paths
@pytest.mark.parametrize('fmt,shape', [(torch.channels_last, (6, 3, 10, 12)), (torch.channels_last_3d, (6, 3, 4, 6, 8))], ids=['2d', '3d'])
@pytest.mark.parametrize('fn,mode', [(cutmix, None), (resizemix, 'bilinear'), (resizemix, 'nearest')])
def test_per_sample_memory_format(fn, mode, fmt, shape):
    x = torch.rand(shape)
    kw = dict(per_sample=True) | (dict(interpolation=mode) if mode else {})
    xm, perm, lam = fn(x.contiguous(memory_format=fmt), generator=gen(), **kw)
    assert xm.is_contiguous(memory_format=fmt)
    close_(xm, fn(x, generator=gen(), **kw)[0])

# resized masks and per-sample 'nearest' read the pixels F.interpolate reads into the same box
def _per_sample_boxes(n, size, lam_range, seed, device='cpu'):
    lo, hi = draw_boxes(n, size, 1., lam_range, None, 1., device, gen(seed, device)) # the draws resizemix makes first
    return [tuple(slice(int(a[i]), int(b[i])) for a, b in zip(lo, hi)) for i in range(n)]

def _check_boxes(out, src, perm, boxes, mode):
    "Each sample's box in `out` is exactly F.interpolate of its partner in `src` into the box"
    for i, box in enumerate(boxes):
        sides = [s.stop - s.start for s in box]
        if 0 in sides: continue
        part = src[perm[i]].float()
        part = part.view(-1, *part.shape[part.ndim - len(box):])[None] # (1, C, *size), also for a mask
        got = out[i][(Ellipsis, *box)]
        eq_(got, F.interpolate(part, size=sides, mode=mode)[0].to(src.dtype).view(got.shape))

def test_whole_number_scale_reads_every_other_pixel():
    "224 -> 112: per-sample 'nearest' reads 0, 2, 4, ... (as F.interpolate's 'nearest'), masks 1, 3, 5, ... ('nearest-exact')"
    n = 6
    pos = torch.arange(224.).expand(n, 1, 224).contiguous()
    (xm, mm), perm, lam = resizemix(pos, lam_min=.5, lam_max=.5, interpolation='nearest', per_sample=True, y=pos[:, 0].long(), generator=gen())
    (xb, mb), _, _ = resizemix(pos, lam_min=.5, lam_max=.5, per_sample=True, y=pos[:, 0].long(), generator=gen())
    boxes = _per_sample_boxes(n, (224,), (.5, .5), 0)
    for i, (b,) in enumerate(boxes):
        eq_(b.stop - b.start, 112)
        eq_(xm[i, 0, b], torch.arange(0., 224, 2)); eq_(mm[i, b], torch.arange(0, 224, 2)) # image and mask read alike
        eq_(mb[i, b], torch.arange(1, 224, 2)) # with 'bilinear', the mask reads the centres ('nearest-exact')

PS_CASES = [(size, mode) for size in [(37,), (23, 30), (7, 9, 11)] for mode in ['bilinear', 'nearest', 'bicubic']
            if mode != 'bicubic' or len(size) == 2]

@pytest.mark.parametrize('size,interpolation', PS_CASES, ids=[f'{len(s)}d-{m}' for s, m in PS_CASES])
def test_per_sample_nearest_and_masks_are_interpolate_per_box(size, interpolation, device='cpu'):
    n = 12
    x, m = torch.rand(n, 2, *size, device=device), torch.randint(0, 1000, (n, *size), device=device)
    (xm, mm), perm, lam = resizemix(x, y=m, per_sample=True, interpolation=interpolation, generator=gen(2, device))
    boxes = _per_sample_boxes(n, size, (.1, .8), 2, device)
    mask_mode = 'nearest' if interpolation == 'nearest' else 'nearest-exact'
    _check_boxes(mm, m, perm, boxes, mask_mode)
    if interpolation == 'nearest': _check_boxes(xm, x, perm, boxes, 'nearest')

@pytest.mark.parametrize('size', [(37,), (23, 30), (7, 9, 11)], ids=['1d', '2d', '3d'])
@pytest.mark.parametrize('interpolation', ['bilinear', 'nearest', 'area'])
def test_batch_masks_are_interpolate_per_box(size, interpolation):
    from fastai_mix.core import resize_box, beta_sample
    n = 8
    x, m = torch.rand(n, 2, *size), torch.randint(0, 1000, (n, *size))
    for seed in range(5):
        (xm, mm), perm, lam = resizemix(x, y=m, interpolation=interpolation, generator=gen(seed))
        g = gen(seed)
        lam0 = .1 + .7 * beta_sample(1., 1, generator=g).item(); torch.randperm(n, generator=g)
        box = resize_box(size, lam0, g)
        _check_boxes(mm, m, perm, [box] * n, 'nearest' if interpolation == 'nearest' else 'nearest-exact')

@pytest.mark.parametrize('exact', [True, False], ids=['nearest-exact', 'nearest'])
def test_nearest_index_is_interpolate(exact):
    "Every box side of several sizes: the index map is the one F.interpolate reads with"
    from fastai_mix.core import nearest_index
    for s in (7, 30, 97, 224, 501):
        pos, sides = torch.arange(float(s)).view(1, 1, s), torch.arange(1, s + 1)
        idx = nearest_index(torch.zeros_like(sides), sides, s, exact)
        for side in range(1, s + 1):
            eq_(idx[side - 1, :side], F.interpolate(pos, size=side, mode='nearest-exact' if exact else 'nearest')[0, 0].long())

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_nearest_boxes_and_no_sync():
    "On the GPU too, per-sample nearest boxes are F.interpolate's, and the new paths make no host-device sync"
    for size, mode in PS_CASES: test_per_sample_nearest_and_masks_are_interpolate_per_box(size, mode, device='cuda')
    x, m = torch.rand(32, 3, 16, 16, device='cuda'), torch.randint(0, 3, (32, 16, 16), device='cuda')
    torch.cuda.set_sync_debug_mode('error')
    try:
        resizemix(x, y=m, per_sample=True, interpolation='nearest', p=.5)
        mixup(x, p=.5, y=torch.rand(32, 4, device='cuda')); mixup(x, p=0.); cutmix(x, per_sample=True, p=0.)
    finally: torch.cuda.set_sync_debug_mode('default')

def test_lerp_mix_exact_under_autograd():
    "The exact pass (a sample of share 1 copied back) works on a tensor in the autograd graph, and its gradient is the blend's"
    from fastai_mix import lerp_mix
    x = torch.randn(4, 3, requires_grad=True)
    lam, perm = torch.tensor([1., .6, .7, 1.]), torch.tensor([1, 0, 3, 2])
    y = lerp_mix(x * 1, perm, lam)
    y.sum().backward()
    exp = lam.clone() # each sample's own share, plus its share as the partner of the sample that took it
    for i, j in enumerate(perm.tolist()):
        if lam[i] < 1: exp[j] += 1 - lam[i]
    torch.testing.assert_close(x.grad, exp[:, None].expand(4, 3))
