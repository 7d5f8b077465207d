"fastai_mix.calibration: ECE on hand-made predictions, against a transcription of Guo et al.'s code, the bins, the metric and the diagram"
import math
import numpy as np, pytest, torch
from fastcore.test import test_eq as eq_, test_close as close_, test_fail as fail_
from fastai.torch_core import no_random
from fastai.metrics import accuracy
from fastai_mix.calibration import ece, calibration_bins, bins_ece, pool_bins, plot_reliability, ECE
from fastai_mix.test_utils import synth_learner

def preds(groups, k=2):
    "Predictions in groups (confidence, n, n right): the top class 0 with probability `confidence`, the rest spread over the others"
    p, t = [], []
    for conf, n, right in groups:
        p += [[conf] + [(1 - conf) / (k - 1)] * (k - 1)] * n
        t += [0] * right + [1] * (n - right)
    return torch.tensor(p, dtype=torch.float64), torch.tensor(t)

def test_perfectly_calibrated():
    "In every bin, as many right as the confidence says: ECE 0"
    p, t = preds([(.6, 5, 3), (.8, 10, 8), (.9, 10, 9), (1., 4, 4)])
    close_(ece(p, t), 0., eps=1e-12)
    p, t = preds([(.5, 4, 2), (.75, 8, 6)], k=4)
    close_(ece(p, t), 0., eps=1e-12)

def test_overconfident_by_hand():
    # 10 predictions at 0.9 with 6 right (gap 0.3), 5 at 0.7 with 2 right (gap 0.3), 5 at 0.99 with 5 right (gap 0.01):
    # ECE = 10/20 * 0.3 + 5/20 * 0.3 + 5/20 * 0.01 = 0.2275
    p, t = preds([(.9, 10, 6), (.7, 5, 2), (.99, 5, 5)])
    close_(ece(p, t), 0.2275, eps=1e-12)
    close_(ece(p.numpy(), t.numpy()), 0.2275, eps=1e-12) # numpy arrays too
    b = calibration_bins(p, t)
    eq_([i for i, c in enumerate(b['count']) if c], [10, 13, 14]) # (0.667, 0.733], (0.867, 0.933], (0.933, 1]
    close_([b['accuracy'][i] for i in (10, 13, 14)], [.4, .6, 1.])
    close_([b['confidence'][i] for i in (10, 13, 14)], [.7, .9, .99])
    # the same predictions in 2 bins: (0, 0.5] is empty, (0.5, 1] holds all 20, 13 right at a mean confidence of
    # (10 * 0.9 + 5 * 0.7 + 5 * 0.99) / 20 = 0.8725: ECE = |0.65 - 0.8725| = 0.2225
    close_(ece(p, t, n_bins=2), 0.2225, eps=1e-12)

def guo_ece(probs, targets, n_bins=15):
    "Guo et al.'s ECE, as their code computes it (gpleiss/temperature_scaling, _ECELoss), in numpy"
    conf, pred = probs.max(1), probs.argmax(1)
    acc = pred == targets
    edges, res = np.linspace(0, 1, n_bins + 1), 0.
    for lo, hi in zip(edges[:-1], edges[1:]):
        inb = (conf > lo) & (conf <= hi)
        if inb.mean() > 0: res += abs(conf[inb].mean() - acc[inb].mean()) * inb.mean()
    return res

@pytest.mark.parametrize('n_bins', [1, 10, 15])
def test_against_guo(n_bins):
    g = torch.Generator().manual_seed(n_bins)
    p = (torch.randn(500, 10, generator=g, dtype=torch.float64) * 3).softmax(1)
    t = torch.randint(0, 10, (500,), generator=g)
    close_(ece(p, t, n_bins), guo_ece(p.numpy(), t.numpy(), n_bins), eps=1e-12)

def test_bin_edges():
    "Bins are closed on the right, as (m-1)/M < confidence <= m/M: 0.5 in the first of 2 bins, 1.0 in the last"
    p, t = preds([(.5, 1, 1), (1., 1, 1)])
    eq_(calibration_bins(p, t, n_bins=2)['count'], [1, 1])
    eq_(calibration_bins(p, t, n_bins=4)['count'], [0, 1, 0, 1])

def test_checks():
    t = torch.zeros(4, dtype=torch.long)
    fail_(ece, args=(torch.randn(4, 3), t), contains="give the softmax of the model's outputs")
    fail_(ece, args=(torch.full((4, 3), .5), t), contains='summing to 1')
    fail_(ece, args=(torch.full((4, 2), .5), t.float()), contains='targets must be 4 class indices (ints)')
    fail_(ece, args=(torch.full((4, 2), .5), t[:3]), contains='targets must be 4 class indices')
    fail_(ece, args=(torch.full((4, 2), .5), t + 2), contains='targets must be in [0, 2), got 2 to 2')
    fail_(ece, args=(torch.ones(4), t), contains='probs must be (n, classes)')
    fail_(ece, args=(torch.ones(0, 2), t[:0]), contains='no predictions')
    for bad in (0, 1.5, True): fail_(ece, args=(torch.full((4, 2), .5), t), kwargs=dict(n_bins=bad), contains='n_bins must be a positive int')
    fail_(ECE, kwargs=dict(n_bins=0), contains='n_bins must be a positive int')

def test_pool_bins():
    g = torch.Generator().manual_seed(0)
    p, t = (torch.randn(300, 5, generator=g) * 2).softmax(1), torch.randint(0, 5, (300,), generator=g)
    parts = [calibration_bins(p[i:i + 100], t[i:i + 100]) for i in (0, 100, 200)]
    whole, pooled = calibration_bins(p, t), pool_bins(parts)
    eq_(pooled['count'], whole['count'])
    for k in ('accuracy', 'confidence'):
        eq_([v is None for v in pooled[k]], [v is None for v in whole[k]])
        close_([v for v in pooled[k] if v is not None], [v for v in whole[k] if v is not None])
    close_(bins_ece(pooled), ece(p, t))
    fail_(pool_bins, args=([parts[0], calibration_bins(p, t, 10)],), contains='the same edges')
    fail_(pool_bins, args=([],), contains='at least one')

def test_metric_in_learner():
    "ECE() as a fastai metric: after each epoch, the ECE of the softmax of the validation outputs"
    with no_random(0): learn = synth_learner(c=4)
    learn.metrics = [accuracy, ECE()]
    with learn.no_logging(), learn.no_bar(), no_random(1): learn.fit(2, 1e-2)
    eq_(learn.recorder.metric_names[-2], 'ece')
    v = learn.recorder.values[-1][-1]
    probs, targs = learn.get_preds()
    close_(v, ece(probs, targs))
    assert 0 < v < 1

def test_plot_reliability(tmp_path):
    p, t = preds([(.9, 10, 6), (.7, 5, 2)])
    # flipped targets: 4 of 10 right at 0.9 (gap 0.5), 3 of 5 at 0.7 (gap 0.1): ECE = (10 * 0.5 + 5 * 0.1) / 15 = 36.7%
    fig = plot_reliability({'none': calibration_bins(p, t), 'mixup': calibration_bins(p, 1 - t), 'cutmix': calibration_bins(p, t)}, tmp_path/'c.png', ncols=2)
    assert (tmp_path/'c.png').stat().st_size > 0
    eq_([ax.get_title() for ax in fig.axes if ax.get_visible()], ['none: ECE 30.0%', 'mixup: ECE 36.7%', 'cutmix: ECE 30.0%'])

class Diverged(torch.nn.Module):
    "A linear classifier that trains as usual, but whose outputs in eval mode hold inf and NaN: a run that diverged, as its validation sees it"
    def __init__(self, n_in:int, c:int): super().__init__(); self.lin = torch.nn.Linear(n_in, c)
    def forward(self, x):
        out = self.lin(x.flatten(1))
        if self.training: return out
        out = out.clone()
        out[::3, 0], out[1::3, 1] = float('inf'), float('nan') # a third of the rows left finite
        return out

def test_metric_of_a_diverged_run_is_nan():
    "A validation whose outputs hold inf/NaN: the fit completes, the recorder holds NaN for ece beside accuracy's number (issue 29, item 9)"
    with no_random(0): learn = synth_learner(c=4)
    learn.model, learn.metrics = Diverged(3 * 8 * 8, 4), [accuracy, ECE()]
    with learn.no_logging(), learn.no_bar(), no_random(1), pytest.warns(RuntimeWarning, match='NaN or inf'): learn.fit(2, 1e-2)
    eq_(len(learn.recorder.values), 2) # both epochs ran to the end
    eq_(learn.recorder.metric_names[-3:-1], ['accuracy', 'ece'])
    for row in learn.recorder.values:
        acc, e = row[-2:]
        assert 0 <= acc <= 1 and math.isnan(e), row
    eq_(learn.metrics[1].bins, None) # no bins for a reliability diagram of NaN predictions
    learn.model = torch.nn.Sequential(torch.nn.Flatten(), learn.model.lin) # the same weights, finite outputs: a number again
    with learn.no_bar(): v = learn.validate()[-1]
    probs, targs = learn.get_preds()
    close_(v, ece(probs, targs))
    masked = torch.tensor([[0., -float('inf'), 1.]] * 4) # -inf logits of masked classes: finite probabilities, a real ECE
    learn.metrics[1].reset(); learn.metrics[1].probs, learn.metrics[1].targs = [masked.softmax(1)], [torch.tensor([0, 2, 2, 2])]
    assert math.isfinite(learn.metrics[1].value)

def test_metric_on_tabular_classifier():
    "ECE() on fastai's tabular classifier, whose targets come as one column of class indices (N, 1)"
    import pandas as pd
    from fastai.data.block import CategoryBlock
    from fastai.tabular.all import TabularDataLoaders, tabular_learner
    g = torch.Generator().manual_seed(0)
    df = pd.DataFrame(torch.randn(64, 2, generator=g).numpy(), columns=['a', 'b'])
    df['y'] = (df.a > 0).astype(int)
    with no_random(0):
        dls = TabularDataLoaders.from_df(df, y_names='y', cont_names=['a', 'b'], y_block=CategoryBlock(), bs=16)
        learn = tabular_learner(dls, layers=[8], metrics=ECE())
    eq_(dls.valid.one_batch()[-1].shape[1:], (1,)) # the targets: (N, 1)
    with learn.no_logging(), learn.no_bar(), no_random(1): learn.fit(1, 1e-2)
    probs, targs = learn.get_preds()
    close_(learn.recorder.values[-1][-1], ece(probs, targs.view(-1)))
