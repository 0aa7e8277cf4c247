"""A small ResNet-style backbone with convops layers, trained on synthetic data, optionally
under DistributedDataParallel.

Stages: a stem, two stages of DepthwiseSeparableConv2d residual blocks, and a last stage whose
3x3 convolution is a ModulatedDeformConv2dPack (DCNv2), as in ResNet-50-DCN.

Single process (CPU or one GPU):
    python examples/dcn_backbone.py --steps 20
DDP on CPU with gloo, 2 processes:
    torchrun --nproc_per_node 2 examples/dcn_backbone.py --backend gloo --steps 20
DDP on GPUs with NCCL, one process per GPU:
    torchrun --nproc_per_node 8 examples/dcn_backbone.py --backend nccl --device cuda --steps 100
"""
import argparse
import gc
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import convops


class SeparableBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = convops.DepthwiseSeparableConv2d(channels, channels, 3, padding=1,
                                                     bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(x + self.bn(self.conv(x)))


class DCNBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = convops.ModulatedDeformConv2dPack(channels, channels, 3, padding=1,
                                                      bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(x + self.bn(self.conv(x)))


class Backbone(nn.Module):
    def __init__(self, num_classes=10, width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = SeparableBlock(width)
        self.down = convops.DepthwiseSeparableConv2d(width, 2 * width, 3, stride=2, padding=1)
        self.stage2 = SeparableBlock(2 * width)
        self.stage3 = DCNBlock(2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        x = self.stage3(x)
        return self.head(x.mean((2, 3)))


def synthetic_batch(step, batch, device, rank=0, world=1):
    """The global batch for a step (same on every rank), and this rank's shard of it."""
    g = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(batch, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)
    shard = slice(rank * batch // world, (rank + 1) * batch // world)
    return images[shard].to(device), labels[shard].to(device)


def train(steps, batch, device, ddp=False):
    """Trains a freshly seeded model; returns it (unwrapped) after `steps` SGD steps."""
    torch.manual_seed(0)
    model = Backbone().to(device)
    # BatchNorm statistics would differ between one process and a split batch; eval-mode BN
    # keeps the comparison exact while every conv still trains.
    model.apply(lambda m: m.eval() if isinstance(m, nn.BatchNorm2d) else None)
    nn.init.normal_(model.stage3.conv.conv_offset.weight, std=0.05)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for step in range(steps):
        images, labels = synthetic_batch(step, batch, device, rank, world)
        loss = F.cross_entropy(net(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16, help="global batch size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=["gloo", "nccl"], help="run under DDP (torchrun)")
    p.add_argument("--save", help="write the final state_dict here (rank 0)")
    args = p.parse_args()
    device = args.device
    if args.backend:
        dist.init_process_group(args.backend)
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    model = train(args.steps, args.batch, device, ddp=bool(args.backend))
    if args.save and (not args.backend or dist.get_rank() == 0):
        torch.save(model.state_dict(), args.save)
    if args.backend:
        # Free the training's leftover cycles (autograd hooks, futures) while the group is
        # alive: left to the interpreter's exit, they were destroyed after it and aborted
        # the process ("terminate called without an active exception") in ~1 run in 25.
        del model
        gc.collect()
        # every rank finishes (and rank 0 has saved) before the process group is torn down;
        # tearing gloo down while a peer is still sending aborts the process
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
