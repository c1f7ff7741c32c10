"""Two-process CPU checks of data-parallel training, started by tests/test_train.py as
`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py DATA_ROOT OUT_DIR`.

1. One step of the DDP student (gloo, synchronised BatchNorm) on a fixed global batch of 2 samples, 1 per process,
   against one process taking the same step on both samples; rank 0 writes the differences to OUT_DIR/step.json.
2. Short `hrda.train` runs on the synthetic benchmark in OUT_DIR/train (HRDA self-training, stopped and resumed)
   and OUT_DIR/fixed (fixed attention: an idle attention head, so DDP must find unused parameters).
"""
import copy
import json
import sys
from pathlib import Path

import torch

from hrda.core import make_generator, seed_everything
from hrda.config import load_config
from hrda.dacs import DACSConfig, dacs_step
from hrda.distributed import init_distributed, unwrap, wrap_ddp
from hrda.optim import param_groups
from hrda.segmentor import build_segmentor
from hrda.train import IterationSampler, build_datasets, collate_tensors, train
from hrda.config import TrainConfig, narrow
from hrda.segmentor import TINY_MODEL, SegmentorConfig

# The shared tiny model on the tiny benchmark (64x128 images), 32-px detail crops; test_train.py uses the same settings.
WIDE_HEADS = {"channels": 32, "embed_dims": 32}  # twice the tiny model's: the smoke run must learn within 40 iterations
SMALL = dict(TINY_MODEL, source="gta", target="cityscapes", source_scale=None, target_scale=None, crop_size=[64, 64],
             hr_crop_size=[32, 32], pseudo_margins=None, rcs_min_pixels=10, head_kwargs=WIDE_HEADS,
             attention_head_kwargs=WIDE_HEADS, test_crop_size=[64, 128], lr=1e-3, warmup_iters=0, workers=0, threads=1,
             tensorboard=False, progress=False, log_every=1, keep_checkpoints=0)


def step_check(data: Path, out: Path, rank: int, world: int):
    # Deterministic across the split: source only (the teacher's BatchNorm would use each process's own target
    # images, and ClassMix draws classes from each process's own labels); detail crop = context crop (a random detail
    # box comes from each process's generator, while one process draws one box for its whole batch); no dropout (its
    # masks are drawn per process). Synchronised BatchNorm sees the global batch, and DDP's gradient average over
    # equal shards equals the loss mean over the global batch. The step is plain SGD with the training's parameter
    # groups: AdamW's first step lr·g/(|g|+eps) turns float noise on near-zero gradients into visible weight changes,
    # while an SGD update is linear in the gradient, so equal gradients give equal weights to float precision.
    no_drop = {"channels": 32, "embed_dims": 32, "dropout": 0.0}
    cfg = load_config(TrainConfig, overrides={
        **SMALL, "source_root": str(data / "source"), "target_root": str(data / "target"), "self_training": False,
        "hr_crop_size": [64, 64], "head_kwargs": no_drop, "attention_head_kwargs": no_drop})
    pairs, _ = build_datasets(cfg)
    batch = collate_tensors([pairs[i] for i in IterationSampler(0, 1, batch_size=world)])  # the global batch of t = 0
    local = {k: v[rank:rank + 1] for k, v in batch.items()}  # what process `rank` gets from IterationSampler(B=1)
    seed_everything(cfg.seed)
    model = build_segmentor(narrow(SegmentorConfig, cfg))
    initial, reference = copy.deepcopy(model.state_dict()), copy.deepcopy(model)
    dcfg = DACSConfig(self_training=False, fd_lambda=0.0)
    ddp = wrap_ddp(model, torch.device("cpu"))
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    sgd = lambda m: torch.optim.SGD(param_groups(m, lr=0.1, weight_decay=0.0))
    dacs_step(ddp, None, None, sgd(unwrap(ddp)), local, 0, make_generator(0, "train", rank), dcfg)
    if rank == 0:
        dacs_step(reference, None, None, sgd(reference), batch, 0, make_generator(0, "train"), dcfg)
        after, ref = unwrap(ddp).state_dict(), reference.state_dict()
        params = [n for n, _ in reference.named_parameters()]
        buffers = [k for k in ref if k not in params and ref[k].is_floating_point()]
        grads = {n: p.grad for n, p in unwrap(ddp).named_parameters()}
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}
        diff = lambda a, b, keys: max((a[k] - b[k]).abs().max().item() for k in keys)
        result = {"keys_equal": list(after) == list(ref),
                  "grad_diff": diff(grads, ref_grads, params),  # the averaged gradient vs the global-batch one
                  "grad_max": max(g.abs().max().item() for g in ref_grads.values()),
                  "param_diff": diff(after, ref, params), "param_update": diff(ref, initial, params),
                  "buffer_diff": diff(after, ref, buffers), "buffer_update": diff(ref, initial, buffers)}
        (out / "step.json").write_text(json.dumps(result))


def train_runs(data: Path, out: Path):
    roots = {"source_root": str(data / "source"), "target_root": str(data / "target")}
    cfg = load_config(TrainConfig, overrides={**SMALL, **roots, "iters": 4, "eval_every": 0, "checkpoint_every": 0,
                                              "out_dir": str(out / "train")})
    train(cfg, resume=False, stop_after=2)
    train(cfg)  # resumes at 2 in both processes
    fixed = load_config(TrainConfig, overrides={**SMALL, **roots, "iters": 2, "fixed_attention": 0.5,
                                                "out_dir": str(out / "fixed")})
    train(fixed, resume=False)
    mic = load_config(TrainConfig, overrides={**SMALL, **roots, "iters": 2, "mic_lambda": 1.0, "mic_block_size": 16,
                                              "out_dir": str(out / "mic")})
    train(mic, resume=False)  # masked image consistency: one more forward and backward per iteration under DDP


if __name__ == "__main__":
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    rank, world = init_distributed(torch.device("cpu"))
    step_check(data, out, rank, world)
    train_runs(data, out)
    torch.distributed.destroy_process_group()
