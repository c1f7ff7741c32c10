"""Every run option is declared once, in its part, and reaches the component that part configures."""
import dataclasses, typing
from hrda.config import PARTS, TrainConfig, narrow
from hrda.core import ConfigError

def variants(value, tp):
    "Candidate non-default values of an option, by its default and type."
    args = typing.get_args(tp)
    if isinstance(value, bool): return [not value]
    if typing.get_origin(tp) is typing.Literal: return [a for a in args if a != value]
    if isinstance(value, int): return [value + 1, value * 2, 1]
    if isinstance(value, float): return [value / 2, 0.5, 0.25, 1.0, value + 1]
    if isinstance(value, str): return [value + "_x", "cityscapes", "gta"]
    if isinstance(value, (tuple, list)) and value: return [type(value)(v * 2 if not isinstance(v, float) else v / 2 for v in value),
                                                   type(value)(v // 2 if isinstance(v, int) else v for v in value)]
    if isinstance(value, dict): return [{"probe": 1}]
    if value is None or isinstance(value, (tuple, list)): return [(64, 64), [1, 2], 0.5, 1, "probe"]
    return []

def test_every_option_is_declared_once_and_reaches_its_part():
    base, hints = TrainConfig(), typing.get_type_hints(TrainConfig)
    names = [f.name for part in PARTS.values() for f in dataclasses.fields(part)]
    shared = {n for n in names if names.count(n) > 1}
    assert shared == {"num_classes"}  # the model's and self-training's class count: one key, so they cannot disagree
    assert len(set(names)) == len(dataclasses.fields(TrainConfig))
    unreached = []
    for part in PARTS.values():
        for f in dataclasses.fields(part):
            default = getattr(base, f.name)
            for value in variants(default, hints[f.name]):
                try: cfg = dataclasses.replace(base, **{f.name: value})
                except (ConfigError, ValueError, TypeError): continue
                if getattr(cfg, f.name) != default: break
            else:
                unreached.append(f"{f.name} (no valid other value)"); continue
            got = getattr(narrow(part, cfg), f.name)
            if got != getattr(cfg, f.name): unreached.append(f.name)
            others = [p.__name__ for p in PARTS.values() if p is not part and f.name not in shared and
                      any(getattr(narrow(p, cfg), g.name) != getattr(narrow(p, base), g.name) for g in dataclasses.fields(p))]
            if others: unreached.append(f"{f.name} also changes {others}")
    assert not unreached, unreached
