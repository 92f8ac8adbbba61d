"""The Tune trainable of a sweep: one trial = one run of the base config with the sampled values."""

from __future__ import annotations

import json
from typing import Any

from zosam.config import apply_overrides


def trial_function(config: dict[str, Any]) -> None:
    """One Tune trial: apply the sampled values to the base config and train."""
    import ray.train
    import torch
    from ray import tune

    from zosam.ray_train import make_trainer, run_in_session

    ctx = config["_zosam"]
    if ctx["workers_per_trial"] == 0:  # the trial trains itself: one torch thread per CPU it holds
        torch.set_num_threads(max(1, int(ctx["cpus_per_trial"])))
    params = {k: v for k, v in config.items() if k != "_zosam"}
    run_dict = apply_overrides(ctx["base"], [f"{k}={json.dumps(v)}" for k, v in params.items()])
    trial_id = tune.get_context().get_trial_id()
    run_dict["name"] = f"{ctx['sweep']}-{trial_id}"
    run_dict.setdefault("tracking", {})["experiment"] = ctx["experiment"]  # children beside their parent
    # Where the trial (last) ran: a restarted trial may land on another node.
    tags = {"zosam.sweep": ctx["sweep"], "zosam.trial_id": trial_id,
            "zosam.ray_node_id": ray.get_runtime_context().get_node_id()}
    if ctx["workers_per_trial"] == 0:
        run_in_session(run_dict, report=tune.report, get_checkpoint=tune.get_checkpoint,
                       checkpoint_cls=tune.Checkpoint, rank=0, tracking_uri=ctx["tracking_uri"],
                       parent_run_id=ctx["parent_run_id"], extra_tags=tags,
                       run_key=f"{ctx['parent_run_id']}/{trial_id}")
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from zosam.storage import filesystem, ray_path

    endpoint = ctx.get("storage_endpoint")
    trainer = make_trainer(run_dict, num_workers=ctx["workers_per_trial"], use_gpu=ctx["gpus_per_worker"] > 0,
                           cpus_per_worker=ctx["cpus_per_worker"], name=run_dict["name"],
                           storage_path=ray_path(ctx["train_storage"], endpoint),
                           storage_filesystem=filesystem(ctx["train_storage"], endpoint),
                           max_failures=ctx["max_failures"],
                           tracking_uri=ctx["tracking_uri"], parent_run_id=ctx["parent_run_id"], extra_tags=tags,
                           callbacks=[TuneReportCallback()])
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        from zosam.ray_train import TrialFailed

        raise TrialFailed(str(e)) from None
