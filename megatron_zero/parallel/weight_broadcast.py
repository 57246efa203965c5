"""A process group between one trainer rank and SGLang server ranks, outside the trainer's own world.

Why: disaggregated rollout engines run on GPUs of their own and take new weights by NCCL broadcast from the
trainer (SGLang's ``/init_weights_update_group`` + ``/update_weights_from_distributed``). The servers are not
part of the Megatron world, so the group cannot come from ``torch.distributed.new_group``: both sides build it
from the same TCP rendezvous, independently of any default group. The server side is SGLang 0.5.23's
``init_custom_process_group`` (srt/utils/common.py): rendezvous on ``tcp://address:port`` (rank 0 hosts the
store), the store prefixed with the group name, then torch's ``_new_process_group_helper`` with an empty rank
list (a group of its own, not a subgroup), global ranks mapped to themselves. The trainer side must make the
same calls, or the two sides look for each other under different store keys and wait until the timeout. Both
sides must run the same torch version (the helper is private API; its store layout and NCCL must match).

How (trainer rank 0, while the servers join as ranks 1..world_size-1)::

    group = init_weight_broadcast_group("10.0.0.1", 29650, rank=0, world_size=1 + n_server_ranks,
                                        backend="nccl", timeout_s=600, group_name=WEIGHT_GROUP_NAME)
    torch.distributed.broadcast(tensor, src=0, group=group)
"""

from __future__ import annotations

import datetime
import threading
from typing import Optional

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


def init_weight_broadcast_group(master_address: str, master_port: int, rank: int, world_size: int, *,
                                backend: str, timeout_s: float, group_name: str,
                                abandoned: Optional[threading.Event] = None) -> dist.ProcessGroup:
    """Join (rank 0: host) the group ``group_name`` of ``world_size`` processes rendezvousing at the address.
    ``abandoned``: set by `abandon_rendezvous` when the caller gave up waiting; no group is then built."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if group_name in c10d._world.pg_names.values():
        raise ValueError(f"a process group named {group_name!r} already exists in this process; destroy it first")
    if dist.is_initialized() and dist.distributed_c10d._get_default_group().bound_device_id is not None:
        # torch would then build the NCCL communicator by splitting the trainer's world, which the servers are
        # not part of: the rendezvous could never complete.
        raise RuntimeError("the default process group is bound to a device (init_process_group(device_id=...)); "
                           "a weight broadcast group with servers outside it cannot be split from it")
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                                   timeout=timeout))
    if abandoned is not None and abandoned.is_set():
        raise RuntimeError(f"the weight broadcast group at {master_address}:{master_port} was given up before it "
                           "formed")
    store.set_timeout(timeout)
    group, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend),
                                              c10d.PrefixStore(group_name, store), group_name=group_name,
                                              backend_options=None, timeout=timeout)
    # Ranks of this group are its own global ranks: broadcast(src=0, group=group) means the trainer.
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def destroy_weight_broadcast_group(group: dist.ProcessGroup) -> None:
    dist.destroy_process_group(group)


def abandon_rendezvous(master_address: str, master_port: int, world_size: int, abandoned: threading.Event,
                       joining: threading.Thread, wait_s: float = 10.0) -> None:
    """End rank 0's wait in `init_weight_broadcast_group` (run by ``joining``) after a peer failed to join.

    Why: rank 0 hosts the rendezvous store, whose constructor waits in C++, with the GIL released, for world_size - 1
    peers to connect, up to the group's timeout (minutes). A thread still waiting there when the interpreter exits
    wakes during finalization; Python 3.12 ends it with pthread_exit, whose unwinding cannot pass torch's C++ frames,
    and the process aborts (seen in CI: every test passed, then exit 134). So the peers that will not come are
    stood in for: clients connect to the store, its wait ends, and the thread, seeing ``abandoned``, returns."""
    abandoned.set()
    stand_ins = []
    for _ in range(world_size - 1):
        if not joining.is_alive():
            break
        try:
            stand_ins.append(dist.TCPStore(master_address, master_port, world_size, is_master=False,
                                           timeout=datetime.timedelta(seconds=wait_s)))
        except (RuntimeError, dist.DistStoreError):  # the store is gone, or never came up: nothing waits on it
            break
    joining.join(wait_s)
    del stand_ins  # kept connected until the wait they end is over
