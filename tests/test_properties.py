"Property-based tests (hypothesis): any shape, spatial rank, dtype, batch size and option, the mixes are finite and exact"
import math
import torch, torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck
from fastcore.test import test_close as close_, test_eq as eq_
from fastai.torch_core import no_random
from fastai.losses import CrossEntropyLossFlat
from fastai_mix import MixUp, CutMix, ResizeMix, mix_loss
from fastai_mix.test_utils import blend_shares, paste_shares

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
EPS = {torch.float32: 1e-5, torch.float64: 1e-9, torch.float16: 2e-3, torch.bfloat16: 2e-2} # blend read-back, by input dtype
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
alphas = st.floats(0.05, 8.)
shares = st.sampled_from([0., .3, 1.]) | st.floats(0., 1.)

@st.composite
def batches(draw, min_rank=1):
    "(x, y, onehot, mask): inputs whose samples never share a value (sample i lies in [i, i+.5]), class indices, their one-hot and a mask of sample ids"
    k = draw(st.integers(min_rank, 3))
    size = tuple(draw(st.lists(st.integers(1, 7), min_size=k, max_size=k)))
    n, c, dtype = draw(st.integers(1, 6)), draw(st.integers(1, 3)), draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    ids = torch.arange(n)
    x = (ids.view(n, 1, *[1] * k) + .5 * torch.rand(n, c, *size, generator=g)).to(dtype)
    y = torch.randint(0, 4, (n,), generator=g)
    mask = ids.view(n, *[1] * k).expand(n, *size).clone()
    return x, y, F.one_hot(y, 4).float(), mask

def check_common(x, y, onehot, xm, ym, perm, lam):
    "Shapes and dtypes kept, nothing non-finite, shares in [0, 1], one-hot rows still sum to 1 and blend with the shares"
    eq_((xm.shape, xm.dtype), (x.shape, x.dtype)); assert torch.isfinite(xm).all()
    eq_(sorted(perm.tolist()), list(range(len(x))))
    lam = lam if isinstance(lam, torch.Tensor) else torch.full((len(x),), float(lam))
    assert torch.isfinite(lam).all() and (lam >= 0).all() and (lam <= 1).all()
    eq_(ym[0], y) # class indices are kept
    close_(ym[1].sum(1), torch.ones(len(x)), eps=1e-5)
    close_(ym[1], lam[:, None] * onehot + (1 - lam[:, None]) * onehot[perm], eps=1e-6)
    return lam

def check_loss(share, y, perm, lam, eps=1e-4):
    "The mixed loss is the loss weighted by the shares read back from the pixels (up to `eps`, as exact as the read-back)"
    pred = torch.randn(len(y), 4, generator=torch.Generator().manual_seed(1))
    ce = lambda t: F.cross_entropy(pred, t, reduction='none')
    close_(mix_loss(CrossEntropyLossFlat(), pred, (y,), (y[perm],), lam), (share * ce(y) + (1 - share) * ce(y[perm])).mean(), eps=eps)

@SETTINGS
@given(b=batches(min_rank=0), alpha=alphas, p=shares, seed=st.integers(0, 2**16))
def test_mixup_properties(b, alpha, p, seed):
    x, y, onehot, _ = b
    with no_random(seed): ((xm, *_), ym), perm, lam = MixUp(alpha=alpha, p=p).mix((x,), (y, onehot), inplace=False)
    lam = check_common(x, y, onehot, xm, ym, perm, lam)
    assert (lam >= .5).all()
    moved = perm != torch.arange(len(x))
    close_(xm[~moved], x[~moved]) # a sample paired with itself is itself
    close_(blend_shares(x, xm, perm)[moved], lam[moved], eps=EPS[x.dtype])
    check_loss(torch.where(moved, blend_shares(x, xm, perm), lam), y, perm, lam, eps=1e-4 + 5 * EPS[x.dtype])

def paste_props(mixer, b, seed):
    x, y, onehot, mask = b
    x0 = x.clone()
    with no_random(seed): ((xm,), (*ym, mm)), perm, lam = mixer.mix((x,), (y, onehot, mask), inplace=False)
    eq_(x, x0) # not in place when asked not to be
    lam = check_common(x, y, onehot, xm, ym, perm, lam)
    share = paste_shares(x, xm, perm) # exact: samples never share a value, so a position holds the original or not
    moved = perm != torch.arange(len(x))
    close_(share[moved], lam[moved], eps=1e-6)
    kept = (xm == x).all(1) # positions that hold the original
    eq_(mm, torch.where(kept, torch.arange(len(x)).view(-1, *[1] * (mm.ndim - 1)), perm.view(-1, *[1] * (mm.ndim - 1))).expand_as(mm)) # the mask of sample ids got the same box
    pasted_from = xm.floor().long() # each value is its sample's id plus less than .5
    assert (pasted_from[~kept.unsqueeze(1).expand_as(xm)] == perm.view(-1, *[1] * (xm.ndim - 1)).expand_as(xm)[~kept.unsqueeze(1).expand_as(xm)]).all()
    check_loss(torch.where(moved, share, lam), y, perm, lam)

@SETTINGS
@given(b=batches(), alpha=alphas, p=shares, per_sample=st.booleans(), minmax=st.none() | st.tuples(shares, shares).map(sorted), seed=st.integers(0, 2**16))
def test_cutmix_properties(b, alpha, p, per_sample, minmax, seed):
    paste_props(CutMix(alpha=alpha, p=p, per_sample=per_sample, minmax=minmax), b, seed)

@SETTINGS
@given(b=batches(), alpha=alphas, p=shares, per_sample=st.booleans(), minmax=st.none() | st.tuples(shares, shares).map(sorted),
       lams=st.tuples(shares, shares).map(sorted), interpolation=st.sampled_from(['bilinear', 'nearest']), seed=st.integers(0, 2**16))
def test_resizemix_properties(b, alpha, p, per_sample, minmax, lams, interpolation, seed):
    m = ResizeMix(alpha=alpha, lam_min=lams[0], lam_max=lams[1], interpolation=interpolation, p=p, per_sample=per_sample, minmax=minmax)
    paste_props(m, b, seed)
