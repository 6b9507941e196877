"""Run a script's main() as users do (under torchrun or alone), with test-only changes set by environment variables:

    PROBE_NO_BATCHNORM=1    every BatchNorm is an identity (so N processes can equal one: BatchNorm statistics over
                            a process's share differ from those over the whole batch, and CPUs have no SyncBatchNorm)
    PROBE_NO_FIGURES=1      no figures drawn (losses.png, progress.gif, sagan's attention.png), as in-process tests
    PROBE_DUMP=DIR          every process writes DIR/start<r>.pt and DIR/rank<r>.pt: its G and D states when
                            training starts and at the end
    PROBE_FAIL=RANK:STEP    that process raises at that step (a crashing process must end every process)
    PROBE_SLOW_START=S      rank 0's evaluator takes S seconds more to build (as a first run's classifier training)
    PROBE_SLOW_DATA=S       rank 0 takes S seconds more to load the dataset (as a long cache build) while the others wait
    PROBE_NO_CHECKPOINT_ON=RANK  that process does not see checkpoint.pt exist (a machine whose view of a shared
                            folder lags), though it can read it
    PROBE_NO_READ_ON=RANK   that process cannot read the checkpoint (a damaged copy on its machine)
    PROBE_DATA_FAIL=RANK    that process cannot load the dataset (as a machine whose own --data-root lacks it)
    PROBE_NAN_AT=STEP       every process's G weights become NaN at that step (the losses stay finite until the next
                            forward: only the weight check at a sample step can see it)

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_probe.py SCRIPT [flags]
"""
import importlib
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402


def install(env, patch=setattr):
    """The changes `env` asks for (its PROBE_* variables). `patch(obj, name, value)` makes each: setattr in the
    launched process, pytest's monkeypatch.setattr for a run inside the test's own process (undone after it)."""
    if env.get("PROBE_NO_BATCHNORM"):
        class NoBatchNorm(nn.Module):
            """BatchNorm's scale and shift without its batch statistics."""

            def __init__(self, channels, eps=1e-5, momentum=0.1, affine=True):
                super().__init__()
                self.weight = nn.Parameter(torch.ones(channels)) if affine else None
                self.bias = nn.Parameter(torch.zeros(channels)) if affine else None

            def forward(self, x):
                if self.weight is None:
                    return x
                shape = (1, -1) + (1,) * (x.dim() - 2)
                return x * self.weight.view(shape) + self.bias.view(shape)
        import torchvision  # noqa: F401  (imported first: its layers take nn.BatchNorm2d as a default argument)
        patch(nn, "BatchNorm1d", NoBatchNorm)
        patch(nn, "BatchNorm2d", NoBatchNorm)

    if env.get("PROBE_NO_FIGURES"):
        import sagan
        patch(common, "plot_run", lambda run: None)
        patch(sagan, "save_attention_figure", lambda *a, **k: None)

    if env.get("PROBE_FAIL"):
        fail_rank, fail_step = map(int, env["PROBE_FAIL"].split(":"))
        end_step = common.Run.end_step

        def failing_end_step(self, step, **stats):
            if self.rank == fail_rank and step == fail_step:
                raise RuntimeError(f"probe: rank {self.rank} fails at step {step}")
            return end_step(self, step, **stats)
        patch(common.Run, "end_step", failing_end_step)

    if env.get("PROBE_NAN_AT"):
        nan_step, nan_end_step = int(env["PROBE_NAN_AT"]), common.Run.end_step

        def nan_end_step_(self, step, **stats):
            if step == nan_step:
                with torch.no_grad():
                    next(self.objects["G"].parameters()).fill_(float("nan"))
            return nan_end_step(self, step, **stats)
        patch(common.Run, "end_step", nan_end_step_)

    if env.get("PROBE_DATA_FAIL"):
        data_fail_rank, load_dataset_ = int(env["PROBE_DATA_FAIL"]), common._load_dataset

        def failing_load(*a):
            if int(os.environ.get("RANK", "0")) == data_fail_rank:
                raise common.UsageError(f"probe: rank {data_fail_rank} finds no data")
            return load_dataset_(*a)
        patch(common, "_load_dataset", failing_load)

    if env.get("PROBE_NO_CHECKPOINT_ON") and env["PROBE_NO_CHECKPOINT_ON"] == os.environ.get("RANK"):
        exists_ = Path.exists
        patch(Path, "exists", lambda self, *a, **kw: False if self.name == "checkpoint.pt" else exists_(self, *a, **kw))

    if env.get("PROBE_NO_READ_ON") and env["PROBE_NO_READ_ON"] == os.environ.get("RANK"):
        def unreadable(path, script):
            raise common.UsageError(f"probe: checkpoint {path} cannot be read here")
        patch(common, "load_checkpoint", unreadable)

    if env.get("PROBE_SLOW_DATA"):
        slow_load_ = common._load_dataset

        def slow_load(*a):
            if int(os.environ.get("RANK", "0")) == 0:
                import time
                time.sleep(float(env["PROBE_SLOW_DATA"]))
            return slow_load_(*a)
        patch(common, "_load_dataset", slow_load)

    if env.get("PROBE_SLOW_START"):
        evaluator_init = common.Evaluator.__init__

        def slow_evaluator_init(self, *a, **kw):
            import time
            time.sleep(float(env["PROBE_SLOW_START"]))
            evaluator_init(self, *a, **kw)
        patch(common.Evaluator, "__init__", slow_evaluator_init)

    if env.get("PROBE_DUMP"):
        restore, finish = common.Run.restore, common.Run.finish

        def dump(self, name):
            states = {k: {n: t.detach().cpu().clone() for n, t in v.state_dict().items()}
                      for k, v in self._probe_objects.items() if k in ("G", "D")}
            torch.save(states, Path(env["PROBE_DUMP"]) / f"{name}{self.rank}.pt")

        def keep_objects(self, data, **objects):
            self._probe_objects = objects
            batches = restore(self, data, **objects)
            dump(self, "start")  # the states training starts from (after --resume's loading)
            return batches

        def dump_then_finish(self):
            dump(self, "rank")
            return finish(self)
        patch(common.Run, "restore", keep_objects)
        patch(common.Run, "finish", dump_then_finish)


if __name__ == "__main__":
    install(os.environ)
    importlib.import_module(sys.argv[1]).main(sys.argv[2:])
