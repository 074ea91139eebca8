"""What a training run is, decided before anything trains: one frozen RunPlan, made by one
function for new and resumed runs alike.

    plan, rows = plan_run(TrainRequest("dpo", overrides=[{"trainer": {"max_steps": 20}}]), engine=engine)
    plan.run_id, plan.output_dir, plan.trainer["learning_rate"], plan.start   # the run row exists
    dataset = training_data(plan, rows)   # the rows it trains on (written beside the checkpoints first)

`plan_run` resolves the request's settings (preset, config file, CLI layers: `presets.py`) and
then goes one of two ways only where it must:

- a new run checks the trainer keys, exports (or reads) its data, snapshots it and records the
  run row; the plan comes back with the rows in memory;
- a resumed run (`run.resume`) takes the latest unfinished run of the method, its own saved
  settings with this command's flags on top, its snapshot on disk and its last complete
  checkpoint, and reopens the row; no rows come back (`training_data` reads and checks them).

Both then share the rest: the method's own resolution of its trainer settings (PPO's
`--reward-run`), the model spec, adapter and run options, and the start point of a run from a
policy (`lineage.py`). A new run and a resumed run of the same request make equal plans but
for `resumed`, `checkpoint` and `notes` (tests/test_run_plan.py). The plan holds no runtime
object: the loaded dataset, the model and the trainer stay with `job.py`, which runs it.

Under `accelerate launch` rank 0 plans as above; the other ranks build the same plan from the
same settings, with the run id and output directory rank 0 sends them, and read the rows it saved.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sqlalchemy.engine import Engine

from alignment.training import lineage, presets, runs
from alignment.training.common import MethodSpec, TrainingError, check_weights, has_weights
from alignment.training.methods import METHOD_NAMES

DATA_FILE = "data.parquet"


@dataclass(frozen=True)
class RunOptions:
    """How a run is set up around the trainer (the `run:` section of presets and configs)."""

    output_dir: str | None = field(
        default=None, metadata={"help": "checkpoints, data and the adapter go here (default RUNS_DIR/METHOD-RUN_ID)"}
    )
    runs_dir: str = field(default="runs", metadata={"help": "parent of the default output directories"})
    data: str | None = field(
        default=None, metadata={"help": "train on this parquet/JSONL file instead of the store's export"}
    )
    min_examples: int = field(default=4, metadata={"help": "refuse a snapshot with fewer rows than this"})
    policy_name: str | None = field(
        default=None, metadata={"help": "name of the policy a finished run registers (default METHOD-RUN_ID)"}
    )
    resume: bool = field(
        default=False, metadata={"help": "continue the latest unfinished run of this method from its last checkpoint"}
    )
    from_policy: str | None = field(
        default=None, metadata={"help": "start from this policy version (a name, or latest): also the run's "
                                        "reference (DPO/KTO log-ratio, PPO KL) and the new policy's parent"}
    )


@dataclass
class TrainRequest:
    """What `prefloop train METHOD` asks for; `overrides` are the CLI's layers, last wins."""

    method: str
    model: str | None = None  # over the settings' model.model, itself "default" unless set
    preset: str = presets.AUTO_PRESET
    config_file: str | None = None
    overrides: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class RunPlan:
    """Everything decided before a run trains. Frozen; `trainer` is a read-only mapping."""

    method: MethodSpec
    run_id: int
    model: Any  # alignment.models.ModelSpec, placed on this rank's device
    adapter: Any  # alignment.models.adapters.AdapterConfig, as the settings give it (the trainer works on a copy)
    trainer: Mapping[str, Any]  # the resolved trainer settings, before the model and machine adjust them
    options: RunOptions  # output_dir and from_policy as the run resolved them
    output_dir: Path
    start: lineage.StartPoint | None  # the policy the run starts from (its reference and parent); None: the base
    snapshot_hash: str | None  # the content hash of the run's rows (None on the other ranks of a new run)
    checkpoint: str | None = None  # a resumed run continues from this checkpoint directory
    resumed: bool = False
    main: bool = True  # False on the other ranks of a multi-process launch
    notes: tuple[str, ...] = ()  # what planning decided for the user (a resume with no checkpoint yet)

    @property
    def data_file(self) -> Path:
        """The snapshot of the rows, kept beside the checkpoints: what a resume and the other ranks read."""
        return self.output_dir / DATA_FILE


def get_method(name: str) -> MethodSpec:
    if name not in METHOD_NAMES:
        raise TrainingError(f"unknown training method {name!r} (expected one of {', '.join(METHOD_NAMES)})")
    return importlib.import_module(f"alignment.training.{name}").METHOD


# --------------------------------------------------------------------------- settings


def resolve_settings(request: TrainRequest) -> dict:
    layers = [presets.load_preset(request.preset)]
    if request.config_file:
        layers.append(presets.load_yaml(request.config_file))
    layers += [dict(layer, _source="command line") for layer in request.overrides]
    if request.model:
        layers.append({"model": {"model": request.model}, "_source": "command line"})
    return presets.settings_for(presets.merge(*layers), request.method)


def check_trainer_keys(method: MethodSpec, trainer: dict, sources: dict) -> None:
    import dataclasses

    known = {f.name for f in dataclasses.fields(method.config_class) if f.init}
    for key in trainer:
        if key not in known:
            where = sources.get(f"{method.name}.{key}") or sources.get(f"trainer.{key}") or "settings"
            raise presets.PresetError(
                f"{where}: trainer.{key}: not a setting of {method.config_class.__name__}"
                f"{presets._suggest(key, known)}"
            )


def _saved_settings(run, request: TrainRequest, method: MethodSpec) -> dict:
    """A resumed run's own settings, with this command's explicit flags (e.g. a new --max-steps) on top."""
    saved = run.config.get("settings", {})
    layers = [{**saved, "_source": f"run {run.id}"}]
    layers += [dict(layer, _source="command line") for layer in request.overrides]
    merged = presets.settings_for(presets.merge(*layers), method.name)
    merged["run"]["resume"] = False
    return merged


def _built(method: MethodSpec, settings: dict, engine: Engine, *, saved_model: str | None = None):
    """(model spec, adapter) from the settings, once the method has resolved its trainer settings
    (in place). saved_model: a resumed run's recorded base model, under the settings' model."""
    from alignment.models import ModelSpec
    from alignment.models.adapters import AdapterConfig

    sources = settings["_sources"]
    if method.resolve is not None:
        settings["trainer"] = method.resolve(settings["trainer"], engine)
    model = settings["model"] if saved_model is None else {"model": saved_model, **settings["model"]}
    spec = presets.build(ModelSpec, model, "model", sources)
    adapter = presets.build(AdapterConfig, settings["adapter"], "adapter", sources)
    return spec, adapter


# --------------------------------------------------------------------------- the plan


def plan_run(request: TrainRequest, *, engine: Engine, resume: bool | None = None) -> tuple[RunPlan, Any]:
    """(the plan, the new run's rows or None). The run row exists when this returns: recorded for a
    new run, reopened for a resumed one. resume: None follows the settings' `run.resume`.
    Raises TrainingError (or PresetError) before recording anything when the run cannot start."""
    method = get_method(request.method)
    settings = resolve_settings(request)
    options = presets.build(RunOptions, settings["run"], "run", settings["_sources"])
    if options.resume if resume is None else resume:
        return _plan_resumed(request, method, options, engine), None
    return _plan_new(request, method, settings, options, engine)


def _plan_new(request: TrainRequest, method: MethodSpec, settings: dict, options: RunOptions,
              engine: Engine) -> tuple[RunPlan, Any]:
    from feedback_store.export import Selection, snapshot

    sources = settings["_sources"]
    check_trainer_keys(method, settings["trainer"], sources)
    spec, adapter = _built(method, settings, engine)
    selection = presets.build(Selection, settings["selection"], "selection", sources)
    start, options = _start_point(options, spec, method, adapter, engine)
    if start is not None:
        settings["run"]["from_policy"] = start.name  # "latest" as it resolved: --resume starts from the same one

    state = _process_state()
    spec = _placed(spec)

    def planned(**where) -> RunPlan:
        return RunPlan(method=method, model=spec, adapter=adapter, trainer=MappingProxyType(dict(settings["trainer"])),
                       start=start, **where)

    if not state.is_main_process:
        # Under `accelerate launch`, rank 0 exports, snapshots and records the run; the others
        # train on the very rows it saved.
        run_id, output_dir = _from_main()
        return planned(run_id=run_id, output_dir=Path(output_dir), options=replace(options, output_dir=output_dir),
                       snapshot_hash=None, main=False), None
    try:
        dataset, source = load_data(method, selection, options.data, engine)
        check_weighted(method, selection, dataset, options.data, engine)
    except BaseException as error:
        _to_followers(state, error=str(error))
        raise
    ids, digest = snapshot(dataset)  # the weight column, when there is one, is part of the hash
    record = {
        "method": method.name,
        "model": spec.model,
        "preset": request.preset,
        "config_file": request.config_file,
        "data": source,
        "weighted": has_weights(dataset),  # per-example loss weights (the `weight` column)
        "settings": {k: v for k, v in settings.items() if not k.startswith("_")},
    }
    if start is not None:
        record["from_policy"] = {"name": start.name, "id": start.policy_id}
    seed = int(settings["trainer"].get("seed", 42))
    run_id = runs.start_run(engine, kind=method.name, config=record, snapshot_ids=ids, snapshot_hash=digest,
                            seed=seed, base_model=spec.model)
    output_dir = Path(options.output_dir or Path(options.runs_dir) / f"{method.name}-{run_id}").resolve()
    record["settings"]["run"]["output_dir"] = str(output_dir)
    runs.update_config(engine, run_id, record)
    return planned(run_id=run_id, output_dir=output_dir, options=replace(options, output_dir=str(output_dir)),
                   snapshot_hash=digest), dataset


def _plan_resumed(request: TrainRequest, method: MethodSpec, options: RunOptions, engine: Engine) -> RunPlan:
    run = runs.latest_unfinished_run(engine, method.name, options.output_dir)
    if run is None:
        where = f" in {options.output_dir}" if options.output_dir else ""
        raise TrainingError(f"no unfinished {method.name} run to resume{where}")
    settings = _saved_settings(run, request, method)
    spec, adapter = _built(method, settings, engine, saved_model=run.config.get("model", "default"))
    run_options = presets.build(RunOptions, settings["run"], "run", settings["_sources"])
    saved_dir = run.config.get("settings", {}).get("run", {}).get("output_dir")
    output_dir = Path(saved_dir or options.output_dir or "")
    data_file = output_dir / DATA_FILE
    if not data_file.is_file():
        raise TrainingError(f"run {run.id}: its data snapshot {data_file} is gone, cannot resume")
    start, run_options = _start_point(run_options, spec, method, adapter, engine)

    checkpoint = last_complete_checkpoint(output_dir) if output_dir.is_dir() else None
    main = _process_state().is_main_process
    if main:
        runs.reopen_run(engine, run.id, resumed_at_step=int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0)
    notes = () if checkpoint else (f"run {run.id} had no checkpoint yet: it restarted from step 0",)
    return RunPlan(method=method, run_id=run.id, model=_placed(spec), adapter=adapter,
                   trainer=MappingProxyType(dict(settings["trainer"])), options=run_options, output_dir=output_dir,
                   start=start, snapshot_hash=run.snapshot_hash, checkpoint=checkpoint, resumed=True, main=main,
                   notes=notes)


def _start_point(options: RunOptions, spec, method: MethodSpec, adapter,
                 engine: Engine) -> tuple[lineage.StartPoint | None, RunOptions]:
    """The policy the run starts from (None: the base model), checked before anything is recorded,
    and the options naming it as it resolved ("latest" -> its name)."""
    from alignment.models import resolve_quantize

    if not options.from_policy:
        return None, options
    start = lineage.resolve_start(engine, options.from_policy, model=spec.model, method=method.name,
                                  adapter_method=adapter.method, quantized=resolve_quantize(spec) != "none")
    return start, replace(options, from_policy=start.name)


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing. A process killed while saving leaves
    a `checkpoint-N` without `trainer_state.json`, which the Trainer writes last."""
    done = [path for path in output_dir.glob("checkpoint-*") if (path / "trainer_state.json").is_file()]
    steps = {int(path.name.split("-")[-1]): path for path in done if path.name.split("-")[-1].isdigit()}
    return str(steps[max(steps)]) if steps else None


# --------------------------------------------------------------------------- data


def read_data_file(path: str):
    from datasets import load_dataset

    file = Path(path)
    if not file.is_file():
        raise TrainingError(f"--data {path}: no such file")
    kind = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}.get(file.suffix.lower())
    if kind is None:
        raise TrainingError(f"--data {path}: expected a .parquet or .jsonl file")
    try:
        return load_dataset(kind, data_files=str(file), split="train")
    except Exception as error:  # noqa: BLE001  (datasets raises many types for unreadable files)
        raise TrainingError(f"--data {path}: cannot read it ({str(error).splitlines()[0]})") from None


def load_data(method: MethodSpec, selection, data_path: str | None, engine: Engine):
    """(dataset, where it came from): the store's export for the method, or a file."""
    if data_path:
        dataset = read_data_file(data_path)
        if method.required_columns and not any(set(cols) <= set(dataset.column_names)
                                               for cols in method.required_columns):
            wanted = " or ".join("/".join(cols) for cols in method.required_columns)
            raise TrainingError(f"--data {data_path}: {method.name} needs columns {wanted} "
                                f"(found {', '.join(dataset.column_names) or 'none'})")
        return dataset, f"file:{Path(data_path).resolve()}"
    from feedback_store.db import read_scope
    from feedback_store.export import export

    with read_scope(engine) as session:
        return export(method.export, session=session, selection=selection), f"store:{method.export}"


def check_weighted(method: MethodSpec, selection, dataset, data_path: str | None, engine: Engine) -> None:
    """Per-example weights that would train on nothing are refused before the run row exists: a
    weight column of zeros (or negative, or not finite), or a `--weighted` export left empty
    because every rater who voted weighs 0 (the same selection unweighted has rows)."""
    where = f"--data {data_path}" if data_path else f"the {method.name} export"
    check_weights(dataset, where)
    if data_path or not getattr(selection, "weighted", False) or len(dataset) > 0:
        return
    from dataclasses import replace as with_fields

    unweighted, _ = load_data(method, with_fields(selection, weighted=False), None, engine)
    if len(unweighted) > 0:
        raise TrainingError(f"--weighted: every rater whose votes this selection counts has weight 0, so each of the "
                            f"{len(unweighted)} {method.name} examples would weigh 0 (set weights with `prefloop "
                            f"raters weight NAME W`, or train without --weighted)")


def training_data(plan: RunPlan, rows=None):
    """The rows the run trains on. A new run's `rows` (from plan_run) are checked for size and
    written to plan.data_file, and the other ranks are told to go on; without rows (a resumed run,
    another rank) they are read back from plan.data_file, a resumed run's checked against its hash.
    Called once the run row exists: a TrainingError here fails the run."""
    if rows is None:
        return _saved_rows(plan)
    state = _process_state()
    method, options = plan.method, plan.options
    try:
        if len(rows) < options.min_examples:
            if len(rows) == 0:
                where = f"the file {options.data}" if options.data else "the store"
                raise TrainingError(f"no {method.name} training data in {where} for this selection: record "
                                    f"votes first (prefloop serve / prefloop judge) or loosen "
                                    f"--raters/--min-agreement")
            raise TrainingError(
                f"the {method.name} snapshot has {len(rows)} rows, fewer than the {options.min_examples} "
                f"needed (more votes, a looser selection, or --set run.min_examples=N)"
            )
        plan.output_dir.mkdir(parents=True, exist_ok=True)
        rows.to_parquet(str(plan.data_file))  # what --resume (and other ranks) train on
    except BaseException as error:
        _to_followers(state, error=str(error))
        raise
    _to_followers(state, run_id=plan.run_id, output_dir=str(plan.output_dir))
    return rows


def _saved_rows(plan: RunPlan):
    from datasets import Dataset

    from feedback_store.export import snapshot

    dataset = Dataset.from_parquet(str(plan.data_file))
    if plan.resumed and snapshot(dataset)[1] != plan.snapshot_hash:
        raise TrainingError(f"run {plan.run_id}: {plan.data_file} does not match the run's snapshot hash")
    return dataset


# --------------------------------------------------------------------------- processes


def _process_state():
    """The launch this process is part of (one process unless started by accelerate/torchrun).
    cpu= as the trainer will say it (use_cpu on a machine without CUDA), so that this first
    initialisation of accelerate's shared state is the one the trainer finds."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _placed(spec):
    """Under a multi-process launch each rank loads its copy on its own GPU (the model layer's
    "auto" would put every rank on cuda:0)."""
    import dataclasses

    import torch

    state = _process_state()
    if state.num_processes > 1 and spec.device == "auto" and torch.cuda.is_available():
        return dataclasses.replace(spec, device=f"cuda:{state.local_process_index}")
    return spec


def _to_followers(state, **message) -> None:
    """Rank 0 tells the other ranks which run to join (or why there is none)."""
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list([message])


def _from_main() -> tuple[int, str]:
    from accelerate.utils import broadcast_object_list

    [message] = broadcast_object_list([None])
    if "error" in message:
        raise TrainingError(message["error"])
    return message["run_id"], message["output_dir"]
