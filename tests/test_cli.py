"""The ``natkit`` command: train / resume / torchrun / eval / predict / bench / bad inputs.

Training runs use the built-in digits dataset and the ``nat_micro`` config (seconds per
epoch on 2 CPU cores). One two-epoch run is shared by the tests that need a checkpoint.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

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
