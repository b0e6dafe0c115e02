"""Where this process stands among the processes torchrun launched, read from its environment
in one place (``cdiff train`` and ``cdiff translate`` both run under torchrun).

torchrun sets RANK (this process among all), WORLD_SIZE (how many) and LOCAL_RANK (this
process on its machine: the GPU it uses), and MASTER_ADDR / MASTER_PORT for the rendezvous.
Without them the run is one process: rank 0 of 1. LOCAL_RANK, if missing, is RANK (one machine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def require_rendezvous(self, why: str) -> None:
        """Raise unless torchrun's rendezvous address is set (a process group needs it)."""
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(f"WORLD_SIZE > 1 but {name} is not set: launch with torchrun {why}")


def launch() -> Launch:
    """This process's rank, the world size and its local rank, from torchrun's environment."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as err:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {err}") from err
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return Launch(rank, world, local)
