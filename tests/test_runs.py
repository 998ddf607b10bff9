"""Runs that survive: fault injection (kill -9, SIGTERM, SIGUSR1 under a faked SLURM, NaN, truncated
checkpoint), resuming exactly, resume rules, run folders, one-time work on rank 0, `rdm slurm`.

Each faulted run is a real `rdm fit` subprocess that a ``faults.FaultAt`` callback breaks at a chosen
iteration; its resume must end bit for bit where the uninterrupted run ends (counters, generator,
EMA, fake score, logged values) and lose at most one checkpoint interval.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from rdm_lightning.cli import main
from rdm_lightning.data.samplers import EpochShuffleSampler, ResumableDataLoader
from rdm_lightning.loggers import RunCSVLogger
from rdm_lightning import runs
from rdm_lightning.slurm import sbatch_script

TESTS = Path(__file__).resolve().parent
BUDGET = 8          # generator updates; TTUR 2 → 15 iterations, 11 batches an epoch: the run crosses an epoch
INTERVAL = 2        # RunCheckpoint.every_n_updates
FAKE_SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "rdm", "SLURM_PROCID": "0",
              "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


def fit_config(root: Path, teacher: Path, fault: tuple[int, str] | None = None, **model) -> Path:
    callbacks = [
        {"class_path": "rdm_lightning.callbacks.GeneratorEMA", "init_args": {"decay": 0.5}},
        {"class_path": "rdm_lightning.callbacks.DigitsEvaluation",
         "init_args": {"every_n_updates": 4, "num_samples": 10, "evaluate_teacher": False}},
        {"class_path": "rdm_lightning.callbacks.RunCheckpoint", "init_args": {"every_n_updates": INTERVAL}},
    ]
    if fault is not None:
        callbacks.append({"class_path": "faults.FaultAt", "init_args": {"iteration": fault[0], "fault": fault[1]}})
    config = {
        "seed_everything": 0,
        "trainer": {
            "logger": {"class_path": "rdm_lightning.loggers.RunCSVLogger", "init_args": {"save_dir": str(root), "name": "run"}},
            "max_epochs": -1, "limit_val_batches": 0, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False, "callbacks": callbacks,
        },
        "model": {"class_path": "rdm_lightning.methods.DMD", "init_args": {
            "backbone": {"class_path": "rdm_lightning.backbones.DigitsBackbone", "init_args": {"path": str(teacher)}},
            "max_generator_updates": BUDGET, "dmd": {"generator_update_ratio": 2}, "student": {"num_steps": 2},
            "teacher_sampling": {"num_steps": 2}, **model}},
        "data": {"class_path": "rdm_lightning.data.DigitsDataModule", "init_args": {"batch_size": 128}},
    }
    path = root / ("config.yaml" if fault is None else f"config_{fault[1]}.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def rdm_fit(config: Path, *args: str, cache: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``rdm fit`` in a subprocess; ``cache`` holds the evaluation classifier (the ``digits_classifier`` fixture's)."""
    environment = {**os.environ, "RDM_CACHE": str(cache), "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                   "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "rdm_lightning", "fit", "--config", str(config), *args],
                          capture_output=True, text=True, env=environment, timeout=300)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def logged_values(run: Path) -> dict[tuple[str, str], str]:
    """Every logged value by (step, name), wall-clock timings aside."""
    return {(row["step"], key): value for row in csv.DictReader(open(run / "metrics.csv"))
            for key, value in row.items() if value and "seconds" not in key}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_digits_teacher, rdm_cache, digits_classifier) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    result = rdm_fit(fit_config(root, tiny_digits_teacher), cache=rdm_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run" / "version_0"


def assert_same_run(resumed: Path, reference: Path) -> None:
    ours, theirs = load(resumed / "checkpoints" / "last.ckpt"), load(reference / "checkpoints" / "last.ckpt")
    assert ours["rdm"]["role_updates"] == theirs["rdm"]["role_updates"] == {"generator": BUDGET, "fake_score": 2 * BUDGET - 1}
    assert ours["rdm"]["iterations"] == theirs["rdm"]["iterations"]
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    assert any(k.startswith("generator_ema.") for k in ours["state_dict"])
    for key, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][key], value), key
    reference_rows = list(csv.DictReader(open(reference / "metrics.csv")))
    resumed_rows = list(csv.DictReader(open(resumed / "metrics.csv")))
    assert [r["step"] for r in resumed_rows] == [r["step"] for r in reference_rows]  # one series, no step twice
    reference_values = logged_values(reference)
    for key, value in logged_values(resumed).items():
        assert reference_values[key] == value, key


def updates_before(iteration: int) -> int:
    """Generator updates done before ``iteration`` starts: TTUR 2 updates at iterations 0, 2, 4, …"""
    return (iteration + 1) // 2


@pytest.mark.parametrize(
    "iteration, fault, env, status, saved_updates",
    [
        # After the checkpoint at update 6, which is the last batch of epoch 0: one interval at most is lost.
        (13, "sigkill", {}, -9, 6),
        # A stop signal mid-iteration: checkpoint at the end of that iteration (a generator one: 7).
        (12, "sigterm", {}, 143, updates_before(12) + 1),
        # SLURM's warning before the time limit: checkpoint, requeue, stop.
        (5, "sigusr1", FAKE_SLURM, 138, updates_before(5)),
        # A non-finite loss before any step of iteration 9: the state before it.
        (9, "nan", {}, 1, updates_before(9)),
    ],
)
def test_a_broken_run_resumes_bit_for_bit(
    tmp_path, tiny_digits_teacher, rdm_cache, uninterrupted, iteration, fault, env, status, saved_updates
):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.calls'}\n")
    (fake_bin / "scontrol").chmod(0o755)
    env = {**env, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    first = rdm_fit(fit_config(tmp_path, tiny_digits_teacher, (iteration, fault)), cache=rdm_cache, env=env)
    assert first.returncode == status, first.stderr[-3000:]
    run = tmp_path / "run" / ("job_4242" if fault == "sigusr1" else "version_0")
    saved = load(run / "checkpoints" / "last.ckpt")
    assert saved["rdm"]["role_updates"]["generator"] == saved_updates
    assert updates_before(iteration) - saved_updates < INTERVAL
    if fault != "sigkill":  # the evaluations made so far are kept, and why the run stopped
        report = json.loads((run / "metrics.json").read_text())
        assert [entry["generator_updates"] for entry in report["history"]] == [4] * (saved_updates >= 4)
        assert ("FloatingPointError" if fault == "nan" else f"stopped by {fault.upper()}") in report["stopped"]
    if fault == "sigusr1":
        assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]
        assert not list(Path.cwd().glob("hpc_ckpt_*.ckpt"))
        second = rdm_fit(fit_config(tmp_path, tiny_digits_teacher), cache=rdm_cache, env=env)  # the requeue: same id
        assert "resuming SLURM job job_4242" in second.stdout
    else:
        second = rdm_fit(fit_config(tmp_path, tiny_digits_teacher), "--ckpt_path", "last", cache=rdm_cache, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [run.name]  # the same run folder
    assert_same_run(run, uninterrupted)


def test_a_truncated_checkpoint_is_named_and_the_previous_one_survives_a_kill_mid_write(
    tmp_path, tiny_digits_teacher, rdm_cache, uninterrupted
):
    broken = tmp_path / "last.ckpt"
    broken.write_bytes((uninterrupted / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    result = rdm_fit(fit_config(tmp_path, tiny_digits_teacher), "--ckpt_path", str(broken), cache=rdm_cache)
    assert result.returncode == 2
    assert str(broken) in result.stderr and "Traceback" not in result.stderr
    # A write goes to last.ckpt.partial and is renamed: a kill during it leaves last.ckpt whole.
    assert not list((uninterrupted / "checkpoints").glob("*.partial"))


# ---- resume rules (in process) --------------------------------------------------------------------
@pytest.fixture
def digits_cache(rdm_cache, digits_classifier, monkeypatch) -> None:
    """In-process fits evaluate with the session's cached classifier."""
    monkeypatch.setenv("RDM_CACHE", str(rdm_cache))


def fit_in_process(config: Path, *args: str) -> None:
    main(["fit", "--config", str(config), *args])


def test_resume_extends_the_budget_and_rejects_other_model_changes(tmp_path, tiny_digits_teacher, digits_cache, capsys):
    config = fit_config(tmp_path, tiny_digits_teacher, max_generator_updates=2)
    fit_in_process(config)
    run = tmp_path / "run" / "version_0"
    fit_in_process(config, "--ckpt_path", "last", "--model.init_args.max_generator_updates=3")
    extended = load(run / "checkpoints" / "last.ckpt")
    assert extended["rdm"]["role_updates"]["generator"] == 3
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["version_0"]
    # The final checkpoint is taken at the last iteration's end, so training on equals never having stopped.
    (tmp_path / "straight").mkdir()
    fit_in_process(fit_config(tmp_path / "straight", tiny_digits_teacher, max_generator_updates=3))
    straight = load(tmp_path / "straight" / "run" / "version_0" / "checkpoints" / "last.ckpt")
    assert all(torch.equal(extended["state_dict"][k], v) for k, v in straight["state_dict"].items())
    with pytest.raises(SystemExit) as stop:
        fit_in_process(config, "--ckpt_path", "last", "--model.init_args.dmd.guidance_scale=3.0")
    assert stop.value.code == 2
    message = capsys.readouterr().err
    assert "model.init_args.dmd.guidance_scale: checkpoint 1.75, config 3.0" in message
    assert "max_generator_updates" in message and "Traceback" not in message


def test_ckpt_path_last_without_a_run_names_the_folder_searched(tmp_path, tiny_digits_teacher, digits_cache, capsys):
    with pytest.raises(SystemExit):
        fit_in_process(fit_config(tmp_path, tiny_digits_teacher), "--ckpt_path", "last")
    assert f"{tmp_path / 'run'}/*/checkpoints/last.ckpt" in capsys.readouterr().err


def test_a_new_slurm_job_never_resumes_another_jobs_checkpoint(tmp_path, tiny_digits_teacher, digits_cache, monkeypatch):
    config = fit_config(tmp_path, tiny_digits_teacher, max_generator_updates=2)
    for name, value in FAKE_SLURM.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    fit_in_process(config)
    # A stale Lightning hpc checkpoint in the working directory is not picked up either.
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes((tmp_path / "run" / "job_4242" / "checkpoints" / "last.ckpt").read_bytes())
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    fit_in_process(config, "--model.init_args.max_generator_updates=1")
    first, second = (load(tmp_path / "run" / f"job_{j}" / "checkpoints" / "last.ckpt") for j in (4242, 4243))
    assert first["rdm"]["role_updates"]["generator"] == 2
    assert second["rdm"]["role_updates"]["generator"] == 1  # trained from scratch, in its own folder


# ---- parts ----------------------------------------------------------------------------------------
def fake_trainer(epoch: int, processed: int) -> SimpleNamespace:
    progress = SimpleNamespace(current=SimpleNamespace(processed=processed))
    return SimpleNamespace(current_epoch=epoch, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


def epoch_batches(loader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [batch.tolist() for batch in loader]


@pytest.mark.parametrize("batches", [0, 3, 9])
def test_resumable_loader_continues_the_epoch_after_the_consumed_batches(batches):
    def loader(trainer=None):
        return ResumableDataLoader(list(range(40)), batch_size=4, sampler=EpochShuffleSampler(40, seed=7), drop_last=True, trainer=trainer)

    reference = epoch_batches(loader(), 2)
    saved = loader(fake_trainer(epoch=2, processed=batches)).state_dict()
    assert saved == {"epoch": 2, "batches": batches}
    resumed = loader()
    resumed.load_state_dict(saved)
    assert len(resumed) == 10  # Lightning counts the skipped batches as fetched
    assert [b.tolist() for b in resumed] == reference[batches:]
    assert [b.tolist() for b in resumed] == epoch_batches(loader(), 2)  # later epochs are whole
    assert loader().state_dict() == {}
    # After the epoch's last batch Lightning resumes at the next epoch's start.
    assert loader(fake_trainer(epoch=2, processed=10)).state_dict() == {"epoch": 3, "batches": 0}


def test_run_csv_logger_keeps_rows_up_to_the_resume_step_and_appends(tmp_path):
    logger = RunCSVLogger(str(tmp_path), name="run", version=0)
    for step in range(5):
        logger.log_metrics({"loss": float(step)}, step=step)
    logger.save()
    resumed = RunCSVLogger(str(tmp_path), name="run", version=0, resume_step=2)
    resumed.log_metrics({"loss": 30.0, "new": 1.0}, step=3)
    resumed.save()
    rows = list(csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")))
    assert [(r["step"], r["loss"], r["new"]) for r in rows] == [("0", "0.0", ""), ("1", "1.0", ""), ("2", "2.0", ""), ("3", "30.0", "1.0")]
    with pytest.raises(ValueError, match="resume_step must be >= 0"):
        RunCSVLogger(str(tmp_path), resume_step=-1)


def test_model_setting_changes_compare_as_yaml_writes_them():
    saved = {"_class_path": "m.DMD", "_instantiator": "x", "dmd": {"dm_level_range": [0.02, 0.98], "guidance_scale": 1.5}, "seed": 0}
    same = {"class_path": "m.DMD", "init_args": {"dmd": {"dm_level_range": (0.02, 0.98), "guidance_scale": 1.5}, "seed": 0}}
    assert runs.model_setting_changes(saved, same) == []
    changed = {"class_path": "m.DMD", "init_args": {"dmd": {"dm_level_range": (0.02, 0.98), "guidance_scale": 2.0}, "seed": 0,
                                                     "max_generator_updates": 9}}
    assert runs.model_setting_changes(saved, changed) == [("dmd.guidance_scale", 1.5, 2.0), ("max_generator_updates", None, 9)]
    with pytest.raises(ValueError, match=r"dmd.guidance_scale: checkpoint 1.5, config 2.0") as error:
        runs.check_resumable(saved, changed, Path("x.ckpt"))
    assert "max_generator_updates:" not in str(error.value)  # the budget may change
    with pytest.raises(ValueError, match="holds a m.DMD, the config a m.GNDM"):
        runs.check_resumable(saved, {"class_path": "m.GNDM", "init_args": {}}, Path("x.ckpt"))


def test_latest_checkpoint_and_the_version_a_checkpoint_belongs_to(tmp_path):
    for version, mtime in (("version_0", 100), ("version_1", 300), ("job_7", 200)):
        path = tmp_path / version / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        os.utime(path, (mtime, mtime))
    assert runs.latest_checkpoint(tmp_path).parent.parent.name == "version_1"
    assert runs.latest_checkpoint(tmp_path, only_version="job_7").parent.parent.name == "job_7"
    with pytest.raises(FileNotFoundError, match="job_8/checkpoints/last.ckpt"):
        runs.latest_checkpoint(tmp_path, only_version="job_8")
    assert runs.version_of_checkpoint(tmp_path / "job_7" / "checkpoints" / "last.ckpt", tmp_path) == "job_7"
    assert runs.version_of_checkpoint(tmp_path / "elsewhere.ckpt", tmp_path) is None


def test_slurm_job_id_and_run_version(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    assert runs.slurm_job_id() is None and runs.run_version() is None
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    assert runs.run_version() == "job_17"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "16")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert runs.run_version() == "job_16_3"


def test_one_time_work_runs_on_rank_0_while_other_ranks_wait(tmp_path, monkeypatch):
    result = tmp_path / "result"
    calls = []
    for name in runs.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    threading.Timer(0.3, result.touch).start()  # rank 0 publishing its result
    started = time.monotonic()
    runs.run_once(result.exists, lambda: calls.append("rank 1 worked"), "make the result")
    assert result.exists() and calls == [] and time.monotonic() - started >= 0.25
    with pytest.raises(TimeoutError, match="rank 1 waited 0 s for rank 0 to make nothing"):
        runs.run_once(lambda: False, lambda: None, "make nothing", timeout_s=0.0)
    monkeypatch.setenv("SLURM_PROCID", "0")
    runs.run_once(lambda: False, lambda: calls.append("rank 0 worked"), "make it")
    assert calls == ["rank 0 worked"]


def test_sbatch_script_runs_one_task_per_gpu_with_signal_and_requeue():
    script = sbatch_script("configs/sd3/dmd.yaml", nodes=2, gpus_per_node=8, time="1-12:00:00", job_name="sd3",
                           log_dir="runs/slurm", partition="gpu", fit_args=["--trainer.strategy=deepspeed_stage_2"])
    lines = script.splitlines()
    for option in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=1-12:00:00",
                   "--signal=SIGUSR1@90", "--requeue", "--partition=gpu", "--output=runs/slurm/%x-%j.out"):
        assert f"#SBATCH {option}" in lines
    assert lines[-1] == ("srun rdm fit --config configs/sd3/dmd.yaml --trainer.num_nodes=2 --trainer.devices=8 "
                         "--trainer.strategy=deepspeed_stage_2")
    with pytest.raises(ValueError, match="--time '25 hours' is not a SLURM time"):
        sbatch_script("c.yaml", 1, 1, "25 hours", "j", "runs")
    with pytest.raises(ValueError, match="--nodes and --gpus-per-node must be >= 1, got 1 and 0"):
        sbatch_script("c.yaml", 1, 0, "10:00", "j", "runs")


def test_rdm_slurm_writes_and_submits_the_sbatch_file(tmp_path, monkeypatch, capsys):
    config = tmp_path / "dmd.yaml"
    config.write_text("model: {}\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path / 'submitted'}\necho Submitted batch job 99\n")
    (fake_bin / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    main(["slurm", "--config", str(config), "--gpus-per-node", "4", "--time", "04:00:00", "--log-dir", str(tmp_path / "logs"),
          "--", "--model.init_args.max_generator_updates=10"])
    written = (tmp_path / "logs" / "dmd.sbatch").read_text()
    assert (tmp_path / "submitted").read_text() == written
    assert written.rstrip().endswith("--model.init_args.max_generator_updates=10")
    assert "Submitted batch job 99" in capsys.readouterr().out


def test_teacher_pretraining_resumes_bit_for_bit(tmp_path, rdm_cache):
    """The teacher recipe draws from torch's global stream, which its checkpoint carries."""
    def teacher_config(name: str, fault: tuple[int, str] | None = None) -> Path:
        callbacks = [{"class_path": "rdm_lightning.callbacks.RunCheckpoint", "init_args": {"every_n_updates": 2}}]
        if fault is not None:
            callbacks.append({"class_path": "faults.FaultAt", "init_args": {"iteration": fault[0], "fault": fault[1]}})
        config = {
            "seed_everything": 0,
            "trainer": {"max_steps": 6, "logger": False, "default_root_dir": str(tmp_path / name), "callbacks": callbacks,
                        "enable_progress_bar": False, "enable_model_summary": False},
            "model": {"class_path": "rdm_lightning.methods.DigitsTeacherPretraining",
                      "init_args": {"config": {"channels": 8}, "output_path": str(tmp_path / name / "teacher")}},
            "data": {"class_path": "rdm_lightning.data.DigitsDataModule", "init_args": {"batch_size": 128}},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    assert rdm_fit(teacher_config("straight"), cache=rdm_cache).returncode == 0
    stopped = rdm_fit(teacher_config("stopped", (3, "sigterm")), cache=rdm_cache)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert load(tmp_path / "stopped" / "checkpoints" / "last.ckpt")["global_step"] == 4
    resumed = rdm_fit(teacher_config("stopped"), "--ckpt_path", "last", cache=rdm_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for file in ("denoiser.safetensors", "text_encoder.safetensors"):
        assert (tmp_path / "stopped" / "teacher" / file).read_bytes() == (tmp_path / "straight" / "teacher" / file).read_bytes()


METHOD_CONFIGS = ("dmd", "dmd2", "dmdr", "dmdr_lora", "gndm", "gndm_is", "gndmr", "gdmd", "rtdmd_stage1", "rtdmd_stage2")


def tiny_method_config(root: Path, method: str, teacher: Path, budget: int, stage1: Path | None = None) -> Path:
    """The shipped ``configs/digits/<method>.yaml`` on the tiny teacher, checkpointing every update, no evaluation."""
    config = yaml.safe_load((TESTS.parent / "configs" / "digits" / f"{method}.yaml").read_text())
    config["trainer"] = {
        "logger": {"class_path": "rdm_lightning.loggers.RunCSVLogger", "init_args": {"save_dir": str(root), "name": method}},
        "max_epochs": -1, "limit_val_batches": 0, "enable_progress_bar": False, "enable_model_summary": False,
        "callbacks": [{"class_path": "rdm_lightning.callbacks.GeneratorEMA", "init_args": {"decay": 0.5}},
                      {"class_path": "rdm_lightning.callbacks.RunCheckpoint", "init_args": {"every_n_updates": 1}}],
    }
    model = config["model"]["init_args"]
    model["backbone"]["init_args"] = {"path": str(teacher)}
    model["max_generator_updates"] = budget
    if stage1 is not None:
        model["stage1_checkpoint"] = str(stage1)
    path = root / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def tiny_stage1(tmp_path_factory, tiny_digits_teacher, rdm_cache, digits_classifier, digits_gold_classifier) -> Path:
    root = tmp_path_factory.mktemp("stage1")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RDM_CACHE", str(rdm_cache))
        fit_in_process(tiny_method_config(root, "rtdmd_stage1", tiny_digits_teacher, budget=1))
    return root / "rtdmd_stage1" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("method", METHOD_CONFIGS)
def test_every_digits_method_resumes_bit_for_bit(method, tmp_path, tiny_digits_teacher, digits_cache, digits_gold_classifier, request):
    """Each method's own state (DMDR's schedules, GNDM's stored IS rollout, RTDMD's RL counter, LoRA roles)
    survives a resume: training on from a checkpoint equals training straight through."""
    stage1 = request.getfixturevalue("tiny_stage1") if method == "rtdmd_stage2" else None
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    resumed.mkdir()
    fit_in_process(tiny_method_config(straight, method, tiny_digits_teacher, budget=4, stage1=stage1))
    config = tiny_method_config(resumed, method, tiny_digits_teacher, budget=2, stage1=stage1)
    fit_in_process(config)
    fit_in_process(config, "--ckpt_path", "last", "--model.init_args.max_generator_updates=4")
    ours, theirs = (load(root / method / "version_0" / "checkpoints" / "last.ckpt") for root in (resumed, straight))
    assert ours["rdm"]["role_updates"]["generator"] == theirs["rdm"]["role_updates"]["generator"] == 4
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for key, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][key], value), key


def test_a_checkpoint_folder_replaces_the_previous_one_whole(tmp_path):
    """Sharded strategies (DeepSpeed) write a checkpoint folder: it is swapped in, never merged."""
    from rdm_lightning.callbacks.checkpoint import _replace

    last, partial = tmp_path / "last.ckpt", tmp_path / "last.ckpt.partial"
    last.mkdir()
    (last / "old_shard.pt").write_text("old")
    partial.mkdir()
    (partial / "new_shard.pt").write_text("new")
    _replace(partial, last)
    assert [p.name for p in last.iterdir()] == ["new_shard.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    partial.write_text("file")
    last_file = tmp_path / "file.ckpt"
    _replace(partial, last_file)
    assert last_file.read_text() == "file" and not partial.exists()
