"""The replayed training step (every draw made first, fixed buffers; on CUDA a captured graph) against the eager step:
the same weights, teacher, logs and random stream, for every kind of model and self-training setting."""
import pytest
import torch

from hrda.core import make_generator
from hrda.dacs import DACSConfig, dacs_step, read_logs
from hrda.optim import build_optimizer, set_lr_
from hrda.replay import ReplayStep, draw_step
from hrda.segmentor import tiny_segmentor

CUDA = torch.cuda.is_available() and torch.cuda.device_count() > 0


def batch(seed: int, size: int = 128, n_classes: int = 4, device: str = "cpu") -> dict:
    "Two source and two target images with blocky labels, and the label values the training loader would list."
    g = make_generator(seed)
    gt = torch.randint(0, n_classes, (2, 2, 2), generator=g).repeat_interleave(size // 2, 1).repeat_interleave(size // 2, 2)
    gt[:, :4] = 255  # some ignored pixels, as real labels have
    out = dict(img=torch.randn(2, 3, size, size, generator=g), gt=gt, target_img=torch.randn(2, 3, size, size, generator=g),
               valid_pseudo_mask=torch.ones(2, size, size), source_classes=torch.unique(gt).tolist())
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}


def run(mode: str, cfg: DACSConfig, model_kw: dict, iters: int = 3, amp_dtype=None, fd: bool = False, device: str = "cpu"):
    "(student, teacher, logs, generator) after `iters` iterations: eager, replayed, or replayed as a CUDA graph."
    torch.manual_seed(0)  # dropout and DropPath
    if device == "cuda": torch.cuda.manual_seed(0)
    student = tiny_segmentor(0, **model_kw).to(device)
    teacher = tiny_segmentor(1, **model_kw).to(device).requires_grad_(False)
    imnet = tiny_segmentor(2, **model_kw).to(device).requires_grad_(False).eval() if fd else None
    opt, g = build_optimizer(student, 1e-3, capturable=mode != "eager"), make_generator(0, "train")
    step = ReplayStep(student, teacher, imnet, opt, cfg, amp_dtype, graph=mode == "graph", warmup=1)
    logs = []
    for t in range(iters):
        set_lr_(opt, t, 1e-3, max_iters=10, warmup_iters=2)
        b = batch(t, device=device)
        out = dacs_step(student, teacher, imnet, opt, b, t, g, cfg, amp_dtype) if mode == "eager" else step(b, t, g)
        logs.append(out.logs)
    return student, teacher, read_logs(logs), g


CASES = {  # name: (DACSConfig options, model options, autocast dtype, FD model)
    "hrda": (dict(fd_lambda=0), {}, None, False),
    "hrda_fd": (dict(fd_lambda=0.005, fd_classes=(1, 2)), {}, None, True),
    "hrda_mic": (dict(fd_lambda=0, mic_lambda=1.0, mic_block_size=32), {}, None, False),
    "hrda_mic_separate": (dict(fd_lambda=0, mic_lambda=1.0, mic_block_size=32, mic_mode="separate"), {}, None, False),
    "daformer": (dict(fd_lambda=0), dict(single_scale=0.5), None, False),
    "source_only": (dict(fd_lambda=0, self_training=False), {}, None, False),
    "hrda_bf16": (dict(fd_lambda=0), {}, torch.bfloat16, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_replayed_step_equals_eager_step_bit_for_bit(case):
    opts, model_kw, amp_dtype, fd = CASES[case]
    cfg = DACSConfig(num_classes=4, **opts)
    eager, replayed = (run(mode, cfg, model_kw, amp_dtype=amp_dtype, fd=fd) for mode in ("eager", "replay"))
    for part in (0, 1):
        for (name, a), b in zip(eager[part].state_dict().items(), replayed[part].state_dict().values()):
            assert torch.equal(a, b), f"{case}: {'student' if part == 0 else 'teacher'} {name} differs"
    assert eager[2] == replayed[2], case  # every logged value
    assert torch.equal(eager[3].get_state(), replayed[3].get_state())  # the random stream is where the eager step leaves it
    if "mic" in case: assert "masked.decode.loss_seg" in replayed[2][-1]


def test_draws_follow_the_steps_random_stream():
    "The draws use the generator exactly as the eager step does, so a run can switch modes at any iteration."
    cfg, model = DACSConfig(num_classes=4, fd_lambda=0, mic_lambda=1.0, mic_block_size=32), tiny_segmentor(0)
    g1, g2 = make_generator(3), make_generator(3)
    draw_step(model, batch(0), 4, g1, cfg)
    dacs_step(model, tiny_segmentor(1).requires_grad_(False), None, build_optimizer(model), batch(0), 4, g2, cfg)
    assert torch.equal(g1.get_state(), g2.get_state())


def flat_weights(*models: torch.nn.Module) -> torch.Tensor:
    "Every parameter of the models as one float32 vector."
    return torch.cat([p.detach().float().flatten() for m in models for p in m.parameters()])


def shadowed_run(device: str, graph: bool, amp_dtype=None, iters: int = 4) -> list[tuple[float, float]]:
    """A replayed run in which, before each iteration, a copy of its state (student, teacher, optimiser, both random
    streams) takes the same iteration eagerly: per iteration, how far apart the losses are (relative) and how far apart
    the weight updates are (relative to the eager update's size)."""
    import copy
    cfg = DACSConfig(num_classes=4, fd_lambda=0, mic_lambda=1.0, mic_block_size=32)
    cuda = device == "cuda"
    get_rng, set_rng = (torch.cuda.get_rng_state, torch.cuda.set_rng_state) if cuda else (torch.get_rng_state, torch.set_rng_state)
    torch.manual_seed(0)
    student, teacher = tiny_segmentor(0).to(device), tiny_segmentor(1).to(device).requires_grad_(False)
    opt, g = build_optimizer(student, 1e-3, capturable=True), make_generator(0, "train")
    step = ReplayStep(student, teacher, None, opt, cfg, amp_dtype, graph=graph, warmup=1)
    gaps = []
    for t in range(iters):
        set_lr_(opt, t, 1e-3, max_iters=10, warmup_iters=2)
        b = batch(t, device=device)
        s2, t2 = copy.deepcopy(student), copy.deepcopy(teacher)
        opt2 = build_optimizer(s2, 1e-3, capturable=True)
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # loading alone would share the moment tensors
        g2, rng, before = make_generator(0, "train"), get_rng(), flat_weights(student, teacher)
        g2.set_state(g.get_state())
        replayed_logs = read_logs([step(b, t, g).logs])[0]
        set_rng(rng)  # dropout draws the same masks again
        eager_logs = read_logs([dacs_step(s2, t2, None, opt2, b, t, g2, cfg, amp_dtype).logs])[0]
        assert replayed_logs.keys() == eager_logs.keys()
        assert torch.equal(g.get_state(), g2.get_state())  # the host stream advanced the same
        update_r, update_e = flat_weights(student, teacher) - before, flat_weights(s2, t2) - before
        gaps.append((max(abs(replayed_logs[k] - eager_logs[k]) / max(1.0, abs(eager_logs[k])) for k in eager_logs),
                     ((update_r - update_e).norm() / update_e.norm()).item()))
    return gaps


def test_shadowed_replay_matches_each_eager_iteration_exactly():
    "The check the CUDA graph test makes, on the CPU with the replayed step: every iteration equals its eager copy's."
    assert shadowed_run("cpu", graph=False) == [(0.0, 0.0)] * 4


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_cuda_graph_step_equals_eager_step(amp_dtype):
    """The captured graph, replayed, computes the eager step: at each iteration (0: the eager warm-up on a side stream,
    1: the capture and first replay, 2-3: replays) its losses agree with an eager copy's to rounding (the forward pass is
    deterministic on CUDA) and its weight update within 1 % of the update's size (the backward's atomic adds make the
    update irreproducible on CUDA, eager or not, and AdamW divides by the gradient's size)."""
    gaps = shadowed_run("cuda", graph=True, amp_dtype=amp_dtype)
    print(f"\n{amp_dtype}: per iteration, (losses, updates) apart: " + ", ".join(f"({a:.3g}, {b:.3g})" for a, b in gaps))
    rounding = 1e-5 if amp_dtype is None else 1e-3
    assert all(loss_gap <= rounding and update_gap <= 0.01 for loss_gap, update_gap in gaps), gaps


def test_replayed_step_of_a_ddp_student_equals_the_eager_one():
    "A DistributedDataParallel student (a one-process gloo group) replays like the unwrapped eager student."
    import warnings
    import torch.distributed as dist
    cfg = DACSConfig(num_classes=4, fd_lambda=0, mic_lambda=1.0, mic_block_size=32)

    def two_iterations(wrap, replay):
        torch.manual_seed(0)
        student, teacher = tiny_segmentor(0), tiny_segmentor(1).requires_grad_(False)
        opt, g = build_optimizer(student, 1e-3, capturable=replay), make_generator(0, "train")
        step = ReplayStep(wrap(student), teacher, None, opt, cfg)
        for t in range(2):
            b = batch(t)
            step(b, t, g) if replay else dacs_step(wrap(student), teacher, None, opt, b, t, g, cfg)
        return [*student.state_dict().values(), *teacher.state_dict().values()]

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Grad strides do not match")  # a layout note of DDP's buckets
            replayed = two_iterations(torch.nn.parallel.DistributedDataParallel, True)
    finally: dist.destroy_process_group()
    for a, b in zip(two_iterations(lambda m: m, False), replayed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # DDP averages gradients in its own buckets
