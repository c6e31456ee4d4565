"""Which process this is, by Lightning's own global rank (its public ``rank_zero_only.rank``).

Lightning sets it on import from RANK, LOCAL_RANK or SLURM_PROCID (right under torchrun and srun),
and to the global rank when a Trainer sets its world ranks: only from then on is it right on the
first process of another node that Lightning launches itself (NODE_RANK=1, no RANK). Callers that
prepare shared folders therefore ask after building their Trainer.
"""

from __future__ import annotations

from pytorch_lightning.utilities import rank_zero_only


def is_global_zero() -> bool:
    """True on the one process that writes shared outputs and prints."""
    rank: int = rank_zero_only.rank  # type: ignore[attr-defined]  # an attribute Lightning sets on the function
    return rank == 0
