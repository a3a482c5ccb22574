"""DDP: two gloo processes train a step together and rank 0 alone saves one checkpoint
(issue 3, acceptance 2)."""

from __future__ import annotations

import os
import socket
from dataclasses import replace

import torch
import torch.multiprocessing as mp

from splitdet.shared.checkpoint import read_checkpoint
from splitdet.training.presets import TINY


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist

    from splitdet.training.train import train

    try:
        train(replace(TINY, epochs=1, eval_every=0), data, out, progress=False, max_iters=1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_process_gloo_run_trains_and_saves_one_checkpoint(tmp_path):
    from support import make_tiny_voc

    data = make_tiny_voc(tmp_path / "voc", n_defective=4, n_free=0)
    out = tmp_path / "run"
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(out)), nprocs=2, join=True)
    checkpoints = sorted(p.name for p in out.glob("*.pt"))
    assert checkpoints == ["last.pt"]
    checkpoint = read_checkpoint(out / "last.pt")
    assert checkpoint["epoch"] == 0
    assert checkpoint["history"][0]["iters"] == 1
    assert not any(k.startswith("module.") for k in checkpoint["model"])
