"Issue 21: `fastai-mix demo --data fashion-mnist` through the command line on written IDX files, and calibration (ECE) in every demo run"
import functools, json, math
import numpy as np, pytest
from pathlib import Path
from PIL import Image
from fastcore.test import test_eq as eq_, test_close as close_
from fastai_mix import data as D
from fastai_mix import demo
from fastai_mix.data import write_idx, idx_files, FASHION_MNIST_FILES
from fastai_mix.demo import main, paired_summary, results_table, FASHION_MNIST_DEMO, DEFAULT_MIX

TINY = ['--epochs', '1', '--seeds', '2', '--n-train', '32', '--bs', '16', '--jobs', '1']
ECE_HEAD = '| ECE % | ECE vs none | 95% interval | calibration |'

def fashion_files(folder:Path, n:tuple=(48, 24), gz:bool=True) -> Path:
    "Fashion-MNIST's four IDX files with `n` random training and test images (classes 0..9 in turn) in `folder`"
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, k in zip(('train', 'test'), n):
        write_idx(rng.integers(0, 256, (k, 28, 28), dtype=np.uint8), folder/(FASHION_MNIST_FILES[f'{split}_images'] + '.gz' * gz))
        write_idx(np.arange(k, dtype=np.uint8) % 10, folder/(FASHION_MNIST_FILES[f'{split}_labels'] + '.gz' * gz))
    return folder

def usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e: main(argv)
    eq_(e.value.code, 2)
    return capsys.readouterr().err

def check_calibration(res:dict, n_valid:int):
    "Every run has its ECE, per epoch too, and bins that hold every test image; the summary has the paired ECE differences"
    for r in res['runs']:
        assert 0 <= r['ece'] <= 1 and all(0 <= h['ece'] <= 1 for h in r['history'])
        eq_(r['ece'], r['history'][-1]['ece'])
        eq_(sum(r['calibration']['count']), n_valid)
        eq_(len(r['calibration']['count']), 15)
    for s in res['summary'][1:]:
        close_(s['ece_diffs'], [r['ece'] - n['ece'] for r in res['runs'] if r['mixer'] == s['mixer'] for n in res['runs'] if n['mixer'] == 'none' and n['seed'] == r['seed']])
        assert s['calibration'] in ('better calibrated', 'worse calibrated', 'within the noise')

@pytest.mark.slow
def test_fashion_mnist_end_to_end(tmp_path, capsys):
    root, out = fashion_files(tmp_path/'fm'), tmp_path/'out'
    main(['demo', '--data', 'fashion-mnist', '--root', str(root), *TINY, '--out', str(out)])
    printed = capsys.readouterr().out
    res = json.loads((out/'results.json').read_text())
    s = res['settings']
    eq_((s['data'], s['n_train'], s['n_train_images'], s['n_valid_images'], s['size'], s['noise'], s['epochs'], s['bs']),
        ('fashion-mnist', 32, 32, 24, 28, 0., 1, 16)) # its own defaults (size 28, no noise), the options given win
    eq_(s['mix'], list(FASHION_MNIST_DEMO['mix'])) # none, mixup, cutmix, resizemix and fmix
    eq_(s['images'], str(root))
    eq_([(r['mixer'], r['seed']) for r in res['runs']], [(m, k) for k in (0, 1) for m in FASHION_MNIST_DEMO['mix']])
    check_calibration(res, 24)
    md = (out/'results.md').read_text()
    assert ECE_HEAD in md and results_table(paired_summary(res['runs'])) in printed
    eq_(sum(': accuracy ' in l and ', ECE ' in l for l in printed.splitlines()), 10) # a line per run, with its ECE
    for f in ('calibration.png', 'curves.png', 'accuracy.png', 'batch_fmix.png'): eq_(Image.open(out/f).format, 'PNG')
    eq_(sorted(p.name for p in out.iterdir() if p.is_dir()), []) # nothing staged on disk: the images stay in memory

@pytest.mark.slow
def test_fashion_mnist_noise_and_jobs(tmp_path, capsys):
    "Label noise on Fashion-MNIST is measured as on the digits; two worker processes give the same numbers as one"
    root = fashion_files(tmp_path/'fm', gz=False)
    res = []
    for jobs in ('1', '2'):
        main(['demo', '--data', 'fashion-mnist', '--root', str(root), *TINY, '--mix', 'none,mixup', '--noise', '0.5', '--jobs', jobs,
              '--out', str(tmp_path/jobs)])
        res.append(json.loads((tmp_path/jobs/'results.json').read_text()))
    capsys.readouterr()
    runs = [[{k: v for k, v in r.items() if k != 'sec_per_epoch'} for r in o['runs']] for o in res]
    eq_(runs[0], runs[1])
    for r in runs[0]: eq_(r['n_changed'], 16); assert 0 <= r['memorised'] <= 1
    eq_(res[0]['settings']['n_changed'], 16)

def test_fashion_mnist_usage_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(D, 'DEBIAN_FASHION_MNIST', tmp_path/'no_debian')
    def no_network(root): raise OSError('<urlopen error [Errno -2] Name or service not known>')
    monkeypatch.setattr(D, 'download_fashion_mnist', no_network)
    empty = tmp_path/'empty'; empty.mkdir()
    err = usage_error(['demo', '--data', 'fashion-mnist', '--root', str(empty), *TINY, '--out', str(tmp_path/'o')], capsys)
    for s in (f'{empty}/ and {empty}/FashionMNIST/raw/', 'apt-get install dataset-fashion-mnist', 'pip install torchvision', 'OSError: <urlopen error'):
        assert s in err, (s, err)
    monkeypatch.setenv('FASTAI_HOME', str(tmp_path/'fastai'))
    err = usage_error(['demo', '--data', 'fashion-mnist', *TINY, '--out', str(tmp_path/'o')], capsys) # no --root: the usual places
    assert f"{tmp_path/'no_debian'}/ and" in err and f"{tmp_path/'fastai'/'data'}/ and" in err, err
    err = usage_error(['demo', '--root', str(empty), *TINY, '--out', str(tmp_path/'o')], capsys)
    assert f"--root {empty} is the folder of Fashion-MNIST's files, for --data fashion-mnist only" in err, err
    root = fashion_files(tmp_path/'fm')
    err = usage_error(['demo', '--data', 'fashion-mnist', '--root', str(root), *TINY, '--n-train', '8', '--out', str(tmp_path/'o')], capsys)
    assert '--bs 16 is more than the 8 training images of --n-train' in err, err
    assert not (tmp_path/'o').exists() # stopped before anything was written

def test_defaults_follow_the_data(monkeypatch):
    "Options left out take the data's defaults: the digits' for the digits and folders, Fashion-MNIST's for it; an option given wins"
    got = []
    monkeypatch.setattr(demo, 'run_demo', functools.wraps(demo.run_demo)(lambda **kw: got.append(kw))) # its signature: the parser's defaults
    main(['demo'])
    main(['demo', '--data', 'fashion-mnist'])
    main(['demo', '--data', 'fashion-mnist', '--mix', 'none,cutmix', '--epochs', '3', '--n-train', 'all', '--noise', '0.2', '--size', '32'])
    main(['demo', '--data', 'some/folder'])
    digits = dict(mix=DEFAULT_MIX, epochs=50, bs=32, size=16, lr=0.01, noise=0.4, n_train=200)
    eq_({k: got[0][k] for k in digits}, digits)
    eq_({k: got[1][k] for k in FASHION_MNIST_DEMO}, FASHION_MNIST_DEMO)
    eq_(FASHION_MNIST_DEMO, dict(mix=('none', 'mixup', 'cutmix', 'resizemix', 'fmix'), epochs=30, bs=64, size=28, lr=0.01, noise=0., n_train=4000, seeds=3))
    eq_({k: got[2][k] for k in ('mix', 'epochs', 'n_train', 'noise', 'size', 'bs')}, dict(mix=('none', 'cutmix'), epochs=3, n_train=None, noise=.2, size=32, bs=64))
    eq_((got[3]['data'], got[3]['epochs']), (Path('some/folder'), 50))

def test_digits_demo_has_calibration(tmp_path, capsys):
    "The digits demo measures calibration too: ECE per run and per epoch, its paired difference in the table, calibration.png"
    out = tmp_path/'out'
    main(['demo', '--epochs', '1', '--seeds', '2', '--n-train', '64', '--mix', 'none,cutmix', '--jobs', '1', '--out', str(out)])
    printed = capsys.readouterr().out
    res = json.loads((out/'results.json').read_text())
    check_calibration(res, 359)
    assert ECE_HEAD in (out/'results.md').read_text() and ECE_HEAD in printed
    eq_(sum(', ECE ' in l for l in printed.splitlines()), 4)
    eq_(Image.open(out/'calibration.png').format, 'PNG')

def test_paired_ece_by_hand():
    eces = dict(none=[.10, .12, .08], mixup=[.03, .04, .02], cutmix=[.09, .13, .05])
    runs = [dict(mixer=m, seed=s, accuracy=.8, memorised=None, ece=e) for m, v in eces.items() for s, e in zip((4, 5, 6), v)]
    none, mixup, cutmix = paired_summary(runs)
    close_((none['ece'], none['ece_std']), (.10, .02))
    close_(mixup['ece_diffs'], [-.07, -.08, -.06]); close_(mixup['ece_diff'], -.07); close_(mixup['ece_diff_std'], .01)
    half = 4.302653 * .01 / math.sqrt(3)
    close_((mixup['ece_diff_lo'], mixup['ece_diff_hi']), (-.07 - half, -.07 + half), eps=1e-6)
    eq_((mixup['calibration'], cutmix['calibration']), ('better calibrated', 'within the noise'))
    worse = paired_summary([dict(r, ece=r['ece'] + .05 if r['mixer'] == 'mixup' else r['ece']) for r in runs if r['mixer'] != 'cutmix'])[1]
    eq_(paired_summary([dict(mixer=m, seed=0, accuracy=.8, memorised=None, ece=.1) for m in ('none', 'mixup')])[1]['calibration'], 'one seed: no spread to compare with')
    table = results_table([none, mixup, cutmix])
    assert '| 3.0 ± 1.0 | -7.0 ± 1.0 | -9.5 to -4.5 | better calibrated |' in table, table
    assert '| 10.0 ± 2.0 |  |  |  |' in table, table

@pytest.mark.skipif(not idx_files(D.DEBIAN_FASHION_MNIST), reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_demo(tmp_path, capsys):
    "The demo on the real files of Debian's package, found without --root: a short run, tested on all 10,000 test images"
    out = tmp_path/'out'
    main(['demo', '--data', 'fashion-mnist', '--epochs', '1', '--seeds', '1', '--n-train', '256', '--mix', 'none,mixup', '--jobs', '1', '--out', str(out)])
    capsys.readouterr()
    res = json.loads((out/'results.json').read_text())
    eq_((res['settings']['n_valid_images'], res['settings']['images']), (10000, str(D.DEBIAN_FASHION_MNIST)))
    for r in res['runs']: eq_(sum(r['calibration']['count']), 10000); assert r['accuracy'] > .3 # far above chance (10%) after one epoch

def test_fashion_classes_subset(tmp_path, capsys):
    "Issue 31: --classes upper trains and tests on the four upper-body garments only, named in the settings; with --arch vit7 and "
    "transmix-attn (TransMix with area_weight=0) each epoch records the class token's attention entropy"
    root, out = fashion_files(tmp_path/'fm', n=(80, 40)), tmp_path/'out'
    main(['demo', '--data', 'fashion-mnist', '--root', str(root), *TINY, '--classes', 'upper', '--arch', 'vit7',
          '--mix', 'none,transmix,transmix-attn', '--out', str(out)])
    capsys.readouterr()
    res = json.loads((out/'results.json').read_text())
    s = res['settings']
    eq_((s['classes'], s['n_train_images'], s['n_valid_images'], s['arch']), (['T-shirt/top', 'Pullover', 'Coat', 'Shirt'], 32, 16, 'vit7'))
    eq_([r['mixer'] for r in res['runs']], ['none', 'transmix', 'transmix-attn'] * 2)
    for r in res['runs']: assert all(0 < h['attn_entropy'] <= 1 for h in r['history']), r['history']
    tr, va = demo.fashion_datasets(D.find_fashion_mnist(root, download=False), seed=0, classes=(6, 0))
    eq_((tr.vocab, sorted(set(va.y.tolist())), len(va)), (('Shirt', 'T-shirt/top'), [0, 1], 8)) # in the order given
    eq_(demo.make_mixer('transmix-attn').area_weight, 0.)

def test_fashion_classes_usage_errors(tmp_path, capsys):
    "--classes: bad lists and --classes without --data fashion-mnist are usage errors, before anything is written"
    root = fashion_files(tmp_path/'fm')
    for bad in ('3', '1,1', '0,10', 'shirts'):
        err = usage_error(['demo', '--data', 'fashion-mnist', '--root', str(root), *TINY, '--classes', bad, '--out', str(tmp_path/'o')], capsys)
        assert f"argument --classes: expected upper, or at least two distinct class indices 0-9 separated by commas, got '{bad}'" in err, err
    err = usage_error(['demo', *TINY, '--classes', 'upper', '--out', str(tmp_path/'o')], capsys)
    assert '--classes 0,2,4,6 picks Fashion-MNIST\'s classes, for --data fashion-mnist only' in err, err
    assert not (tmp_path/'o').exists()
