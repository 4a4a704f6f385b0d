"""The public one-call API: swap a model's linears for QuantLinear, switch quantization on/off, tell
the layers which timestep runs, initialise balancing and static ranges, save and load quant params.

    qcfg = QuantConfig.from_yaml("configs/quant/w4a8_qvdit.yaml")
    qmodel = quantize_model(model, qcfg, adapter="stdit")      # in place; returns the model
    calibrate_balancing(qmodel, qcfg, run_calibration)          # act stats -> smoothing / rotation
    set_quant_state(qmodel, weight=True, act=True)
    set_timestep(qmodel, step_index=0, num_steps=100)           # before each sampling step
    save_quant_params(qmodel, qcfg, "logs/run/quant_params.safetensors")

Timesteps reach the layers through `set_timestep` (stage 5: once per sampling step; calibration:
`forward_per_step` runs rows of mixed steps in groups). A step selects two things in every layer:
its timestep range (`calib.timestep_ranges` R: steps split into R equal consecutive groups, each with
its own smoothing scales, static activation ranges and weight ranges) and, with per-timestep-range
bit maps (ViDiT-Q's t20_*/t100_* files), its weight and activation bits.

The quant-params file is safetensors holding every QuantLinear tensor except the base weight and bias
(those come from the model checkpoint), with a JSON header: the resolved config, a table of the
quantized layers (shape, bits, frames, ranges, per-step bits) and the per-range bit maps. Loading
compares them and names what differs.
"""
from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors import safe_open
from torch import nn

from qdiff.adapters import ModelAdapter, get_adapter
from qdiff.balancing import hadamard, smooth_scales
from qdiff.config import QuantConfig
from qdiff.io import save_safetensors_atomic
from qdiff.layers import QuantLinear
from qdiff.quantizers import StaticActQuantizer

FORMAT_VERSION = "1"
# Config sections that change what the quantized model computes (distill/calib only say how it was made).
MODEL_SECTIONS = ("method", "weight", "act", "tqe", "balance", "fp_layers")


class QuantParamsError(ValueError):
    """A quant-params file does not fit the model or config; the message says what differs."""


def quantize_model(model: nn.Module, qconfig: QuantConfig, adapter: str | ModelAdapter | None = None) -> nn.Module:
    """Replace every `nn.Linear` of `model` (in place) by a QuantLinear with its resolved bits.

    Layers in the config's floating-point list, and layers whose weight and activation bits both
    resolve to floating point, stay `nn.Linear`. Quantization starts switched off (the model computes
    exactly what it did); use `set_quant_state`. The adapter names model facts (which layers are
    temporal and how many frames they see); without one every layer is treated as a plain linear.

    With per-timestep-range bit maps (which must hold plan steps 0..N−1 without gaps), a layer whose
    bits differ between ranges gets `step_bits` (its configs take the base bits, or the first quantized
    width if the base is floating point); a layer with the same bits in every range is a plain layer
    at those bits.
    """
    adapter = get_adapter(adapter)
    num_ranges = qconfig.calib.timestep_ranges
    qconfig.check_step_segments()
    segments = qconfig.step_segments()
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    if not targets:
        raise ValueError("quantize_model: the model has no nn.Linear layers to quantize")
    for name, linear in targets:
        base = qconfig.resolve_bits(name)
        step_bits = []
        for low, high in segments:  # merging neighbours with equal bits
            bits = qconfig.resolve_bits(name, low)
            if step_bits and step_bits[-1][2:] == bits:
                step_bits[-1] = (step_bits[-1][0], high, *bits)
            else:
                step_bits.append((low, high, *bits))
        if len(step_bits) == 1:  # the same bits at every plan step
            base, step_bits = step_bits[0][2:], []
        w_widths = [w for w in (base[0], *(segment[2] for segment in step_bits)) if w is not None]
        a_widths = [a for a in (base[1], *(segment[3] for segment in step_bits)) if a is not None]
        if not w_widths and not a_widths:
            continue
        weight_cfg = dataclasses.replace(qconfig.weight, bits=w_widths[0]) if w_widths else None
        act_cfg = dataclasses.replace(qconfig.act, bits=a_widths[0]) if a_widths else None
        tqe = qconfig.tqe if weight_cfg is not None else None
        layer = QuantLinear.from_linear(linear, weight_cfg, act_cfg, tqe=tqe, num_frames=adapter.num_frames_for(name, model),
                                        num_ranges=num_ranges, step_bits=tuple(step_bits))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return model


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """(name, layer) for every QuantLinear of `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


def set_quant_state(model: nn.Module, weight: bool = True, act: bool = True) -> None:
    """Switch weight / activation fake quantization on or off in every QuantLinear."""
    for _, layer in quant_layers(model):
        layer.quant_weight = weight
        layer.quant_act = act


@contextmanager
def quant_state(model: nn.Module, weight: bool, act: bool):
    """`set_quant_state` for the duration of a `with` block; every layer's previous switches restored after."""
    layers = [layer for _, layer in quant_layers(model)]
    before = [(layer.quant_weight, layer.quant_act) for layer in layers]
    set_quant_state(model, weight=weight, act=act)
    try:
        yield
    finally:
        for layer, (w, a) in zip(layers, before):
            layer.quant_weight, layer.quant_act = w, a


def set_timestep(model: nn.Module, step_index: int, num_steps: int) -> None:
    """Tell every layer which sampling step runs (0 = first, noisiest): selects its timestep range and,
    for layers with per-timestep bits, the bits of plan step num_steps − 1 − step_index.

    With R timestep ranges (`calib.timestep_ranges`), steps are split into R equal consecutive groups.
    Raises ValueError when a per-range bit map was made for another number of steps or leaves the step out.
    """
    if not 0 <= step_index < num_steps:
        raise ValueError(f"set_timestep: step_index must be in 0..{num_steps - 1}, got {step_index}")
    plan_step = num_steps - 1 - step_index
    for name, layer in quant_layers(model):
        layer.set_range_index(step_index * layer.num_ranges // num_steps)
        if not layer.step_bits:
            continue
        last = layer.step_bits[-1][1]
        if last != num_steps - 1:
            raise ValueError(f"set_timestep: the per-timestep-range bit map of {name} covers plan steps up to {last} "
                             f"(a {last + 1}-step sampler) but sampling runs {num_steps} steps")
        try:
            layer.select_plan_step(plan_step)
        except ValueError as error:
            raise ValueError(f"set_timestep: sampling step {step_index} of {num_steps}, layer {name}: {error}") from None


def per_step_layers(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    """(name, layer) of the layers whose quantization changes with the sampling step (several timestep ranges, or
    per-timestep bits): what `set_timestep` switches."""
    return [(name, layer) for name, layer in quant_layers(model) if layer.num_ranges > 1 or layer.step_bits]


def step_key(model: nn.Module, step_index: int, num_steps: int) -> tuple:
    """Equal for two steps exactly when `set_timestep` selects the same range and bits in every layer."""
    plan_step = num_steps - 1 - step_index
    return tuple((step_index * layer.num_ranges // num_steps, layer.plan_segment(plan_step))
                 for _, layer in per_step_layers(model))


def forward_per_step(model: nn.Module, steps: Sequence[int], num_steps: int,
                     forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run rows of mixed sampling steps, each with its own step's parameters.

    Args:
        steps: [n] the sampling step (0 = first) of each row.
        forward: row indices (LongTensor [m]) -> output [m, ...] of the model on those rows.
    Rows whose steps share a `step_key` run in one call, after `set_timestep` to their first step.
    Returns the outputs [n, ...] in row order (differentiable).
    """
    groups: dict[tuple, list[int]] = {}
    for row, step in enumerate(steps):
        groups.setdefault(step_key(model, int(step), num_steps), []).append(row)
    outputs, order = [], []
    for rows in groups.values():
        set_timestep(model, int(steps[rows[0]]), num_steps)
        outputs.append(forward(torch.tensor(rows)))
        order += rows
    if len(outputs) == 1:
        return outputs[0]
    return torch.cat(outputs)[torch.argsort(torch.tensor(order))]


@torch.no_grad()
def calibrate_balancing(model: nn.Module, qconfig: QuantConfig, run_calibration: Callable[[], None]) -> None:
    """Initialise channel balancing (and static activation ranges) from calibration forwards.

    `run_calibration()` runs the model on calibration inputs (in floating point). Order, as ViDiT-Q:
    1. activation statistics (momentum of per-channel absmax) on the unbalanced model;
    2. smoothing scales s = max|X|^α / max|W|^(1−α) and/or the Hadamard rotation are installed;
    3. if activations are static, their ranges are observed on the balanced inputs.
    Statistics and static ranges go to the timestep range each forward runs in: with R > 1,
    `run_calibration` must select it (`set_timestep`, or `forward_per_step` for mixed rows), and
    every range must see some rows.
    """
    method = qconfig.balance.method
    static = any(isinstance(layer.act_quantizer, StaticActQuantizer) for _, layer in quant_layers(model))
    set_quant_state(model, weight=False, act=False)
    if method != "none":
        with _observe(model, stats=True, static=False):
            run_calibration()
        for _, layer in quant_layers(model):
            install_balance(layer, qconfig)
    if static:
        with _observe(model, stats=False, static=True):
            run_calibration()


def install_balance(layer: QuantLinear, qconfig: QuantConfig) -> None:
    """Set the layer's smoothing scales (from its recorded `act_absmax`) and/or rotation."""
    method = qconfig.balance.method
    scale = rotation = None
    if method in ("smooth", "smooth_rotate"):
        counts = layer.act_stats_count.view(-1).tolist()
        empty = [r for r, count in enumerate(counts) if count == 0]
        if empty:
            raise RuntimeError(f"install_balance: no activation statistics recorded for timestep range(s) {empty} of "
                               f"{layer.num_ranges} (run calibration first, with rows of every range's steps)")
        stats = layer.act_absmax.view(layer.num_ranges, -1)
        scale = torch.stack([smooth_scales(row, layer.weight, qconfig.balance.alpha) for row in stats])  # [R, d_in]
    if method in ("rotate", "smooth_rotate"):
        rotation = hadamard(layer.in_features, device=layer.weight.device)
    layer.set_balance(smooth_scale=scale, rotation=rotation)


@contextmanager
def _observe(model: nn.Module, stats: bool, static: bool):
    layers = [layer for _, layer in quant_layers(model)]
    quantizers = [l.act_quantizer for l in layers if isinstance(l.act_quantizer, StaticActQuantizer)]
    for layer in layers:
        layer.observe_act_stats = stats
    for q in quantizers:
        q.observing = static
    if static:  # the quantizer only sees inputs while activation quantization is on (observing passes x through)
        set_quant_state(model, weight=False, act=True)
    try:
        yield
    finally:
        for layer in layers:
            layer.observe_act_stats = False
        for q in quantizers:
            q.observing = False
        set_quant_state(model, weight=False, act=False)


@torch.no_grad()
def init_weight_quantizers(model: nn.Module) -> None:
    """Initialise every weight quantizer's range now (grid search on W' + B·A, every timestep range and
    every weight width of per-timestep bits)."""
    for _, layer in quant_layers(model):
        if layer.weight_quantizer is None or layer.folded_weight is not None:
            continue
        for r in range(layer.num_ranges):
            for bits in layer.weight_bit_widths:
                layer.effective_weight(r, bits=bits)


def trainable_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Distillation groups over the whole model: 'tqe' (low-rank terms, frame scales) and 'delta'."""
    groups: dict[str, list[nn.Parameter]] = {"tqe": [], "delta": []}
    for _, layer in quant_layers(model):
        for key, params in layer.trainable_parameters().items():
            groups[key].extend(params)
    return groups


def fold_model(model: nn.Module) -> None:
    """Materialise W_eff once in every weight-quantized layer (inference after distillation)."""
    for _, layer in quant_layers(model):
        if layer.weight_quantizer is not None:
            layer.quant_weight = True
            layer.fold()


# ------------------------------------------------------------------------------ torch.compile
COMPILE_BACKENDS_WITH_OPTIONS = ("inductor",)
# inductor settings that make compiled float math round as eager does (opt-in: they cost some speed); those
# missing from the installed torch are skipped
EXACT_INDUCTOR_OPTIONS = {"emulate_precision_casts": True, "eager_numerics.division_rounding": True}


def _inductor_has(option: str) -> bool:
    import torch._inductor.config as inductor_config

    target = inductor_config
    for part in option.split("."):
        if not hasattr(target, part):
            return False
        target = getattr(target, part)
    return True


def prepare_compile(model: nn.Module, int_act_quant: str = "torch") -> None:
    """Make every quantized layer's host-side state ready, so compiled forwards neither sync nor mutate modules.

    QuantLinear: weight quantizers' and static activation quantizers' "initialised / observed" host mirrors are read
    once now. FP8Linear: torch._scaled_mm is probed on its device (`FP8Linear.prepare`). IntLinear: w_colsum and the
    static range are derived (`IntLinear.prepare`). `int_act_quant` selects the compiled activation quantization of
    IntLinear and FP8Linear layers alike ("torch": plain ops the compiler fuses; "kernel": the Triton kernel as an
    opaque custom op, IEEE division, IntLinear: for dynamic ranges; "fused": that kernel with the producer LayerNorm
    + modulate or GELU computed inside it and approximate division, the fastest measured for IntLinear
    (docs/benchmarks.md); static ranges always use the plain ops). Also raises dynamo's recompile limits: blocks of
    one class share a code object, and mixed-precision layers add guarded variants.
    """
    from qdiff.lowbit.fp8_linear import FP8Linear
    from qdiff.lowbit.int_linear import COMPILE_ACT_QUANT, IntLinear

    if int_act_quant not in COMPILE_ACT_QUANT:
        raise ValueError(f"int_act_quant: expected one of {list(COMPILE_ACT_QUANT)}, got {int_act_quant!r}")
    for module in model.modules():
        if isinstance(module, IntLinear):
            module.prepare()
            module.compile_act_quant = int_act_quant
        elif isinstance(module, FP8Linear):  # probes torch._scaled_mm outside the graph
            module.prepare()
            module.compile_act_quant = int_act_quant
        elif isinstance(module, QuantLinear):
            quantizers = [module.weight_quantizer, *module.step_weight_quantizers.values()]
            for quantizer in quantizers:
                if quantizer is not None:
                    for r in range(quantizer.num_ranges):
                        quantizer.is_initialized(r)
            if isinstance(module.act_quantizer, StaticActQuantizer):
                for r in range(module.act_quantizer.num_ranges):
                    module.act_quantizer.is_observed(r)
    import torch._dynamo.config as dynamo_config

    for name, floor in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 1024),
                        ("accumulated_cache_size_limit", 1024)):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), floor))


def compile_model(model: nn.Module, enabled: bool = True, *, modules: Sequence[nn.Module] | None = None,
                  mode: str | None = None, fullgraph: bool = True, dynamic: bool = False, backend: str = "inductor",
                  exact: bool = False, int_act_quant: str = "torch", **adapter_kwargs) -> nn.Module:
    """torch.compile a (quantized) model for inference, in place; returns the model.

    Each of `modules` (default: the model itself; a model with a ``compile_blocks`` method, such as STDiT, is handed
    to it, which compiles its blocks) is compiled with ``nn.Module.compile``: names, state dicts and hooks stay as
    they were. QuantLinear, IntLinear and their Triton kernels compile without graph breaks: the kernels are opaque
    custom ops (`qdiff.kernels.ops`) and per-token activation quantization is plain torch ops that the compiler fuses
    into the producing op. `prepare_compile` runs first.

    mode: torch.compile mode (None = "default"; "max-autotune-no-cudagraphs" tries Triton GEMM templates too).
    fullgraph: raise on a graph break instead of splitting. dynamic: False = static shapes (recompile per shape).
    backend: "inductor", or "aot_eager" / "eager" for debugging. exact: inductor rounds float intermediates and
    divides as eager does (``EXACT_INDUCTOR_OPTIONS``; slower). int_act_quant: see `prepare_compile`.
    enabled=False: every module runs eagerly again. Compilation itself happens at each module's first call.
    """
    if modules is None and callable(getattr(model, "compile_blocks", None)):
        return model.compile_blocks(enabled, mode=mode, fullgraph=fullgraph, backend=backend, exact=exact,
                                    int_act_quant=int_act_quant, **adapter_kwargs)
    if adapter_kwargs:
        raise TypeError(f"compile_model: unexpected arguments {sorted(adapter_kwargs)}")
    modules = [model] if modules is None else list(modules)
    if not enabled:
        for module in modules:
            module._compiled_call_impl = None  # what nn.Module.compile sets
        return model
    prepare_compile(model, int_act_quant)
    kwargs = compile_options(mode=mode, fullgraph=fullgraph, dynamic=dynamic, backend=backend, exact=exact)
    for module in modules:
        module.compile(**kwargs)
    return model


def compile_options(mode: str | None = None, fullgraph: bool = True, dynamic: bool = False, backend: str = "inductor",
                    exact: bool = False) -> dict:
    """The torch.compile keywords that `compile_model` passes for these arguments (see there)."""
    kwargs = dict(fullgraph=fullgraph, dynamic=dynamic, backend=backend)
    if exact and backend in COMPILE_BACKENDS_WITH_OPTIONS:
        import torch._inductor

        options = dict(torch._inductor.list_mode_options(mode, dynamic)) if mode else {}
        options.update({key: value for key, value in EXACT_INDUCTOR_OPTIONS.items() if _inductor_has(key)})
        kwargs["options"] = options
    elif mode is not None:
        kwargs["mode"] = mode
    return kwargs


# ------------------------------------------------------------------------------ save / load
def _layer_table(model: nn.Module) -> dict[str, dict]:
    table = {}
    for name, layer in quant_layers(model):
        table[name] = {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "w_bits": layer.weight_cfg.bits if layer.weight_cfg else None,
            "a_bits": layer.act_cfg.bits if layer.act_cfg else None,
            "num_frames": layer.num_frames,
            "num_ranges": layer.num_ranges,
            "folded": layer.folded_weight is not None,
        }
        if layer.step_bits:  # only then: files of layers without per-step bits keep their table
            table[name]["step_bits"] = [list(segment) for segment in layer.step_bits]
    return table


def quant_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every QuantLinear tensor except its base weight/bias (which the model checkpoint holds), on the CPU; keys as
    in `model.state_dict()`, so `model.load_state_dict(state, strict=False)` puts them back."""
    state = {}
    for name, layer in quant_layers(model):
        for key, value in layer.state_dict().items():
            if key in ("weight", "bias") or value is None:
                continue
            state[f"{name}.{key}"] = value.detach().cpu().contiguous()
    return state


def save_quant_params(model: nn.Module, qconfig: QuantConfig, path, overwrite: bool = False) -> Path:
    """Write the quant params of `model` as safetensors with a JSON header (atomic)."""
    meta = {
        "format": "qdiff-quant-params",
        "format_version": FORMAT_VERSION,
        "config": json.dumps(qconfig.to_dict(), sort_keys=True),
        "layers": json.dumps(_layer_table(model), sort_keys=True),
        "bit_ranges": json.dumps(qconfig.range_maps(), sort_keys=True),
    }
    return save_safetensors_atomic(quant_state_dict(model), path, metadata=meta, overwrite=overwrite)


def read_quant_params_header(path) -> dict:
    """-> dict(config=..., layers=..., bit_ranges=...) from a quant-params file's header."""
    path = Path(path)
    if not path.is_file():
        raise QuantParamsError(f"quant params not found: {path} (run the calibration stage first)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise QuantParamsError(f"{path} is not a safetensors quant-params file: {exc}") from None
    if meta.get("format") != "qdiff-quant-params":
        raise QuantParamsError(f"{path} is not a qdiff quant-params file (header has no format 'qdiff-quant-params')")
    return {"config": json.loads(meta["config"]), "layers": json.loads(meta["layers"]),
            "bit_ranges": json.loads(meta.get("bit_ranges", "{}"))}


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Leaf-by-leaf differences of two nested config dicts, as "a.b: file has X, current has Y" lines."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: file has {a!r}, current has {b!r}")
    return out


def load_quant_params(model: nn.Module, qconfig: QuantConfig, path) -> None:
    """Load quant params saved by `save_quant_params` into a model quantized with `qconfig`.

    Refuses (QuantParamsError naming the differences) a file made for other layers / bits / method.
    Folded files load into a model that is folded the same way (call `fold_model` first).
    """
    header = read_quant_params_header(path)
    saved_cfg = {k: header["config"].get(k) for k in MODEL_SECTIONS}
    current_cfg = {k: qconfig.to_dict().get(k) for k in MODEL_SECTIONS}
    diffs = config_differences(saved_cfg, current_cfg)
    diffs += config_differences(header["bit_ranges"], qconfig.range_maps(), "per-range bit map ")
    saved_layers, current_layers = header["layers"], _layer_table(model)
    missing = sorted(set(saved_layers) - set(current_layers))
    extra = sorted(set(current_layers) - set(saved_layers))
    if missing:
        diffs.append(f"{len(missing)} quantized layer(s) in the file are not in the model, e.g. {missing[:3]}")
    if extra:
        diffs.append(f"{len(extra)} quantized layer(s) of the model are not in the file, e.g. {extra[:3]}")
    for name in sorted(set(saved_layers) & set(current_layers)):
        diffs += config_differences(saved_layers[name], current_layers[name], f"{name}.")
    if diffs:
        shown = "\n  ".join(diffs[:12]) + (f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else "")
        raise QuantParamsError(f"{path} was made for another model or config:\n  {shown}")

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, layer in quant_layers(model):
        prefix = name + "."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        expected = {k for k in layer.state_dict() if k not in ("weight", "bias")}
        absent = sorted(k for k in expected if k not in own and getattr(layer, k, None) is not None)
        if absent:
            raise QuantParamsError(f"{path}: layer {name} lacks tensors {absent}")
        own.update({k: v for k, v in layer.state_dict().items() if k in ("weight", "bias")})
        layer.load_state_dict(own, strict=False)
        if layer._rotate:
            layer.set_balance(smooth_scale=layer.smooth_scale, rotation=hadamard(layer.in_features, device=layer.act_absmax.device))
