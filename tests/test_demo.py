"The `fastai-mix demo` command end to end: the digits, `--data` folders, label noise, the written results"
import json, math, subprocess, sys
import numpy as np, pytest, torch
from pathlib import Path
from PIL import Image
from fastcore.test import test_eq as eq_
from fastai.data.transforms import get_image_files, parent_label
from fastai.torch_core import defaults
from fastai_mix.demo import main, run_demo, train_mixer, write_digits, stage_folder, noisy_labels, true_label, MIXERS

NUMS = ('train_loss', 'valid_loss', 'accuracy', 'sec_per_epoch')

def read_results(out:Path, n:int) -> dict:
    "Check the three files the demo writes into `out` for `n` runs, and return results.json"
    res = json.loads((out/'results.json').read_text())
    eq_(len(res['results']), n)
    for r in res['results']:
        assert r['mixer'] in MIXERS
        assert all(math.isfinite(r[k]) for k in NUMS), r
        assert 0 <= r['accuracy'] <= 1 and r['sec_per_epoch'] > 0
        assert r['history'] and all(math.isfinite(v) for h in r['history'] for v in h.values())
    rows = [l for l in (out/'results.md').read_text().splitlines() if l.startswith('| ') and not l.startswith('| mixer')]
    eq_([l.split('|')[1].strip() for l in rows], [r['mixer'] for r in res['results']])
    for l in rows: assert all(math.isfinite(float(c)) for c in l.strip('| ').split('|')[1:])
    mixers = [r['mixer'] for r in res['results'] if r['mixer'] != 'none']
    eq_(sorted(o.name for o in out.glob('batch_*.png')), sorted(f'batch_{m}.png' for m in mixers)) # one mixed batch per mixer
    for f in ['curves.png', *(f'batch_{m}.png' for m in mixers)]:
        with Image.open(out/f) as im:
            eq_(im.format, 'PNG'); im.load()
            assert im.size[0] > 100 and im.size[1] > 100 and np.asarray(im).std() > 0, f # drawn, not blank
    return res

def random_images(path:Path, classes=('cat', 'dog', 'emu'), n:int=8, seed:int=0) -> Path:
    "A folder of one sub-folder of `n` random RGB PNGs (of varied sizes) per class"
    rng = np.random.default_rng(seed)
    for c in classes:
        (path/c).mkdir(parents=True)
        for i in range(n):
            h, w = rng.integers(10, 30, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path/c/f'{c}{i}.png')
    return path

def test_demo_end_to_end(tmp_path):
    main(['demo', '--epochs', '1', '--n-train', '200', '--size', '16', '--out', str(tmp_path)])
    res = read_results(tmp_path, 4)
    eq_([r['mixer'] for r in res['results']], ['none', 'mixup', 'cutmix', 'resizemix'])
    s = res['settings']
    eq_((s['epochs'], s['n_train'], s['size'], s['bs'], s['arch'], s['noise'], s['seed']), (1, 200, 16, 64, 'small', 0., 42))
    eq_(len(get_image_files(tmp_path/'digits'/'train')), 200)
    eq_(len(get_image_files(tmp_path/'digits'/'valid')), 359)
    for r in res['results']: eq_(len(r['history']), 1)

def test_same_seed_same_run(tmp_path):
    "Every run starts from the same seed: the same mixer twice gives the same numbers"
    path = write_digits(tmp_path/'digits', n_train=128)
    runs = [train_mixer(path, 'mixup', epochs=1, size=16, bs=32) for _ in range(2)]
    eq_(runs[0]['history'], runs[1]['history'])

def test_batch_picture_changes_nothing(tmp_path):
    "Drawing the mixed batch before training leaves the run as it would be without it"
    path = write_digits(tmp_path/'digits', n_train=128)
    runs = [train_mixer(path, 'cutmix', epochs=1, size=16, bs=32, show=show) for show in (tmp_path/'b.png', None)]
    eq_(runs[0]['history'], runs[1]['history'])
    assert (tmp_path/'b.png').stat().st_size > 1000

def test_python_m(tmp_path):
    "`python -m fastai_mix` is the `fastai-mix` command"
    r = subprocess.run([sys.executable, '-m', 'fastai_mix', 'demo', '--help'], capture_output=True, text=True)
    eq_(r.returncode, 0); assert '--mix NAMES' in r.stdout and 'batch_<mixer>.png' in r.stdout
    r = subprocess.run([sys.executable, '-m', 'fastai_mix', 'demo', '--mix', 'none,mixup', '--epochs', '1', '--n-train', '64',
                        '--size', '16', '--bs', '32', '--out', str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '| mixup |' in r.stdout
    read_results(tmp_path, 2)

@pytest.mark.parametrize('split', [False, True])
def test_data_folder(tmp_path, split):
    src = tmp_path/'src'
    if split: random_images(src/'train', n=8); random_images(src/'valid', n=3, seed=1)
    else: random_images(src, n=10)
    before = sorted(get_image_files(src))
    out = tmp_path/'out'
    main(['demo', '--data', str(src), '--mix', 'none,cutmix', '--epochs', '1', '--bs', '8', '--size', '16', '--out', str(out)])
    res = read_results(out, 2)
    eq_(res['settings']['data'], str(src)); eq_(res['settings']['images'], str(src)) # read in place
    assert not (out/'digits').exists() and not (out/'data').exists()
    eq_(sorted(get_image_files(src)), before)

@pytest.mark.parametrize('split', [False, True])
def test_data_folder_subset_and_noise(tmp_path, split):
    "With --n-train or --noise, a --data folder is linked under --out with the changed labels, and left as it was"
    src = tmp_path/'src'
    if split: random_images(src/'train', n=8); random_images(src/'valid', n=2, seed=1)
    else: random_images(src, n=10)
    before = sorted(get_image_files(src))
    out = tmp_path/'out'
    main(['demo', '--data', str(src), '--mix', 'resizemix', '--epochs', '1', '--bs', '4', '--size', '16',
          '--n-train', '12', '--noise', '0.5', '--out', str(out)])
    eq_(read_results(out, 1)['settings']['images'], str(out/'data'))
    tr = get_image_files(out/'data'/'train')
    eq_(len(tr), 12); eq_(sum(parent_label(f) != true_label(f) for f in tr), 6)
    va = get_image_files(out/'data'/'valid')
    eq_(len(va), 6); eq_(sum(parent_label(f) != true_label(f) for f in va), 0)
    eq_(sorted(get_image_files(src)), before) # the original is not touched
    for f in tr: eq_(np.asarray(Image.open(f)).shape[2], 3) # the links open as the images

@pytest.mark.parametrize('noise', [0., 0.1, 0.3, 0.5, 1.])
def test_noise_digits(tmp_path, noise):
    "The share of changed training labels is `noise`, up to the rounding of one label; validation stays clean"
    p = write_digits(tmp_path/'digits', noise=noise, seed=3)
    tr, va = get_image_files(p/'train'), get_image_files(p/'valid')
    changed = np.mean([parent_label(f) != true_label(f) for f in tr])
    assert abs(changed - noise) <= 1 / len(tr), (changed, noise)
    assert all(parent_label(f) == true_label(f) for f in va)
    if noise == 0: eq_(sorted(f.name for f in tr), sorted(f.name for f in get_image_files(write_digits(tmp_path/'d2', seed=3)/'train')))

def test_noisy_labels_properties():
    y = np.random.default_rng(0).integers(0, 10, 5000)
    for seed in range(5):
        for noise in (0.05, 0.2, 0.8):
            yn = noisy_labels(y, noise, 10, seed=seed)
            eq_(int((yn != y).sum()), round(noise * len(y)))
            assert yn.min() >= 0 and yn.max() < 10
    yn = noisy_labels(y, 1., 10)
    assert (yn != y).all()
    shift = (yn - y) % 10 # the new class is uniform among the 9 others
    counts = np.bincount(shift, minlength=10)
    eq_(counts[0], 0); assert counts[1:].min() > 0.8 * len(y) / 9 and counts[1:].max() < 1.2 * len(y) / 9
    eq_(y, np.random.default_rng(0).integers(0, 10, 5000)) # the input is not changed

def test_cli_errors(tmp_path, capsys):
    for argv, msg in [(['demo', '--data', str(tmp_path/'nowhere')], 'is not a folder'),
                      (['demo', '--mix', 'mixup,cutout'], 'unknown mixer(s)'),
                      (['demo', '--noise', '-0.1'], 'noise must be a number in [0, 1]'),
                      (['demo', '--n-train', '0'], 'expected a positive integer'),
                      ([], 'required')]:
        with pytest.raises(SystemExit) as e: main(argv)
        eq_(e.value.code, 2)
        assert msg in capsys.readouterr().err, argv
    src = random_images(tmp_path/'src', n=5) # 12 training images, fewer than a batch
    with pytest.raises(SystemExit): main(['demo', '--data', str(src), '--mix', 'none', '--out', str(tmp_path/'o')])
    assert 'give a smaller --bs' in capsys.readouterr().err
    (tmp_path/'mine'/'digits').mkdir(parents=True); (tmp_path/'mine'/'digits'/'keep.txt').write_text('x')
    with pytest.raises(SystemExit): main(['demo', '--out', str(tmp_path/'mine')])
    assert 'was not written by the demo' in capsys.readouterr().err
    assert (tmp_path/'mine'/'digits'/'keep.txt').exists()

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_demo_on_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(defaults, 'use_cuda', None) # fastai's own choice: the GPU (conftest keeps the other tests on the CPU)
    rows = run_demo(epochs=3, n_train=512, size=32, bs=32, out=tmp_path)
    res = read_results(tmp_path, 4)
    assert res['settings']['device'].startswith('cuda')
    assert rows[0]['accuracy'] > 0.7 and all(r['accuracy'] > 0.3 for r in rows), rows # on the CPU, same seed: .86, .81, .61, .53 (chance: .1)
