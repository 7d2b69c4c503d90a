"""logger=tensorboard|mlflow|wandb|trackio: what a run writes is read back with each tool's own reader."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from tests.conftest import TINY_GPT, ftk

RUN_ARGS = ("train.max_steps=10", "train.eval_every=5", "train.save_every=0", "data.max_documents=300")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, corpus_dir_module):
    run = tmp_path_factory.mktemp("tracked") / "run"
    # Commas mean a list for `logger` (not a sweep): both trackers at once.
    assert ftk("pretrain", *TINY_GPT, f"data.path={corpus_dir_module}", *RUN_ARGS, "logger=tensorboard,mlflow",
               f"hydra.run.dir={run}") == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, lines, json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def corpus_dir_module(tmp_path_factory):
    from tests.conftest import make_corpus

    folder = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(make_corpus(60)):
        (folder / f"doc{i:03d}.txt").write_text(doc + "\n")
    return folder


def test_tensorboard_event_files_hold_every_metric_the_config_and_the_summary(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, lines, summary = tracked_run
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    for key in ("loss", "lr", "tokens_per_s", "eval_loss", "eval_ppl", "grad_norm"):
        written = [(r["step"], r[key]) for r in lines if key in r]
        read = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in read] == [s for s, _ in written], key
        assert [v for _, v in read] == pytest.approx([v for _, v in written], rel=1e-6), key
    assert events.Scalars("summary/final_eval_loss")[0].value == pytest.approx(summary["final_eval_loss"], rel=1e-6)
    assert "summary" in "".join(events.Tags()["tensors"])  # the whole summary.json as text
    # The composed config as hyperparameters (accelerate also keeps them as hparams.yml)
    import yaml

    (hparams,) = list((run / "tensorboard").glob("*/hparams.yml"))
    config = yaml.safe_load(hparams.read_text())
    assert config["train.max_steps"] == 10 and config["model.hidden_size"] == 64
    assert config["logger.tensorboard.enabled"] is True


def test_mlflow_local_store_holds_params_metric_histories_and_the_summary(tracked_run):
    from mlflow import MlflowClient

    run, lines, summary = tracked_run
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ftk")
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.info.run_name == run.name and logged.info.status == "FINISHED"
    assert logged.data.params["train.max_steps"] == "10" and logged.data.params["data.path"].endswith("corpus0")
    for key in ("loss", "eval_loss", "lr"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(logged.info.run_id, key))
        assert history == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in lines if key in r], key
    assert logged.data.metrics["summary/tokens_seen"] == summary["tokens_seen"]
    path = client.download_artifacts(logged.info.run_id, "summary.json", str(run / "download"))
    assert json.loads(open(path).read())["steps"] == 10
    assert json.loads((run / "trackers.json").read_text())["mlflow_run_id"] == logged.info.run_id
    assert math.isfinite(logged.data.metrics["summary/final_eval_loss"])


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_a_tracker_that_is_not_installed_stops_with_the_pip_command(name, corpus_dir, tmp_path, capsys):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed here")
    run = tmp_path / "run"
    assert ftk("pretrain", *TINY_GPT, f"data.path={corpus_dir}", f"logger={name}", f"hydra.run.dir={run}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pip install 'ftk[{name}]'" in err[0], err
    assert not (run / "metrics.jsonl").exists()


def test_a_resumed_run_continues_its_mlflow_run_and_tensorboard_curve(corpus_dir_module, tmp_path):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    common = (*TINY_GPT, f"data.path={corpus_dir_module}", "train.eval_every=5", "data.max_documents=300",
              "logger=[mlflow,tensorboard]", f"hydra.run.dir={run}")
    assert ftk("pretrain", *common, "train.max_steps=5") == 0
    assert ftk("pretrain", *common, "train.max_steps=10", "train.resume=auto") == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (logged,) = client.search_runs([client.get_experiment_by_name("ftk").experiment_id])  # one run, not two
    assert sorted(m.step for m in client.get_metric_history(logged.info.run_id, "loss")) == [5, 10]
    assert logged.info.status == "FINISHED" and logged.data.metrics["summary/steps"] == 10
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("loss")] == [5, 10]
    assert client.get_run(logged.info.run_id).data.tags["resumed.train.max_steps"] == "10"
    assert logged.data.params["train.max_steps"] == "5"  # MLflow keeps a run's params as first logged


def test_with_two_processes_only_rank_0_logs(corpus_dir_module, tmp_path):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.test_distributed import torchrun

    run = tmp_path / "run"
    done = torchrun("pretrain", *TINY_GPT, f"data.path={corpus_dir_module}", "train.max_steps=4", "train.log_every=2",
                    "train.eval_every=0", "data.max_documents=300", "hardware.num_threads=1",
                    "logger=[tensorboard,mlflow]", f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1  # one writer, rank 0's
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("loss")] == [2, 4]
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (logged,) = client.search_runs([client.get_experiment_by_name("ftk").experiment_id])
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "loss")] == [2, 4]


def test_a_run_that_fails_closes_its_mlflow_run_as_failed(corpus_dir_module, tmp_path):
    from mlflow import MlflowClient

    run = tmp_path / "run"
    # an absurd rate blows the weights up within a few steps: the run stops with exit code 3
    assert ftk("pretrain", *TINY_GPT, f"data.path={corpus_dir_module}", "data.max_documents=300", "train.lr=1e30",
               "train.warmup_steps=0", "train.max_grad_norm=0", "train.max_steps=30", "train.log_every=1",
               "logger=mlflow", f"hydra.run.dir={run}") == 3
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (logged,) = client.search_runs([client.get_experiment_by_name("ftk").experiment_id])
    assert logged.info.status == "FAILED" and logged.data.metrics["loss"] > 0
    import mlflow

    assert mlflow.active_run() is None  # the next run in this process starts clean


def test_tensorboard_hides_what_an_interrupted_run_logged_after_the_checkpoint_it_resumes(corpus_dir_module,
                                                                                         tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    common = (*TINY_GPT, f"data.path={corpus_dir_module}", "data.max_documents=300", "train.eval_every=0",
              "train.log_every=2", "train.save_every=4", "logger=tensorboard", f"hydra.run.dir={run}")
    assert ftk("pretrain", *common, "train.max_steps=8") == 0
    first = {e.step: e.value for e in EventAccumulator(str(run / "tensorboard")).Reload().Scalars("loss")}
    # as if killed after step 8 had been logged: resume from the step-4 checkpoint, running 5-8 again, at another lr
    assert ftk("pretrain", *common, "train.max_steps=8", "train.lr=1e-3", "train.accept_changes=true",
               f"train.resume={run / 'checkpoints' / 'step-0000004'}") == 0
    read = [(e.step, e.value) for e in EventAccumulator(str(run / "tensorboard")).Reload().Scalars("loss")]
    assert [s for s, _ in read] == [2, 4, 6, 8]  # steps 6 and 8 once, from the resumed run
    assert dict(read)[4] == first[4] and dict(read)[8] != first[8]
