"""The ``natkit`` command: train / resume / torchrun / eval / predict / bench / bad inputs.

Training runs use the built-in digits dataset and the ``nat_micro`` config (seconds per
epoch on 2 CPU cores). One two-epoch run is shared by the tests that need a checkpoint.
"""

import csv
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from natkit.cli import checkpoint as ckpt_io
from natkit.cli import main
from natkit.cli.data import export_digits

SRC = os.path.join(os.path.dirname(__file__), os.pardir, "src")


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.abspath(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _run_group(cmd, env, timeout):
    """subprocess.run that kills the whole process group (torchrun's workers) on timeout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s:\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    """A finished two-epoch nat_micro run on the digits."""
    out = str(tmp_path_factory.mktemp("run2") / "run")
    assert main(["train", "--epochs", "2", "--output", out, "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("digits"))
    export_digits(root)
    return root


def test_help_of_every_command(capsys):
    for cmd in ([], ["train"], ["eval"], ["predict"], ["bench"], ["export-digits"]):
        with pytest.raises(SystemExit) as e:
            main(cmd + ["--help"])
        assert e.value.code == 0
        assert "usage: natkit" in capsys.readouterr().out


def test_train_loss_falls(run2):
    m = _metrics(run2)
    assert [r["epoch"] for r in m] == [1, 2]
    assert m[1]["train_loss"] < m[0]["train_loss"] - 0.1
    assert m[1]["val_loss"] < m[0]["val_loss"] - 0.1
    assert m[1]["val_top1"] > 30.0  # 10 classes: chance is 10%
    ck = torch.load(os.path.join(run2, "last.pt"), weights_only=True)
    assert ck["epoch"] == 2 and ck["model_name"] == "nat_micro"
    assert ck["classes"] == [str(i) for i in range(10)]
    assert os.path.exists(os.path.join(run2, "best.pt"))
    assert not [f for f in os.listdir(run2) if f.startswith(".tmp")]


def test_kill_mid_epoch_and_resume_matches_uninterrupted(run2, tmp_path):
    out = str(tmp_path / "killed")
    steps_per_epoch = 1438 // 64
    r = subprocess.run([sys.executable, "-m", "natkit", "train", "--epochs", "2", "--output",
                        out, "--no-progress"], capture_output=True, text=True,
                       env=_env(NATKIT_TEST_KILL_AT_STEP=str(steps_per_epoch + 7)))
    assert r.returncode == -9, r.stderr  # SIGKILL in the middle of epoch 2
    killed = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert killed["epoch"] == 1
    assert main(["train", "--resume", os.path.join(out, "last.pt"), "--no-progress"]) == 0
    a = torch.load(os.path.join(run2, "last.pt"), weights_only=True)
    b = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert b["epoch"] == 2
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-5, atol=1e-6)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in sa:
        torch.testing.assert_close(sb[i]["exp_avg_sq"], sa[i]["exp_avg_sq"], rtol=1e-4,
                                   atol=1e-9)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    torch.testing.assert_close(b["rng"][0]["torch"], a["rng"][0]["torch"])
    ma, mb = _metrics(run2), _metrics(out)
    assert [r["epoch"] for r in mb] == [1, 2]
    assert mb[1]["val_top1"] == pytest.approx(ma[1]["val_top1"], abs=0.3)


def test_resume_moved_run_with_new_settings(run2, tmp_path, monkeypatch, capsys):
    """A resumed run writes where its checkpoint is now (not where it was first written),
    applies a new --lr/--min-lr/--weight-decay, and places the schedule by completed epochs
    (another --batch-size, so other steps per epoch): the cosine ends at the new --min-lr.
    Each epoch writes best.pt and the metrics line before last.pt."""
    before = {f: _digest(os.path.join(run2, f)) for f in ("last.pt", "metrics.jsonl")}
    moved = str(tmp_path / "moved")
    shutil.copytree(run2, moved)
    with open(os.path.join(moved, "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 3, "train_lo')  # torn by a kill while writing
    writes = []
    real_save = ckpt_io.save_atomic

    def save(state, path):
        writes.append((os.path.basename(path), len(_metrics(moved))))
        real_save(state, path)
    monkeypatch.setattr(ckpt_io, "save_atomic", save)
    monkeypatch.chdir(tmp_path)  # the run's saved --output is relative to the old cwd
    assert main(["train", "--resume", moved, "--epochs", "3", "--batch-size", "128",
                 "--lr", "4e-3", "--min-lr", "1e-4", "--weight-decay", "0.1",
                 "--no-progress"]) == 0
    assert {f: _digest(os.path.join(run2, f)) for f in before} == before
    assert not os.path.exists(tmp_path / os.path.basename(run2))
    assert writes[-1] == ("last.pt", 3)  # after best.pt (if any) and the epoch-3 line
    m = _metrics(moved)
    assert [r["epoch"] for r in m] == [1, 2, 3]
    assert m[2]["lr"] == pytest.approx(1e-4, rel=1e-6)  # the end of the new cosine
    ck = torch.load(os.path.join(moved, "last.pt"), weights_only=True)
    assert ck["epoch"] == 3 and ck["args"]["batch_size"] == 128
    decay, no_decay = ck["optimizer"]["param_groups"]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["initial_lr"] == no_decay["initial_lr"] == 4e-3
    assert ck["scheduler"]["last_epoch"] == 3 * (1438 // 128)

    # into a new --output: it starts with the checkpoint's metrics; another run's is refused
    other = str(tmp_path / "other")
    assert main(["train", "--resume", moved, "--epochs", "4", "--output", other, "--lr", "0",
                 "--min-lr", "0", "--no-progress"]) == 0  # no improvement: best.pt copied
    assert [r["epoch"] for r in _metrics(other)] == [1, 2, 3, 4]
    assert [r["epoch"] for r in _metrics(moved)] == [1, 2, 3]
    assert (_digest(os.path.join(other, "best.pt"))[0]
            == _digest(os.path.join(moved, "best.pt"))[0])
    assert main(["train", "--resume", moved, "--epochs", "4", "--output", run2,
                 "--no-progress"]) == 2
    assert {f: _digest(os.path.join(run2, f)) for f in before} == before
    # a checkpoint that is not its folder's last.pt needs a folder of its own
    shutil.copy(os.path.join(moved, "last.pt"), os.path.join(moved, "epoch3.pt"))
    capsys.readouterr()
    _bad(capsys, ["train", "--resume", os.path.join(moved, "epoch3.pt"), "--epochs", "4",
                  "--no-progress"], "is not the last.pt of its folder")


def test_schedule_is_placed_by_epochs():
    """``schedule`` gives the step-wise warmup + cosine of the run's settings after
    ``epochs_done`` epochs, whatever the optimizer state carried."""
    from natkit.cli.train import schedule, warmup_cosine
    cfg = dict(lr=1e-3, min_lr=1e-5, weight_decay=0.2, epochs=10, warmup_epochs=1)
    w = torch.nn.Parameter(torch.zeros(2, 2))
    b = torch.nn.Parameter(torch.zeros(2))
    for steps in (7, 30):
        opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.5},
                                 {"params": [b], "weight_decay": 0.0}], lr=9.0)
        for g in opt.param_groups:
            g["initial_lr"] = 9.0  # as loaded from another run's optimizer state
        sched = schedule(opt, cfg, steps, epochs_done=4)
        factor = warmup_cosine(10 * steps, steps, 1e-2)
        assert sched.last_epoch == 4 * steps
        assert [g["lr"] for g in opt.param_groups] == [1e-3 * factor(4 * steps)] * 2
        assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == 1e-3 * factor(4 * steps + 1)


def test_torchrun_two_processes_gloo(tmp_path):
    out = str(tmp_path / "ddp")
    r = _run_group([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", "-m", "natkit", "train", "--epochs", "1",
                    "--batch-size", "32", "--output", out, "--no-progress"],
                   env=_env(OMP_NUM_THREADS="1"), timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("epoch 1/1:") == 1  # rank 0 logs alone
    assert "2 process(es)" in r.stdout
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2 and ck["epoch"] == 1
    m = _metrics(out)
    assert len(m) == 1 and m[0]["val_top1"] > 10.0


def test_eval_and_predict(run2, digits_folder, tmp_path, capsys):
    res_builtin, res_folder = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    ckpt = os.path.join(run2, "last.pt")
    assert main(["eval", ckpt, "--no-progress", "--json", res_builtin]) == 0
    with open(res_builtin) as f:
        a = json.load(f)
    assert a["count"] == 359
    assert a["top1"] == pytest.approx(_metrics(run2)[-1]["val_top1"], abs=1e-6)
    # the same split exported as PNG files, through the ImageFolder path
    assert main(["eval", ckpt, "--data", digits_folder, "--no-progress", "--workers", "0",
                 "--json", res_folder]) == 0
    with open(res_folder) as f:
        b = json.load(f)
    assert b["count"] == 359 and abs(b["top1"] - a["top1"]) <= 1.0

    # the weights alone, as an official NAT checkpoint is stored: needs --model
    official = str(tmp_path / "official.pth")
    torch.save({"model": torch.load(ckpt, weights_only=True)["model"]}, official)
    res_official = str(tmp_path / "c.json")
    assert main(["eval", official, "--model", "nat_micro", "--data", digits_folder,
                 "--no-progress", "--workers", "0", "--json", res_official]) == 0
    with open(res_official) as f:
        c = json.load(f)
    assert c["count"] == 359 and abs(c["top1"] - a["top1"]) <= 10.0  # bicubic, not bilinear

    best = os.path.join(run2, "best.pt")
    files = [os.path.join(digits_folder, "val", str(c), sorted(os.listdir(
        os.path.join(digits_folder, "val", str(c))))[0]) for c in range(10)]
    pred = str(tmp_path / "p.json")
    capsys.readouterr()
    assert main(["predict", best, *files, "--topk", "3", "--json", pred]) == 0
    printed = capsys.readouterr().out
    with open(pred) as f:
        p = json.load(f)
    assert len(p) == 10 and all(len(r["top"]) == 3 for r in p)
    assert all(r["top"][0]["name"] in [str(i) for i in range(10)] for r in p)
    assert all(0 <= q["prob"] <= 1 for r in p for q in r["top"])
    assert sum(r["top"][0]["name"] == str(c) for c, r in enumerate(p)) >= 3
    assert files[0] in printed
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"digit-{i}" for i in range(10)))
    assert main(["predict", best, files[0], "--classes", str(names), "--topk", "1"]) == 0
    assert "digit-" in capsys.readouterr().out


def test_bench_writes_csv_and_png(tmp_path, capsys):
    out = str(tmp_path / "bench")
    assert main(["bench", "--preset", "tiny", "--rpb", "both", "--reps", "2", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "swin-wsa" in text and "natkit-" in text
    with open(os.path.join(out, "bench.csv")) as f:
        rows = f.read().splitlines()
    assert rows[0].startswith("case,shape,mode,contender")
    assert len(rows) > 6
    with open(os.path.join(out, "bench.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", "--shape", "1x20", "--kernel", "5", "--heads", "2", "--head-dim",
                 "8", "--mode", "fwd", "--reps", "2", "--out", out]) == 0


def test_bench_models_rows_table_and_csv(tmp_path, capsys):
    """``natkit bench --models``: images/s of inference and of a training step per model;
    a timm baseline that cannot be imported is a row that says so, not a crash."""
    out = str(tmp_path / "models")
    assert main(["bench", "--models", "--model-names", "nat_micro", "--img-size", "32",
                 "--reps", "2", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "| nat_micro | 0.1 |" in text and "swin_tiny" in text
    with open(os.path.join(out, "bench_models.csv")) as f:
        rows = list(csv.DictReader(f))
    micro = rows[0]
    assert micro["model"] == "nat_micro"
    assert float(micro["infer_img_s"]) > 0 and float(micro["train_img_s"]) > 0
    swin = rows[1]
    assert swin["infer_img_s"] or swin["note"].startswith("not measured: timm")
    from natkit.bench.models import run_models
    with pytest.raises(ValueError, match="warmup must be >= 1 with compile"):
        run_models(["nat_micro"], "cpu", 2, 32, steps=1, warmup=0, compile=True)


def _bad(capsys, argv, needle):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err, err
    assert "Traceback" not in err
    return err


@pytest.mark.filterwarnings("ignore:checkpoint.*interpolated")
def test_bad_inputs_fail_clearly_and_touch_no_checkpoint(run2, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(run2, run)
    ckpt = os.path.join(run, "last.pt")
    before = {f: _digest(os.path.join(run, f)) for f in os.listdir(run)}

    _bad(capsys, ["train", "--data", str(tmp_path / "missing"), "--output", run],
         "does not exist")
    empty = tmp_path / "empty"
    for split in ("train", "val"):
        (empty / split / "a").mkdir(parents=True)
        (empty / split / "b").mkdir(parents=True)
        shutil.copy(os.path.join(SRC, os.pardir, "tests", "test_cli.py"),
                    empty / split / "a" / "notes.txt")
    _bad(capsys, ["train", "--data", str(empty), "--output", run], "contain no image files")

    broken = tmp_path / "broken"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (broken / split / c).mkdir(parents=True)
            (broken / split / c / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    _bad(capsys, ["predict", ckpt, str(broken / "val" / "a" / "x.png")], "cannot read image")
    _bad(capsys, ["train", "--data", str(broken), "--img-size", "32", "--output",
                  str(tmp_path / "new")], "cannot read image")
    _bad(capsys, ["train", "--data", str(broken), "--workers", "1", "--img-size", "32",
                  "--output", str(tmp_path / "new")], "cannot read image")

    _bad(capsys, ["train", "--model", "no_such_model", "--output", run], "unknown model")
    _bad(capsys, ["eval", ckpt, "--model", "no_such_model"], "is for model 'nat_micro'")
    _bad(capsys, ["train", "--resume", ckpt, "--model", "nat_mini"], "is for model 'nat_micro'")
    _bad(capsys, ["train", "--output", run], "already holds a checkpoint")
    _bad(capsys, ["train", "--resume", os.path.join(run, "best.pt")], "cannot resume")

    corrupt = tmp_path / "corrupt" / "last.pt"
    corrupt.parent.mkdir()
    with open(ckpt, "rb") as f:
        corrupt.write_bytes(f.read()[: os.path.getsize(ckpt) // 2])
    corrupt_before = _digest(str(corrupt))
    _bad(capsys, ["train", "--resume", str(corrupt)], "corrupt")
    _bad(capsys, ["eval", str(corrupt)], "corrupt")
    assert _digest(str(corrupt)) == corrupt_before
    # another model's weights as an official checkpoint
    sd = tmp_path / "other.pth"
    torch.save({"model": {"head.weight": torch.zeros(3, 3)}}, sd)
    _bad(capsys, ["eval", str(sd), "--model", "nat_micro", "--data", "digits"], "")
    _bad(capsys, ["eval", str(sd)], "--model")
    official = tmp_path / "official.pth"
    torch.save({"model": torch.load(ckpt, weights_only=True)["model"]}, official)
    _bad(capsys, ["eval", str(official), "--model", "nat_mini", "--data", str(broken)],
         "does not load into model 'nat_mini'")

    assert {f: _digest(os.path.join(run, f)) for f in os.listdir(run)} == before
    assert not os.path.exists(tmp_path / "new" / "last.pt")


# ----------------------------------------------------------------------------- adversarial inputs

def _png(path, size=8, mode="L", seed=0):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    chans = 1 if mode == "L" else 3
    arr = (torch.rand(size, size, chans, generator=g) * 255).to(torch.uint8).squeeze(-1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr.numpy()).save(path)


@pytest.fixture(scope="module")
def ten_classes(tmp_path_factory):
    """{train,val}/<0..9>/0.png: one 8x8 grayscale image per digit class."""
    root = tmp_path_factory.mktemp("ten")
    for split in ("train", "val"):
        for c in range(10):
            _png(str(root / split / str(c) / "0.png"), seed=c)
    return root


def test_bad_option_values_fail_clearly(run2, ten_classes, tmp_path, capsys):
    best = os.path.join(run2, "best.pt")
    img = str(ten_classes / "val" / "0" / "0.png")
    new = str(tmp_path / "new")
    for i, (argv, needle) in enumerate([
        (["train", "--device", "foo"], "--device 'foo'"),
        (["train", "--device", "meta"], "--device 'meta'"),
        (["train", "--device", "xpu"], "--device 'xpu' is not available on this machine"),
        (["predict", best, img, "--device", "foo"], "--device 'foo'"),
        (["train", "--workers", "-1"], "--workers must be >= 0, got -1"),
        (["train", "--img-size", "0", "--data", str(ten_classes), "--batch-size", "2"],
         "--img-size must be >= 1, got 0"),
        (["train", "--img-size", "5000", "--data", str(ten_classes), "--batch-size", "2"],
         "--img-size must be at most 4096, got 5000"),
        (["train", "--seed", "-1"], "--seed must be in"),
        (["train", "--seed", "9" * 400], "--seed must be in"),
        (["train", "--hflip", "2"], "--hflip must be in [0, 1], got 2.0"),
        (["train", "--hflip", "nan"], "--hflip must be in [0, 1], got nan"),
        (["train", "--lr", "nan"], "--lr must be >= 0, got nan"),
        (["train", "--min-lr", "-1"], "--min-lr must be >= 0, got -1.0"),
        (["train", "--warmup-epochs", "inf"], "--warmup-epochs must be >= 0, got inf"),
        (["train", "--label-smoothing", "2"], "--label-smoothing must be in"),
        (["train", "--drop-path", "-1"], "--drop-path must be in [0, 1)"),
        (["train", "--min-lr", "1"], "--min-lr 1.0 is above the peak --lr"),
        (["eval", best, "--workers", "-1"], "--workers must be >= 0"),
        (["predict", best, img, "--img-size", "64"], "--img-size/--crop-pct apply to official"),
        (["predict", best, str(ten_classes / "missing.png")], "does not exist"),
        (["bench", "--heads", "2", "--out", new], "--heads 2 applies to a custom --shape only"),
        (["bench", "--shape", "1x8", "--batch", "4", "--out", new], "--batch 4 applies to the"),
        (["bench", "--preset", "nat", "--kernel", "5", "--out", new],
         "--kernel 5 applies to a custom --shape only"),
        (["bench", "--shape", "1x8", "--kernel", "3", "--heads", "0", "--out", new],
         "--heads must be >= 1, got 0"),
        (["bench", "--shape", "1x8", "--kernel", "3", "--head-dim", "0", "--out", new],
         "--head-dim must be >= 1, got 0"),
        (["bench", "--shape", "1x8", "--kernel", "3", "--reps", "0", "--out", new],
         "--reps must be >= 1, got 0"),
        (["bench", "--preset", "tiny", "--batch", "0", "--out", new],
         "--batch must be >= 1, got 0"),
        (["bench", "--shape", "", "--reps", "1", "--mode", "fwd", "--out", new],
         "--shape must look like"),
        (["bench", "--shape", "1x8", "--kernel", "3", "--contenders", "nonsense", "--reps",
          "1", "--out", new], "unknown contender(s) ['nonsense']"),
        (["bench", "--compile", "--out", new], "--compile applies to --models only"),
        (["bench", "--models", "--model-names", "no_such_model", "--out", new],
         "unknown model(s) ['no_such_model']"),
        (["bench", "--models", "--model-names", "nat_micro", "--img-size", "0", "--out", new],
         "--img-size must be >= 1, got 0"),
    ]):
        if argv[0] == "train":  # each its own output folder, a short run if it starts
            argv = argv + ["--epochs", "1", "--output", f"{new}{i}"]
        _bad(capsys, argv, needle)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("new")]


def test_official_checkpoint_bad_preprocessing_values(run2, ten_classes, tmp_path, capsys):
    official = str(tmp_path / "official.pth")
    torch.save({"model": torch.load(os.path.join(run2, "best.pt"), weights_only=True)["model"]},
               official)
    base = ["eval", official, "--model", "nat_micro", "--data", str(ten_classes), "--workers",
            "0", "--no-progress"]
    for crop in ("0", "-1", "nan", "5"):  # 5: silently padded the crop with black
        _bad(capsys, base + ["--crop-pct", crop], "--crop-pct must be in (0, 1]")
    img = str(ten_classes / "val" / "1" / "0.png")
    for size in ("0", "-3"):  # 0: silently used the default size
        _bad(capsys, base + ["--img-size", size], f"--img-size must be >= 1, got {size}")
        _bad(capsys, ["predict", official, img, "--model", "nat_micro", "--img-size", size],
             f"--img-size must be >= 1, got {size}")
    _bad(capsys, ["predict", official, img, "--model", "nat_micro", "--crop-pct", "1.5"],
         "--crop-pct must be in (0, 1], got 1.5")
    _bad(capsys, ["predict", os.path.join(run2, "best.pt"), img, "--crop-pct", "0.9"],
         "--img-size/--crop-pct apply to official checkpoints only")
    assert main(base + ["--crop-pct", "1"]) == 0
    # predict takes --crop-pct too (the README lists it with --img-size for both commands)
    out = tmp_path / "p.json"
    for crop in ("1", "0.5"):
        assert main(["predict", official, img, "--model", "nat_micro", "--crop-pct", crop,
                     "--json", str(out)]) == 0
        crop_probs = json.loads(out.read_text())[0]["top"]
        if crop == "1":
            full = crop_probs
    assert full != crop_probs  # a different crop of the image: other probabilities


def test_bad_output_paths_fail_before_the_work(run2, ten_classes, tmp_path, capsys):
    best = os.path.join(run2, "best.pt")
    img = str(ten_classes / "val" / "0" / "0.png")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    _bad(capsys, ["train", "--output", str(a_file)], "is a file, not a folder")
    _bad(capsys, ["train", "--output", str(a_file / "run")], "is not an existing folder")
    _bad(capsys, ["eval", best, "--json", str(folder)], "is a folder, not a file")
    _bad(capsys, ["eval", best, "--json", str(tmp_path / "no" / "r.json")],
         "is not an existing folder")
    _bad(capsys, ["predict", best, img, "--json", str(folder)], "is a folder, not a file")
    ckpt = str(tmp_path / "best.pt")  # --json naming an input overwrote it
    shutil.copy(best, ckpt)
    before = _digest(ckpt)
    _bad(capsys, ["eval", ckpt, "--json", ckpt], "would overwrite the input")
    _bad(capsys, ["predict", ckpt, img, "--json", ckpt], "would overwrite the input")
    assert _digest(ckpt) == before
    _bad(capsys, ["bench", "--shape", "1x8", "--kernel", "3", "--reps", "1", "--out",
                  str(a_file)], "is a file, not a folder")
    _bad(capsys, ["export-digits", str(a_file)], "is a file, not a folder")
    _bad(capsys, ["export-digits", ""], "must not be empty")  # wrote into the cwd
    assert a_file.read_text() == "x" and os.listdir(folder) == []


def test_predict_class_names_file_is_checked(run2, ten_classes, tmp_path, capsys):
    best = os.path.join(run2, "best.pt")
    img = str(ten_classes / "val" / "0" / "0.png")
    names = {"keys.json": '{"a": "x"}', "scalar.json": "5",
             "gap.json": json.dumps({str(i if i < 9 else 10): f"d{i}" for i in range(10)})}
    for name, text in names.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    _bad(capsys, ["predict", best, img, "--classes", str(tmp_path / "keys.json")],
         "must be the class indices 0..0")
    _bad(capsys, ["predict", best, img, "--classes", str(tmp_path / "scalar.json")],
         "must hold a JSON list of names")
    # keys 0..8 and 10: index 9 silently got the name of class 10
    _bad(capsys, ["predict", best, img, "--classes", str(tmp_path / "gap.json")],
         "must be the class indices 0..9")
    _bad(capsys, ["predict", best, img, "--classes", str(tmp_path / "bin.txt")], "UTF-8")
    (tmp_path / "ok.json").write_text(json.dumps({str(i): f"d{i}" for i in range(10)}))
    assert main(["predict", best, img, "--classes", str(tmp_path / "ok.json")]) == 0


def test_damaged_natkit_checkpoints_fail_clearly(run2, tmp_path, capsys):
    ck = torch.load(os.path.join(run2, "best.pt"), weights_only=True)
    tag = str(tmp_path / "tag.pt")
    torch.save({**ck, "natkit_checkpoint": "x"}, tag)
    _bad(capsys, ["eval", tag], "invalid format version 'x'")
    kwargs = str(tmp_path / "kwargs.pt")
    torch.save({**ck, "model_kwargs": {**ck["model_kwargs"], "bogus": 1}}, kwargs)
    _bad(capsys, ["eval", kwargs], "cannot build model 'nat_micro'")
    classes = str(tmp_path / "classes.pt")
    torch.save({**ck, "classes": 7}, classes)
    _bad(capsys, ["eval", classes], "['classes'] have the wrong type")


def test_image_folder_symlink_loop_counts_once(run2, ten_classes, tmp_path):
    loop = tmp_path / "loop"
    shutil.copytree(ten_classes, loop)
    os.symlink(".", loop / "val" / "0" / "again")  # was followed 40 times: 41 copies
    res = str(tmp_path / "r.json")
    assert main(["eval", os.path.join(run2, "best.pt"), "--data", str(loop), "--workers", "0",
                 "--no-progress", "--json", res]) == 0
    with open(res) as f:
        assert json.load(f)["count"] == 10


def test_decompression_bomb_images_fail_clearly(run2, ten_classes, tmp_path, capsys,
                                                monkeypatch):
    best = os.path.join(run2, "best.pt")
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # 8x8 > 2 * 16: a "bomb"
    _bad(capsys, ["predict", best, str(ten_classes / "val" / "0" / "0.png")],
         "decompression bomb")
    _bad(capsys, ["eval", best, "--data", str(ten_classes), "--workers", "0",
                  "--no-progress"], "decompression bomb")
    _bad(capsys, ["train", "--data", str(ten_classes), "--output", str(tmp_path / "new")],
         "decompression bomb")


def test_deterministic_training(run2, tmp_path, monkeypatch):
    """``--deterministic`` trains in PyTorch's deterministic mode (on CPU: the same run as
    without it), is remembered by the run, and the mode is restored afterwards."""
    calls = []
    real = torch.use_deterministic_algorithms
    monkeypatch.setattr(torch, "use_deterministic_algorithms",
                        lambda mode, **kw: calls.append(mode) or real(mode, **kw))
    out = str(tmp_path / "det")
    assert main(["train", "--epochs", "2", "--output", out, "--no-progress",
                 "--deterministic"]) == 0
    assert calls == [True, False] and not torch.are_deterministic_algorithms_enabled()
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["deterministic"] is True

    def results(run):  # every metric but the timings
        return [{k: v for k, v in m.items() if k not in ("img_per_s", "epoch_s")}
                for m in _metrics(run)]
    assert results(out) == results(run2)


def test_huge_warmup_is_all_warmup(tmp_path):
    root = tmp_path / "two"
    for split, n in (("train", 4), ("val", 2)):
        for c in ("a", "b"):
            for i in range(n):
                _png(str(root / split / c / f"{i}.png"), mode="RGB", seed=i)
    out = str(tmp_path / "run")
    assert main(["train", "--data", str(root), "--epochs", "1", "--batch-size", "4",
                 "--workers", "0", "--warmup-epochs", "1e308", "--output", out,
                 "--no-progress"]) == 0
    assert _metrics(out)[0]["epoch"] == 1


def test_compiled_training_matches_eager(tmp_path):
    """``--compile`` trains the same model as eager mode (no randomness inside the model
    here: stochastic depth off), and its checkpoints load into a plain model."""
    root = tmp_path / "two"
    for split, n in (("train", 8), ("val", 4)):
        for c in ("a", "b"):
            for i in range(n):
                _png(str(root / split / c / f"{i}.png"), mode="RGB", seed=i + 10 * n)
    runs = {}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        runs[name] = str(tmp_path / name)
        assert main(["train", "--data", str(root), "--epochs", "2", "--batch-size", "4",
                     "--workers", "0", "--drop-path", "0", "--img-size", "32",
                     "--output", runs[name], "--no-progress"] + extra) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    eager, compiled = _metrics(runs["eager"]), _metrics(runs["compiled"])
    assert len(eager) == len(compiled) == 2
    for a, b in zip(eager, compiled):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    ck = torch.load(os.path.join(runs["compiled"], "last.pt"), weights_only=True)
    assert not [k for k in ck["model"] if "_orig_mod" in k]
    assert main(["eval", os.path.join(runs["compiled"], "best.pt"), "--no-progress"]) == 0
    # resumed, it stays compiled unless told otherwise
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert main(["train", "--resume", runs["compiled"], "--epochs", "3", "--no-compile",
                 "--no-progress"]) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    with open(os.path.join(runs["compiled"], "config.json")) as f:
        assert json.load(f)["compile"] is False


def test_ema_run_best_checkpoint_and_no_ema_resume(tmp_path, capsys):
    """best.pt of an --ema run holds the EMA weights: asking for --ema says so; --no-ema
    turns the EMA off on resume."""
    root = tmp_path / "two"
    for split, n in (("train", 4), ("val", 2)):
        for c in ("a", "b"):
            for i in range(n):
                _png(str(root / split / c / f"{i}.png"), mode="RGB", seed=i + 7)
    out = str(tmp_path / "ema")
    assert main(["train", "--data", str(root), "--epochs", "1", "--batch-size", "4",
                 "--workers", "0", "--ema", "--output", out, "--no-progress"]) == 0
    capsys.readouterr()
    _bad(capsys, ["eval", os.path.join(out, "best.pt"), "--ema", "--no-progress"],
         "holds the EMA weights already")
    assert main(["eval", os.path.join(out, "last.pt"), "--ema", "--no-progress"]) == 0
    assert main(["train", "--resume", out, "--epochs", "2", "--no-ema", "--no-progress"]) == 0
    assert "ema_val_top1" not in _metrics(out)[1]
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["ema"] is None


def test_ema_update_moves_a_small_step():
    from natkit.cli.train import EMA
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, 0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, torch.full((2, 2), 1.2))


def test_warmup_cosine_values():
    from natkit.cli.train import warmup_cosine
    f = warmup_cosine(total_steps=110, warmup_steps=10, min_ratio=0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)   # first step not 0
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(109) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))


def test_label_smoothing_targets():
    from natkit.cli.train import mix_batch
    x = torch.zeros(2, 3, 4, 4)
    _, t = mix_batch(x, torch.tensor([0, 2]), 4, 0.0, 0.0, 0.1)
    torch.testing.assert_close(t, torch.tensor([[0.925, 0.025, 0.025, 0.025],
                                                [0.025, 0.025, 0.925, 0.025]]))
