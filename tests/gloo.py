"""Two (or more) gloo processes on the CPU for the distributed tests: a free port, and the
process group of one worker as a context manager (one thread per process: the machine has few)."""
import contextlib
import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_group(rank: int, world: int, port: int):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield dist
    finally:
        dist.destroy_process_group()
