"""Whose stage checkpoints are whose: a trial's checkpoint belongs to one study, found again only by a retry of the
same computation in the same study, and removed with the study.

Layout: `<root>/<study name>-<owner hash>/<trial key>/state.pt`, with the root `study.checkpoint_dir`, else
`<pipeline.cache_dir>/checkpoints` (beside the teacher cache, never in the working tree by itself). The owner is
the study itself: its storage (URL without password; a SQLite or journal file by its absolute path) and its id in
that storage, never its name alone, which a deleted study hands on to the next. The trial key adds what
determines the computation: the task, the study's stored config (its hash), the code version, every choice, the
run seed and the data seed (`objectives.checkpoints.checkpoint_identity`). The checkpoint file records that identity
and is resumed only when it matches, so a checkpoint of another study, task, config or code never is.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna

from objectives.checkpoints import StageCheckpoints, checkpoint_identity, checkpoint_key
from objectives.keys import stable_hash
from objectives.settings import TrialChoices
from study.config.config import Config
from study.workers import compat
from study.workers.storage import mask_url, sqlite_path


def checkpoint_root(stored: dict) -> Path:
    """`study.checkpoint_dir`, else `checkpoints` under `pipeline.cache_dir`, of a config as stored (a dict: read
    without building the config, so deleting a study imports none of its user modules)."""
    root = stored["study"].get("checkpoint_dir") or str(Path(stored["pipeline"]["cache_dir"]) / "checkpoints")
    return Path(root).expanduser()


def storage_identity(url: str) -> str:
    """The storage as one string: the URL without its password; a SQLite or journal file by its absolute path, so
    workers started in different directories (or with `./x.db` and `x.db`) name the same store alike."""
    path = sqlite_path(url) or (Path(url[len("journal:"):]) if url.startswith("journal:") else None)
    if path is not None:
        return f"{url.split(':', 1)[0]}:{path.expanduser().resolve()}"
    return mask_url(url)


def study_owner(study: optuna.Study, url: str) -> dict:
    """The study's identity: its storage and its id there."""
    return {"storage": storage_identity(url), "study_id": compat.study_id(study)}


def study_folder(stored: dict, study: optuna.Study, url: str) -> Path:
    """The folder of every stage checkpoint of `study` (stored in `url`; `stored`: the config as a dict)."""
    return checkpoint_root(stored) / f"{study.study_name}-{stable_hash(study_owner(study, url), length=12)}"


def trial_checkpoints(config: Config, study: optuna.Study, url: str, choices: TrialChoices, run_seed: int,
                      data_seed: int) -> StageCheckpoints:
    """The stage checkpoints of one trial's computation in `study`."""
    stored = study.user_attrs.get("config") or config.to_dict()  # the study's own, whatever a worker overrides
    owner = {**study_owner(study, url), "task": dataclasses.asdict(config.task), "config": stable_hash(stored)}
    identity = checkpoint_identity(owner, choices.flat(), run_seed, data_seed)
    root = config.to_dict()  # the checkpoint folder as this worker is told (a worker may override it)
    return StageCheckpoints(study_folder(root, study, url) / checkpoint_key(identity), identity)


def checkpoint_folder(study: optuna.Study, url: str) -> Path:
    """The folder of every stage checkpoint of stored study `study`, found from its config as stored (`study
    delete` removes it)."""
    return study_folder(study.user_attrs["config"], study, url)
