"""Fault injection (issue 7), the cheap and deterministic part: bad inputs, the states a kill leaves, damaged
checkpoints and shards, pickle bombs, shell-executing URLs, invalid configs. The corpora and their checks are
in fault_corpora.py (sharding) and fault_training.py (training), shared with bench/faults.py, which runs the
many random kill -9 trials (and every scenario through the real CLI).

Covered elsewhere and not repeated: a kill -9 of a real sharding run
(test_shard_run.py::test_resume_after_kill_gives_identical_output), SIGTERM
(test_train.py::test_sigterm_saves_and_exits_cleanly) and an injected NaN skipping its step
(test_train.py::test_non_finite_loss_skips_the_update).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import fault_corpora
import pytest
import torch
from fault_corpora import (
    PWNED,
    build_kill_corpus,
    check_corpus_output,
    leftover_temporaries,
    manifest_hashes_hold,
    output_digest,
)
from fault_training import (
    CONFIG_CASES,
    DAMAGES,
    build_train_shards,
    check_bad_sample_metric,
    check_epoch,
    check_resumed_run,
    check_warnings,
    config_case_files,
    damage_checkpoint,
    damage_shards,
    epoch_keys,
    logged_step,
    make_pickle_bomb,
    run_config_case,
    train_config,
)
from localhost import refusing_port
from processes import REPO, Handshake, kill9

from mmcl.cli import main
from mmcl.config import load_train_config
from mmcl.errors import UsageError
from mmcl.models.weights import read_state_dict
from mmcl.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
)
from mmcl.train.state import TrainState
from mmcl.train.trainer import Trainer, run_training
from shards_tools.config import build_config
from shards_tools.run import run_sharding
from shards_tools.verify import verify_shards

STEPS = 6  # checkpoints at steps 2, 4 and 6


def train(config: Path, *overrides: str):
    """A whole training run in this process (what `mmcl train` runs)."""
    return run_training(load_train_config(config, list(overrides)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """48 images in 4 shards of 12."""
    return build_train_shards(tmp_path_factory.mktemp("fault_shards"), count=48, shard_size=12)


def config_for(tmp: Path, shards: Path | str, run: Path, **sections) -> Path:
    sections.setdefault("train", {}).update({"steps": STEPS, "checkpoint_every": 2})
    return train_config(tmp / f"{run.name}.yaml", shards, run, **sections)


@pytest.fixture(scope="module")
def reference(shards: Path, tmp_path_factory) -> Path:
    """An uninterrupted run: the answer every interrupted one must reproduce bit for bit."""
    tmp = tmp_path_factory.mktemp("fault_reference")
    train(config_for(tmp, shards, tmp / "reference"))
    return tmp / "reference"


def assert_same_run(run: Path, reference: Path) -> None:
    assert check_resumed_run(run, reference, STEPS) == []


# ------------------------------------------------------------------------------------------------ sharding


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the corpus holds bombs on purpose
@pytest.mark.parametrize("builder", ["build_image_corpus", "build_coco_corpus", "build_audio_corpus"])
def test_bad_inputs_are_skipped_with_their_reason_and_no_good_item_is_lost(
    builder: str, tmp_path: Path, no_proxies
) -> None:
    with refusing_port() as port:  # the image corpus' URL that nobody answers
        options = (
            {"unanswered_url": f"http://127.0.0.1:{port}/x.jpg"} if builder == "build_image_corpus" else {}
        )
        corpus = getattr(fault_corpora, builder)(tmp_path / "in", **options)
        out = tmp_path / "out"
        run_sharding(build_config(corpus.shard_fields(out)), progress=False)
    check = check_corpus_output(out, corpus)
    assert check["problems"] == [] and check["lost"] == 0
    assert check["faults"] >= 6 and check["written"] == sum(corpus.good.values())
    assert verify_shards(out).ok
    assert not (corpus.input.parent / PWNED).exists()  # the pipe: row ran nothing


def test_every_state_a_kill_leaves_resumes_to_the_uninterrupted_output(tmp_path: Path) -> None:
    """What a kill -9 can leave at each point of a run, injected by hand; the re-run must end identical.
    (test_shard_run.py kills a real run; bench/faults.py does it at random points, 10 times.)"""
    manifest = build_kill_corpus(tmp_path / "in", 60)

    def shard(out: Path) -> None:
        fields = {
            "input": {"modality": "image", "path": manifest},
            "output": out,
            "shard_size": 10,
            "workers": 1,
        }
        run_sharding(build_config(fields), progress=False)

    shard(tmp_path / "reference")
    expected = output_digest(tmp_path / "reference")
    out = tmp_path / "killed"
    shutil.copytree(tmp_path / "reference", out)
    progress = out / "_progress"
    for name in ("manifest.json", "sizes.json", "_errors.jsonl"):  # killed before the merge
        (out / name).unlink()
    shutil.rmtree(out / "_parts")
    (progress / "shard-000001.tar.json").unlink()  # killed between the tar's rename and its record
    data = (out / "shard-000002.tar").read_bytes()  # a tar that no longer matches its record
    (out / "shard-000002.tar").write_bytes(data[: len(data) // 2])
    (out / "shard-000003.tar").unlink()  # killed while writing shard 3: only its temporary is there
    (progress / "shard-000003.tar.json").unlink()
    (out / ".shard-000003.tar.tmp-4242").write_bytes(data[:1000])
    # a worker's piece of a split shard
    (out / ".shard-000003.tar.tmp-piece00001-4243").write_bytes(data[:700])
    (progress / ".shard-000004.tar.json.tmp-4242").write_text('{"name": "shard-0')
    (progress / "shard-000005.tar.json").write_text('{"name": "shard-000005.tar", "items":')  # torn record
    (out / "_parts").mkdir()
    (out / "_parts" / ".part-00000-of-00001.json.tmp-4242").write_text("{")
    shard(out)
    assert output_digest(out) == expected
    assert manifest_hashes_hold(out) and leftover_temporaries(out) == []


def test_a_part_leaves_the_temporaries_of_other_parts_alone(tmp_path: Path) -> None:
    """In a job array every part shares the output folder: a part starting must not delete (and so crash)
    the shard another part is writing, but must clean what a killed run of its own left."""
    manifest = build_kill_corpus(tmp_path / "in", 20)
    out = tmp_path / "out"
    (out / "_progress").mkdir(parents=True)
    theirs = [out / ".shard-000000.tar.tmp-111", out / "_progress" / ".shard-000000.tar.json.tmp-111"]
    mine = [out / ".shard-000001.tar.tmp-222", out / "_progress" / ".shard-000001.tar.json.tmp-222"]
    for path in theirs + mine:
        path.write_text("partial")
    fields = {"input": {"modality": "image", "path": manifest}, "output": out, "shard_size": 5, "workers": 1,
              "part": (1, 2)}  # fmt: skip
    run_sharding(build_config(fields), progress=False)  # part 1 of 2 writes shards 1 and 3
    assert all(path.exists() for path in theirs) and not any(path.exists() for path in mine)


STUCK_POOL = """
import os, sys, threading
import shards_tools.distribute as distribute
from shards_tools.plan import ShardPlan

def stuck(plan, job):  # a shard that never ends: the kill lands while both workers are busy
    os.write(int(sys.argv[1]), b"%d\\n" % os.getpid())  # tell the test
    threading.Event().wait()  # for ever: a worker that outlived its parent would never end by itself

distribute.write_shard = stuck
list(distribute.run_shard_tasks([ShardPlan(i) for i in range(4)], 4, None, 2, "multiprocessing"))
"""


def test_pool_workers_die_with_a_killed_sharding_process() -> None:
    with Handshake() as handshake:
        proc = subprocess.Popen([sys.executable, "-c", STUCK_POOL, str(handshake.fd)], cwd=REPO,
                                pass_fds=[handshake.fd])  # fmt: skip
        handshake.started()
        workers = [int(pid) for pid in handshake.wait(2)]  # both workers are inside a shard
    assert len(workers) == 2
    orphans = kill9(proc, whole_group=False)  # the main process only, as `kill -9 PID`
    assert orphans == []


def test_outputs_appear_atomically(tmp_path: Path, monkeypatch) -> None:
    """A crash just before a file is published leaves no partial file, and the next run cleans up."""
    manifest = build_kill_corpus(tmp_path / "in", 12)
    fields = {"input": {"modality": "image", "path": manifest}, "output": tmp_path / "out", "shard_size": 5,
              "workers": 1}  # fmt: skip
    real_replace = os.replace

    def crash_before_manifest(src, dst):
        if Path(dst).name == "manifest.json":
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_before_manifest)
    with pytest.raises(KeyboardInterrupt):
        run_sharding(build_config(fields), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()  # no half-written manifest, ever
    monkeypatch.setattr(os, "replace", real_replace)
    run_sharding(build_config(fields), progress=False)
    assert leftover_temporaries(tmp_path / "out") == []
    assert verify_shards(tmp_path / "out").ok

    root = tmp_path / "checkpoints"

    def save(step: int) -> Path:
        return save_checkpoint(
            root,
            model_state={"w": torch.zeros(2)},
            optimizer_state={"state": {}},
            train_state=TrainState(step=step),
            rng=[rng_state()],
            model_config={},
        )

    save(1)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
        with pytest.raises(KeyboardInterrupt):
            save(2)
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001"]  # step 2 never appeared
    assert [p.name for p in root.iterdir() if p.name.startswith(".")]  # its partial write is hidden
    save(3)
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # and removed by the next save


# ------------------------------------------------------------------------------------------------ training


def test_damaged_shards_in_the_stream_are_skipped_warned_and_counted(
    shards: Path, tmp_path: Path, caplog
) -> None:
    facts = damage_shards(shards, tmp_path / "damaged")
    config = config_for(tmp_path, tmp_path / "damaged", tmp_path / "run")
    assert check_epoch(*epoch_keys(config), facts) == []  # every usable good sample, once
    assert check_warnings(caplog.text, facts) == []
    assert train(config).step == STEPS  # 2 loader workers (their warnings go to their stderr, not caplog)
    assert check_bad_sample_metric(tmp_path / "run", facts, None, STEPS) == []


# `mmcl train ARGS` that stops after logging step 3 (after its checkpoint at step 2, before the one at step
# 4), tells the test and waits there for its kill -9: the kill lands at that point however slowly the machine
# runs.
TRAIN_UNTIL_STEP_3 = """
import os, sys, threading
from mmcl.cli import main
from mmcl.train.trainer import Trainer

log = Trainer._log

def log_then_wait_at_step_3(self, *args, **kwargs):
    log(self, *args, **kwargs)
    if self.state.step == 3:  # its metrics.jsonl line is written
        os.write(int(sys.argv[1]), b"step 3 logged\\n")
        threading.Event().wait()

Trainer._log = log_then_wait_at_step_3
sys.exit(main(sys.argv[2:]))
"""


def test_kill_9_mid_training_then_resume_gives_identical_weights(shards, reference, tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = config_for(tmp_path, shards, run)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same arithmetic as in here
    with Handshake() as handshake:
        proc = subprocess.Popen(
            [sys.executable, "-c", TRAIN_UNTIL_STEP_3, str(handshake.fd), "train", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=[handshake.fd],
        )
        handshake.started()
        handshake.wait()
    kill9(proc, whole_group=True)  # the run and its loader workers
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    assert 3 <= logged_step(run) < STEPS  # it logged a step after its last checkpoint (step 2)
    train(config)  # resume, in this process
    assert_same_run(run, reference)


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    damage: str, reference, tmp_path: Path
) -> None:
    root = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", root)
    damage_checkpoint(root / "step-00000006", damage, tmp_path / PWNED)
    warnings: list[str] = []
    checkpoint = latest_checkpoint(root, warn=warnings.append)
    assert checkpoint.path.name == "step-00000004" and checkpoint.train_state.step == 4
    if damage != "no COMPLETE marker":
        assert len(warnings) == 1 and "step-00000006 is damaged" in warnings[0]
    assert not (tmp_path / PWNED).exists()


def test_resume_after_a_damaged_checkpoint_gives_identical_weights(shards, reference, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    damage_checkpoint(run / "checkpoints" / "step-00000006", DAMAGES[1], tmp_path / PWNED)
    train(config_for(tmp_path, shards, run))  # resumes at step 4, redoes 5 and 6
    assert_same_run(run, reference)


# ------------------------------------------------------------------------------------------------ loading


def test_a_pickle_bomb_is_refused_and_never_runs(shards, reference, tmp_path: Path) -> None:
    marker = tmp_path / PWNED
    bomb = make_pickle_bomb(tmp_path / "bomb.pt", marker)
    torch.load(bomb, weights_only=False)  # the bomb is live: unpickled the unsafe way it runs
    assert marker.exists()
    marker.unlink()

    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000006"
    shutil.copytree(reference / "checkpoints" / "step-00000006", checkpoint)
    shutil.copy(bomb, checkpoint / "optimizer.pt")
    with pytest.raises(Exception, match="weights_only"):
        load_checkpoint(checkpoint)
    warnings: list[str] = []
    assert latest_checkpoint(checkpoint.parent, warn=warnings.append) is None and "damaged" in warnings[0]
    with pytest.raises(UsageError, match=r"cannot read weights .*refused by torch.load\(weights_only=True\)"):
        read_state_dict(bomb)  # model.pretrained / text_pretrained files
    config = config_for(tmp_path, shards, tmp_path / "other", train={"resume": str(checkpoint)})
    with pytest.raises(UsageError, match="train.resume"):
        Trainer(load_train_config(config))._find_checkpoint()
    assert not marker.exists()


def test_pipe_urls_run_nothing_unless_allowed(shards: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    config = config_for(tmp_path, shards, tmp_path / "run")
    marker = tmp_path / PWNED
    pipe = f"data.sources=[{{urls: 'pipe:touch {marker}'}}]"
    assert main(["train", "--config", str(config), "--check", pipe]) == 2
    assert "data.allow_pipe" in capsys.readouterr().err
    assert (
        main(["train", "--config", str(config), "--check", pipe, "data.allow_pipe=true", "data.workers=1"])
        == 0
    )
    assert not marker.exists()
    # a shard *file* named like a pipe: URL, found by listing the folder "." is read as a file
    folder = tmp_path / "cwd"
    folder.mkdir()
    for i, tar in enumerate(sorted(shards.glob("*.tar"))):
        shutil.copy(tar, folder / (f"pipe:touch {PWNED}.tar" if i == 0 else tar.name))
    monkeypatch.chdir(folder)
    keys, boundary, bad = epoch_keys(config_for(tmp_path, ".", tmp_path / "dot"))
    assert not (folder / f"{PWNED}.tar").exists()
    assert len(set(keys) | boundary) == 48 and not bad


# ------------------------------------------------------------------------------------------------ config


@pytest.fixture(scope="module")
def config_cases(shards: Path, tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("config_cases")
    base = train_config(root / "base.yaml", shards, root / "run", train={"steps": 4})
    return base, root, config_case_files(root, shards)


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[case[0] for case in CONFIG_CASES])
def test_an_invalid_config_exits_2_with_one_clear_message(case, config_cases) -> None:
    base, root, files = config_cases
    result = run_config_case(case, base, root, files, main)
    assert result["ok"], result
    assert not result["pwned"]


def test_check_refuses_what_the_run_would_refuse(shards: Path, tmp_path: Path, capsys) -> None:
    """`mmcl train --check` finds too few shards for processes x workers and a bad resume folder, as the run
    would, but before any model is built."""
    config = config_for(tmp_path, shards, tmp_path / "run")
    assert main(["train", "--config", str(config), "--check", "data.workers=5"]) == 2  # 4 shards, 5 readers
    assert "5 readers" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--check", f"train.resume={tmp_path}"]) == 2
    assert "has no COMPLETE marker" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--check"]) == 0
