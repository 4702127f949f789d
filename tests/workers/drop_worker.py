"""One rank that builds trainers one after another and drops each (tests/test_train.py).

argv[1] is JSON: {"runs": [[override, ...], ...], "out": dir}. Each run builds a Trainer (the tiny config plus its
overrides), takes two steps, saves, and is dropped; then nothing may keep its engine or its model: no DeepSpeedEngine
or PeftModel this rank made is alive after a collection, and none of its modules is on DeepSpeed's module stack.
Last, ``train()`` runs once and must leave nothing either (it releases the engine as it returns). Exits non-zero,
naming what stayed, otherwise.
"""

from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path

from dist_lora.config import load_config
from dist_lora.distributed import init_distributed, shutdown
from dist_lora.train import Trainer, train
from tests.dist_utils import TINY


def _models() -> list[object]:
    from deepspeed.runtime.engine import DeepSpeedEngine
    from peft import PeftModel

    return [o for o in gc.get_objects() if isinstance(o, (DeepSpeedEngine, PeftModel))]


BEFORE: set[int] = set()  # what the process held before the runs (a rank forked from pytest inherits its models)


def engines_alive() -> list[str]:
    """The engines and PEFT models this rank made that are still alive, and what is on DeepSpeed's module stack."""
    from deepspeed.runtime.zero.parameter_offload import FWD_MODULE_STACK

    gc.collect()
    alive = [type(o).__name__ for o in _models() if id(o) not in BEFORE]
    return alive + [f"{type(m).__name__} on FWD_MODULE_STACK" for m in FWD_MODULE_STACK if id(m) not in BEFORE]


def main() -> None:
    args = json.loads(sys.argv[1])
    out = Path(args["out"])
    init_distributed(need_group=True)
    from deepspeed.runtime.zero.parameter_offload import FWD_MODULE_STACK

    BEFORE.update(id(o) for o in [*_models(), *FWD_MODULE_STACK])
    for i, overrides in enumerate(args["runs"]):
        trainer = Trainer(load_config(TINY, [*overrides, f"checkpoint.dir={out / f'run-{i}'}"]))
        trainer.train_step()
        trainer.train_step()
        trainer.save()
        trainer.close()
        trainer.checkpointer.release_lease()
        engine, model = weakref.ref(trainer.backend.model), weakref.ref(trainer.backend.model.module)
        del trainer
        gc.collect()  # collects the backend, whose release takes DeepSpeed's hold off the engine...
        gc.collect()  # ...which the next collection frees (as Python's collector would on its own, soon after)
        assert engine() is None and model() is None, f"run {i} ({overrides}) is kept alive: {engines_alive()}"
        assert not engines_alive(), engines_alive()
    train(load_config(TINY, [*args["runs"][-1], f"checkpoint.dir={out / 'train'}"]))  # shuts the group down
    assert not engines_alive(), f"train() left {engines_alive()}"
    shutdown()


if __name__ == "__main__":
    main()
