"""DDP with gloo, 2 CPU processes, trains the example DCN backbone to the same weights as one
process on the whole batch."""
import os
import socket
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import dcn_backbone  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single_process(tmp_path):
    steps, batch = 3, 8
    single = dcn_backbone.train(steps, batch, "cpu").state_dict()
    out = tmp_path / "ddp.pt"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", env["MASTER_PORT"],
           os.path.join(ROOT, "examples", "dcn_backbone.py"), "--backend", "gloo",
           "--steps", str(steps), "--batch", str(batch), "--save", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = torch.load(out)
    assert set(ddp) == set(single)
    for name, value in single.items():
        if value.is_floating_point():
            # DDP averages gradients across ranks: equal to the full-batch gradient up to
            # float32 summation order.
            torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-5, msg=name)
    # the deformable layer and its offset predictor really trained
    torch.manual_seed(0)
    initial = dcn_backbone.Backbone().state_dict()
    for name in ("stage3.conv.weight", "stage3.conv.conv_offset.bias", "down.depthwise.weight"):
        assert not torch.equal(single[name], initial[name]), name
