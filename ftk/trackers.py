"""Experiment trackers: TensorBoard, Weights & Biases, MLflow and trackio, through accelerate's tracking API.

metrics.jsonl stays the record; a tracker is a second copy for watching runs live and comparing them in a
dashboard. Each is an optional package, imported only when its `logger` option is chosen, and offline by
default where it has an offline mode: TensorBoard event files in <run>/tensorboard, W&B in offline mode
(<run>/wandb), MLflow in a local store in the run (sqlite:///<run>/mlflow.db; MLflow 3 refuses its old ./mlruns
file store unless told to). accelerate starts and logs on the main process only, so only rank 0 writes.

What each gets: the composed config as hyperparameters (flattened to dotted keys), every metrics.jsonl line at
its step under the same names, and the summary (its numbers as `summary/<key>` at the last step, and the whole
summary.json as text or an artifact where the tool has one).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Dict, List

from ftk.errors import UsageError

# logger option -> (module imported, pip package). The `ftk[<option>]` extra installs the package.
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}
RUN_IDS = "trackers.json"  # in the run dir: the MLflow run id, so that a resumed run logs into the same run


def chosen(logger: Any) -> List[str]:
    """The trackers turned on in a `logger` config node, in a fixed order."""
    return [name for name in PACKAGES if logger is not None and logger.get(name) is not None
            and logger[name].get("enabled", False)]


def require(logger: Any) -> None:
    """Stop with one line naming the pip command when a chosen tracker's package is not installed."""
    for name in chosen(logger):
        module, package = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UsageError(f"logger={name} needs the {package} package, which is not installed: "
                             f"pip install 'ftk[{name}]' (or pip install {package}), or drop logger={name}")


def build(logger: Any, run_dir: Path) -> List[Any]:
    """accelerate tracker objects for the chosen trackers (nothing is started or imported until init_trackers,
    which runs on the main process only)."""
    from accelerate.tracking import TensorBoardTracker, TrackioTracker, WandBTracker

    out: List[Any] = []
    names = chosen(logger)
    if "tensorboard" in names:
        out.append(TensorBoardTracker("tensorboard", run_dir))  # -> <run>/tensorboard
    if "wandb" in names:
        w = logger.wandb
        out.append(WandBTracker(w.project, mode=w.mode, entity=w.entity, dir=str(run_dir), name=run_dir.name,
                                # one W&B run per ftk run: a resumed run continues it
                                id=_stable_id(run_dir), resume="allow"))
    if "mlflow" in names:
        out.append(mlflow_tracker(logger.mlflow, run_dir))
    if "trackio" in names:
        out.append(TrackioTracker(logger.trackio.project, name=run_dir.name, resume="allow"))
    return out


def _stable_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


def local_store(run_dir: Path) -> str:
    """MLflow's store in the run: a SQLite file (MLflow 3 refuses its old ./mlruns file store by default)."""
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def tracking_uri(settings: Any, run_dir: Path) -> str:
    """logger.mlflow.tracking_uri, else the user's $MLFLOW_TRACKING_URI, else the local store in the run."""
    import os

    return settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store(run_dir)


def _mlflow_tracker_class():
    from accelerate.tracking import MLflowTracker, on_main_process

    class MlflowInRun(MLflowTracker):
        """accelerate's MLflowTracker with the store chosen per run (a sweep's jobs each point MLflow at their
        own) and the run id kept in the run dir, so that `train.resume=auto` continues the same MLflow run."""

        def __init__(self, settings: Any, run_dir: Path):
            self.uri = tracking_uri(settings, run_dir)
            self.ids_file = run_dir / RUN_IDS
            saved = json.loads(self.ids_file.read_text()) if self.ids_file.is_file() else {}
            local = self.uri == local_store(run_dir)
            # The local store keeps its artifacts (summary.json) in the run too; a server keeps its own
            super().__init__(experiment_name=settings.experiment, run_id=saved.get("mlflow_run_id"),
                             run_name=run_dir.name,
                             logging_dir=str((run_dir / "mlartifacts").resolve()) if local else None)

        @on_main_process
        def start(self):
            import os

            import mlflow

            user_uri = os.environ.get("MLFLOW_TRACKING_URI")
            mlflow.set_tracking_uri(self.uri)
            # set_tracking_uri also exports the URI to the environment (for subprocesses): put the user's back, or
            # the next job of a sweep would take this run's local store for the user's server
            if user_uri is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = user_uri
            if mlflow.active_run() is not None:  # left open by an earlier job of this sweep that failed
                mlflow.end_run(status="FAILED")
            super().start()
            ids = json.loads(self.ids_file.read_text()) if self.ids_file.is_file() else {}
            ids["mlflow_run_id"] = self.active_run.info.run_id
            self.ids_file.write_text(json.dumps(ids) + "\n")

        @on_main_process
        def store_init_configuration(self, values: dict):
            """MLflow's params cannot change within a run: a resumed run logs the keys it has not logged yet, and
            each value that differs from the logged one as a tag `resumed.<key>` (train.max_steps, train.resume)."""
            import mlflow

            logged = mlflow.get_run(self.active_run.info.run_id).data.params
            changed = {f"resumed.{k}": str(v) for k, v in values.items() if k in logged and logged[k] != str(v)}
            if changed:
                mlflow.set_tags(changed)
            super().store_init_configuration({k: v for k, v in values.items() if k not in logged})

    return MlflowInRun


def mlflow_tracker(settings: Any, run_dir: Path) -> Any:
    return _mlflow_tracker_class()(settings, run_dir)


def hyperparameters(cfg: Any) -> Dict[str, Any]:
    """The composed config as flat {dotted key: bool | int | float | str}: what every tracker accepts as
    hyperparameters (TensorBoard's hparams refuse None and lists, MLflow stores strings)."""
    from omegaconf import OmegaConf

    out: Dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        elif node is None:
            out[prefix] = "null"
        elif isinstance(node, (bool, int, float, str)):
            out[prefix] = node
        else:
            out[prefix] = json.dumps(node)

    walk("", OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    return out


def start(accelerator: Any, cfg: Any) -> None:
    """Start the trackers the Accelerator was built with and log the config (main process only)."""
    if accelerator.log_with:
        accelerator.init_trackers("ftk", config=hyperparameters(cfg))


def log(accelerator: Any, record: Dict[str, Any]) -> None:
    """One metrics.jsonl line, at its step, under the same names."""
    if accelerator.trackers:
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        accelerator.log(values, step=int(record["step"]))


def resumed_at(accelerator: Any, step: int) -> None:
    """A run resumed from its step-`step` checkpoint runs again the steps the interrupted run may have logged after
    it. TensorBoard's own mechanism hides those (a SessionLog START event at step + 1: readers drop the earlier
    events from that step on, as SummaryWriter(purge_step=...) does), so the curve stays continuous."""
    for tracker in getattr(accelerator, "trackers", None) or []:
        if tracker.name == "tensorboard":
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            tracker.writer._get_file_writer().add_event(
                Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))


def finish(accelerator: Any, summary: Dict[str, Any]) -> None:
    """The summary into every tracker, then close them (main process only)."""
    if not accelerator.trackers:
        return
    step = int(summary.get("steps") or 0)
    numbers = {f"summary/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    accelerator.log(numbers, step=step)
    text = json.dumps(summary, indent=2, default=str)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_text("summary", f"```\n{text}\n```", global_step=step)
        elif tracker.name == "mlflow":
            import mlflow

            mlflow.log_dict(json.loads(text), "summary.json")
        elif tracker.name == "wandb":
            tracker.run.summary.update(json.loads(text))
    end(accelerator)


def end(accelerator: Any, status: str = "FINISHED") -> None:
    """Close the trackers; a run that failed or was stopped closes them too (MLflow records it as FAILED or
    KILLED), so that the dashboard does not show it running forever and a sweep's next job starts clean."""
    # Not accelerator.end_training(): it also destroys the process group, which a sweep's next job still uses.
    for tracker in getattr(accelerator, "trackers", None) or []:
        if tracker.name == "mlflow" and status != "FINISHED":
            import mlflow

            mlflow.end_run(status=status)
        else:
            tracker.finish()
    if getattr(accelerator, "trackers", None):
        accelerator.trackers = []
