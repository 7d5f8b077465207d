"""Distributed training (fastai's `distrib_ctx`, Accelerate, DDP) on 2 CPU processes with gloo: each rank mixes its own shard.

One launch (`torch.distributed.run`, 2 ranks) trains every mixer twice from the same seed on each rank, and the tests
read what the ranks saw. What they catch: a rank whose loss function, callbacks or mixer state are not as found after
a fit inside `distrib_ctx` (DDP wraps and unwraps the model); ranks seeded alike that draw the same partners or
shares (they must draw their own) or that do not draw the same again from the same seed; a rank whose shares in the
pixels are not the ones its loss is mixed with; for MixUp, CutMix (one share and per sample), ResizeMix, MixChoice
and FMix (one share and per sample). The ranks' fastai loaders load in their own process (`defaults.cpus = 0`, as in
tests/conftest.py: DDP shards the indices in the main process either way), so the launch costs about the start of
three Python processes; the two xdist workers share it (`ranks` below), where each would otherwise launch its own."""
import os, sys, socket, subprocess, pathlib
import pytest, torch, torch.nn.functional as F
from fastcore.test import test_close as close_, test_eq as eq_
from test_callback import share_from_pixels, moved
from fastai_mix import MixUp, CutMix, ResizeMix, MixChoice

pytest.importorskip('accelerate', reason="fastai's distrib_ctx needs accelerate (pip install accelerate)")
pytestmark = pytest.mark.slow
WORKER = pathlib.Path(__file__).parent/'distrib_worker.py'
NAMES = ['mixup', 'cutmix', 'resizemix', 'cutmix_ps', 'choice', 'fmix', 'fmix_ps']

def free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def launch(out:pathlib.Path):
    "Launch 2 CPU ranks (GPUs hidden) once for all the mixers, writing their reports into `out`"
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', PYTHONPATH=os.pathsep.join([str(WORKER.parents[1]), os.environ.get('PYTHONPATH', '')]))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1', '--master_port', str(free_port()),
           str(WORKER), str(out), ','.join(NAMES)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"the 2-process run failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    (out/'done').touch()

@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    """{name: [rank 0's report, rank 1's report]}, from one launch. Under pytest-xdist each worker that runs some of
    these tests would launch its own: the first one launches into the run's shared temporary folder, under a file
    lock, and the other reads its reports (it waits meanwhile, while the two ranks keep both cores busy)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available(): pytest.skip('torch.distributed with gloo is not available')
    if os.environ.get('PYTEST_XDIST_WORKER'):
        from filelock import FileLock
        shared = tmp_path_factory.getbasetemp().parent # this run's folder, above each worker's own
        out = shared/'ddp'
        with FileLock(str(shared/'ddp.lock')):
            if not (out/'done').exists():
                out.mkdir(exist_ok=True)
                launch(out)
    else:
        out = tmp_path_factory.mktemp('ddp')
        launch(out)
    return {n: [torch.load(out/f'{n}_rank{r}.pt', weights_only=False) for r in (0, 1)] for n in NAMES}

MIXER_OF = dict(mixup=MixUp, cutmix=CutMix, resizemix=ResizeMix, cutmix_ps=CutMix, fmix=CutMix, fmix_ps=CutMix) # FMix's shares read back as a paste's

@pytest.mark.parametrize('name', NAMES)
def test_each_rank_trains_and_is_left_as_found(ranks, name):
    for r, d in enumerate(ranks[name]):
        eq_((d['rank'], d['world'], d['backend']), (r, 2, 'gloo'))
        eq_(d['n_batches'], 2 * 64 // 8 // 2) # 2 epochs of its half of 64 samples in batches of 8
        assert d['lf_same'], f"rank {r}: the loss function was not given back"
        assert d['ours_kept'] and d['state_clear'] and d['model_unwrapped'] == 'Sequential'
        before, after = d['cb_names']
        eq_(sorted(after), sorted(before)) # fastai gives rank 1 a new ProgressCallback after removing it: compare the kinds
        assert 'DistributedTrainer' not in after

def same_lam(a, b):
    "Whether two shares are the same: floats (one per batch) or tensors (one per sample)"
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor): return False
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

def same_draw(a, b):
    "Whether two records hold the same partner permutation or the same share(s)"
    return torch.equal(a['perm'], b['perm']) or same_lam(a['lam'], b['lam'])

@pytest.mark.parametrize('name', NAMES)
def test_ranks_seeded_alike_draw_differently(ranks, name):
    "Both ranks seeded alike: in every batch each rank has its own permutation and its own shares; the same seed gives each rank the same draws again"
    r0, r1 = (d['records'] for d in ranks[name])
    assert len(r0) == len(r1) == 8
    for a, b in zip(r0, r1): assert not same_draw(a, b), "two ranks drew the same permutation or shares"
    for d in ranks[name]:
        eq_(len(d['again']), len(d['records']))
        for a, b in zip(d['records'], d['again']):
            assert torch.equal(a['x'], b['x']) # the data order agreed across ranks is unchanged, and the same again
            assert torch.equal(a['perm'], b['perm']) and same_lam(a['lam'], b['lam'])

@pytest.mark.parametrize('name', NAMES)
def test_each_rank_mixes_its_own_shard(ranks, name):
    r0, r1 = (d['records'] for d in ranks[name])
    for a, b in zip(r0, r1): assert not torch.equal(a['x'], b['x']) # its own samples
    assert any(not torch.equal(a['perm'], b['perm']) for a, b in zip(r0, r1)) # its own draws
    if name == 'choice': return
    mixer = MIXER_OF[name]()
    for recs in (r0, r1):
        for r in recs:
            lam = r['lam'] if isinstance(r['lam'], torch.Tensor) else torch.full((len(r['perm']),), r['lam'])
            ok = moved(r['perm'])
            if name in ('cutmix_ps', 'fmix_ps'): got = (r['xm'] == r['x']).flatten(2).all(1).float().mean(1)
            else: got = share_from_pixels(mixer, r)
            close_(got[ok], lam[ok], eps=1e-4 if name != 'resizemix' else .02) # the shares in the pixels ...
            y = r['y'][0]
            exp = lam * F.cross_entropy(r['pred'], y, reduction='none') + (1 - lam) * F.cross_entropy(r['pred'], y[r['perm']], reduction='none')
            close_(r['loss'], exp.mean(), eps=1e-5) # ... are the loss's, on every rank
