"""Export a flow-matching ensemble (training/flow.py) as a `flow_ensemble` policy bundle.

One ONNX graph computes exactly what `vigil.training.flow.plan` computes, in one `session.run`:

    inputs   state        (batch, obs_dim)    float32  raw observation (the graph standardises it with the
                                                       ensemble's stored mean/std; the manifest has no
                                                       `normalisation`, so the runtime feeds it as is)
             image        (batch, S, S, 3)    uint8    vision configs only (cfg.image_size = S > 0): the
                                                       camera frame as the robot sends it; the graph
                                                       divides by 255 and runs the members' CNNs
             instruction  (batch, instr_dim)  float32  instruction embedding (the bundle's encoder)
             noise        (batch, N, H, m)    float32  N = cfg.vfd_samples standard-normal start states
             prefix       (batch, H, m)       float32  RTC bundles only (docs/rtc.md): the executing chunk's
                                                       remaining actions on the new chunk's indices
             prefix_weight (batch, H)         float32  RTC only: the weight of each index (guided: the soft
                                                       mask; trained: >= 0.5 marks the given prefix)
    outputs  action       (batch, H, m)       float32  member 0's Euler sample from noise[:, 0] (the chunk
                                                       `plan` returns)
             vfd          (batch,)            float32  one-way VFD with cfg.vfd_pairs
             rnd          (batch,)            float32  bundles exported with density heads (training/density.py):
                                                       RND on member 0's context, for the failure monitor

RTC graphs (`export_onnx(..., rtc=...)`, reference `flow.plan_rtc`) add two inputs, and either guidance
towards the prefix with a hand-written vector-Jacobian product of the velocity head (no autograd in the
legacy exporter) or, for an ensemble trained with RTC, the prefix written into the states at every step.

Inside: encode once (M contexts; for vision the members' CNNs over the frame are part of it), add the
time embedding of every grid time once, then the 11 points of the VFD grid (`flow.vfd_grid`: the 10
Euler times plus 0.95) unrolled; at each point every member's velocity is evaluated on every integrating
member's states in one batched call. With one member (no pairs) the 0.95 point is skipped: it only feeds
the score. The noise axis order differs from `plan`'s (N, B, H, m): the runtime feeds a leading batch
axis on every input (docs/bundles.md §3), so the graph transposes it.

The bundle folder holds policy.onnx, manifest.json and `encoder/` (a copy of the instruction-encoder
bundle, named by manifest `extra.encoder`).
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vigil.policies.manifest import Manifest, write_bundle
from vigil.policies.rtc import guidance_weight
from vigil.training.export import OPSET, _tup, provenance
from vigil.training.flow import (
    IMAGE,
    RTC_MODES,
    STATE,
    Ensemble,
    FlowConfig,
    StackedLinear,
    member_pairs,
    spread_positions,
    time_features,
    vfd_grid,
)
from vigil.wire.protocol import ArraySpec

ENCODER_DIR = "encoder"
PREFIX, PREFIX_WEIGHT = "prefix", "prefix_weight"  # the RTC graphs' extra inputs (docs/rtc.md)
DENSITY_SCORES = ("rnd",)  # the density heads' output in the graph (training/density.py; docs/failure.md §1)
_STRUCTURE = ("obs_dim", "instr_dim", "action_dim", "horizon", "hidden", "depth", "time_features", "members",
              "shared_encoder", "euler_steps", "image_size", "image_channels", "image_features", "rtc_max_delay")


def _lin(layer: StackedLinear, x: Tensor) -> Tensor:
    """StackedLinear as plain broadcasting MatMul (+ Add): x (L, *rest, in) -> (max(L, K), *rest, out).
    StackedLinear's bmm path expands the (K, in, out) weights to the batch, which onnxruntime executes as a
    copy of every weight on every call; MatMul broadcasts them instead. Same products, same sums."""
    rest = x.shape[1:-1]
    y = torch.matmul(x.reshape(x.shape[0], -1, x.shape[-1]), layer.weight)
    if layer.bias is not None:
        y = y + layer.bias
    return y.reshape(y.shape[0], *rest, y.shape[-1])


class PlanGraph(nn.Module):
    """`flow.plan` as a traceable forward(state, instruction, noise (B, N, H, m)) -> (chunk, vfd), with the
    grid loop unrolled and the pair bookkeeping turned into constant indices. Mirrors Ensemble.encode,
    .condition and .velocity_from layer for layer (tests/test_flow_export.py checks it against `plan`);
    the time embedding of the fixed grid is a constant computed here, once, by the ensemble itself."""

    def __init__(self, ensemble: Ensemble, pairs: str, rtc: str | None = None, rtc_beta: float = 5.0,
                 density: nn.Module | None = None):
        super().__init__()
        self.ens = ensemble.eval()
        self.density = density.eval() if density is not None else None
        cfg = ensemble.cfg
        M = ensemble.members
        if rtc not in (None, *RTC_MODES):
            raise ValueError(f"rtc must be None or one of {RTC_MODES}, got {rtc!r}")
        if rtc == "trained" and ensemble.prefix_in is None:
            raise ValueError("rtc='trained' needs an ensemble trained with RTC (cfg.rtc_max_delay > 0)")
        self.rtc, self.rtc_beta = rtc, float(rtc_beta)
        self.pairs = member_pairs(M, pairs)
        self.integrators = sorted({a for a, _ in self.pairs} | {0})
        I = len(self.integrators)
        pos = {a: i for i, a in enumerate(self.integrators)}
        # v is (M, I, S, B, D) flattened to (M * I, ...): integrator i's own velocity is row integrators[i] * I + i
        self.register_buffer("own_idx", torch.tensor([a * I + i for i, a in enumerate(self.integrators)]),
                             persistent=False)
        self.pair_idx = [b * I + pos[a] for a, b in self.pairs]  # rows of acc (M * I, S, B) per pair
        ts, dts, ws = vfd_grid(cfg.euler_steps)
        if not self.pairs:  # no score: the extra 0.95 point would only move x past the sample
            ts, dts, ws = ts[:-1], dts[:-1], ws[:-1]
        self.ts, self.dts, self.ws = ts, dts, ws
        with torch.no_grad():  # condition() minus the context: (M, G, 1, hidden), one row per grid time
            grid = torch.tensor(ts, dtype=torch.float32).reshape(1, -1, 1)
            temb = ensemble.t_in(time_features(grid, ensemble.freqs))
        self.register_buffer("temb", temb.expand(M, *temb.shape[1:]).contiguous(), persistent=False)
        # guided RTC: the grid's guidance weights (constants) and the integrators' transposed weights for the
        # hand-written VJP, last layer first: out (I, D, h), head[-1] ... head[0] (I, h, h), x_in (I, h, D)
        self.guidance = [guidance_weight(t, self.rtc_beta) for t in ts[:cfg.euler_steps]]
        if rtc == "guided":
            idx = torch.tensor(self.integrators)
            with torch.no_grad():
                layers = [ensemble.x_in, *ensemble.head, ensemble.out]
                backward = [layer.weight[idx].transpose(1, 2).contiguous() for layer in reversed(layers)]
            for j, wt in enumerate(backward):
                self.register_buffer(f"vjp_w{j}", wt, persistent=False)
            self.n_vjp = len(backward)

    def vjp(self, pre: list[Tensor], e: Tensor) -> Tensor:
        """(dv/dx)^T e for each integrator's own velocity head, by hand (the legacy exporter cannot trace
        autograd). pre: the own rows' pre-activations of the head's silu layers, first layer first, each
        (I, S * B, h); e (I, S * B, D). Backward through out, then each silu layer (silu'(z) = s (1 + z (1 - s)),
        s = sigmoid(z)) and its linear map, ending with x_in (the context and time terms do not depend on x)."""
        g = e
        for j, z in enumerate(reversed(pre)):
            g = torch.matmul(g, getattr(self, f"vjp_w{j}"))       # through the linear map above z
            s = torch.sigmoid(z)
            g = g * (s * (1 + z * (1 - s)))                        # through silu at z
        return torch.matmul(g, getattr(self, f"vjp_w{self.n_vjp - 1}"))  # through x_in

    def forward(self, state: Tensor, instruction: Tensor, noise: Tensor) -> tuple[Tensor, ...]:
        return self.plan(state, None, instruction, noise)

    def plan(self, state: Tensor, image: Tensor | None, instruction: Tensor, noise: Tensor,
             prefix: Tensor | None = None, prefix_weight: Tensor | None = None) -> tuple[Tensor, ...]:
        """The whole plan; image (B, S, S, 3) uint8 for vision ensembles, None otherwise; prefix (B, H, m) and
        prefix_weight (B, H) for RTC graphs (`flow.plan_rtc` is the reference)."""
        ens, cfg = self.ens, self.ens.cfg
        n, M, I, D = cfg.euler_steps, ens.members, len(self.integrators), cfg.chunk_dim
        x0 = noise.transpose(0, 1).flatten(-2)              # (S, B, D), plan's layout
        S = x0.shape[0]
        z = torch.cat([(state - ens.obs_mean) / ens.obs_std, instruction], dim=-1)[None]
        if image is not None:                                # Ensemble.encode's image branch
            img = ens.image_encoder
            f = F.silu(_lin(img.proj, img.conv_features(image)))  # (K, B, image_features)
            z = torch.cat([z.expand(f.shape[0], -1, -1), f], dim=-1)
        for layer in ens.encoder:                            # encode: once per plan
            z = F.silu(_lin(layer, z))
        ctx = _lin(ens.context_proj, z)                      # (M, B, h)
        extra = ()                                           # RND on member 0's context (docs/failure.md)
        if self.density is not None:
            extra = (self.density.rnd(self.density.standardise(ctx[0])),)
        keep = free = y = w = None
        if self.rtc is not None:
            y = prefix.flatten(1)                            # (B, D)
            w = spread_positions(prefix_weight, cfg.action_dim)       # (B, D)
        if self.rtc == "trained":                            # the mask conditions every member, once per plan
            mask = (prefix_weight >= 0.5).to(torch.float32)  # (B, H)
            ctx = ctx + _lin(ens.prefix_in, mask[None])
            keep = spread_positions(mask, cfg.action_dim) > 0.5        # (B, D)
            free = 1.0 - spread_positions(mask, cfg.action_dim)
        ctx = ctx[:, None]                                   # (M, 1, B, h)
        x = x0[None].expand(I, *x0.shape)                    # (I, S, B, D): every integrator from the same noise
        acc, sample = None, None
        for k, (dt, wk) in enumerate(zip(self.dts, self.ws)):
            if keep is not None:
                x = torch.where(keep, y, x)                  # the given prefix, at every step
            cond = self.temb[:, k:k + 1] + ctx               # condition(ctx, t_k): (M, 1, B, h)
            pre = [_lin(ens.x_in, x.reshape(1, I * S, -1, D)) + cond]
            h = F.silu(pre[0])
            for layer in ens.head:
                pre.append(_lin(layer, h))
                h = F.silu(pre[-1])
            v = _lin(ens.out, h).reshape(M * I, S, -1, D)   # every member on every integrator's states
            v_own = v.index_select(0, self.own_idx)          # (I, S, B, D)
            step = v_own
            if self.rtc == "guided" and k < n:               # step with v + c J^T (W * (Y - A1))
                t = self.ts[k]
                e = w * (y - (x + (1 - t) * v_own))          # (I, S, B, D)
                own = [p.reshape(M * I, -1, p.shape[-1]).index_select(0, self.own_idx) for p in pre]
                jv = self.vjp(own, e.reshape(I, -1, D)).reshape(e.shape)
                step = v_own + self.guidance[k] * (e + (1 - t) * jv)
            if wk > 0 and self.pairs:
                d = (v.reshape(M, I, S, -1, D) - v_own[None]).square()
                d = (wk * dt) * (d if free is None else d * free).sum(-1)
                d = d.reshape(M * I, S, -1)
                acc = d if acc is None else acc + d
            if k == n - 1:
                sample = x[0, 0] + step[0, 0] / n            # integrator 0 is member 0; first noise sample
                if keep is not None:
                    sample = torch.where(keep, y, sample)
            if k < n:
                x = x + dt * step
        chunk = sample.reshape(-1, cfg.horizon, cfg.action_dim)
        if self.pairs:
            score = torch.stack([acc[j] for j in self.pair_idx]).mean(0).mean(0)
        else:
            score = torch.zeros_like(state[:, 0])
        return (chunk, score, *extra)


class VisionPlanGraph(PlanGraph):
    """PlanGraph with the camera frame as a second observation input: forward(state, image (B, S, S, 3)
    uint8, instruction, noise). A subclass rather than an optional argument, so each graph's inputs are
    exactly the tracer's positional arguments."""

    def forward(self, state: Tensor, image: Tensor, instruction: Tensor, noise: Tensor) -> tuple[Tensor, ...]:
        return self.plan(state, image, instruction, noise)


class RtcPlanGraph(PlanGraph):
    """PlanGraph with the RTC inputs: forward(state, [image,] instruction, noise, prefix (B, H, m),
    prefix_weight (B, H)); the image only for vision configs (`graph_inputs` gives the order)."""

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if self.ens.cfg.vision:
            state, image, instruction, noise, prefix, weight = inputs
        else:
            (state, instruction, noise, prefix, weight), image = inputs, None
        return self.plan(state, image, instruction, noise, prefix, weight)


def graph_inputs(cfg: FlowConfig, rtc: str | None = None) -> list[str]:
    """The plan graph's input names, in order: state, [image,] instruction, noise, [prefix, prefix_weight]."""
    rtc_inputs = [PREFIX, PREFIX_WEIGHT] if rtc else []
    return [STATE] + ([IMAGE] if cfg.vision else []) + ["instruction", "noise"] + rtc_inputs


def export_onnx(ensemble: Ensemble, cfg: FlowConfig, rtc: str | None = None, rtc_beta: float = 5.0,
                density: nn.Module | None = None) -> bytes:
    """The plan graph as ONNX bytes (legacy exporter, opset OPSET, dynamic batch axis); rtc None, "guided" or
    "trained" adds the inputs prefix and prefix_weight (docs/rtc.md); `density` (training/density.py's heads)
    adds the output rnd."""
    if rtc is not None:
        module = RtcPlanGraph(ensemble, cfg.vfd_pairs, rtc, rtc_beta, density).eval()
    else:
        module = (VisionPlanGraph if cfg.vision else PlanGraph)(ensemble, cfg.vfd_pairs, density=density).eval()
    outputs = ["action", "vfd", *(DENSITY_SCORES if density is not None else ())]
    N, H, m, S = cfg.vfd_samples, cfg.horizon, cfg.action_dim, cfg.image_size
    image = (torch.zeros(2, S, S, 3, dtype=torch.uint8),) if cfg.vision else ()
    rtc_in = (torch.zeros(2, H, m), torch.zeros(2, H)) if rtc else ()
    example = (torch.zeros(2, cfg.obs_dim), *image, torch.zeros(2, cfg.instr_dim), torch.zeros(2, N, H, m), *rtc_in)
    names = graph_inputs(cfg, rtc)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # Python ints from shapes: fixed by design
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter, chosen (dynamo=False)
        torch.onnx.export(module, example, buf, input_names=names,
                          output_names=outputs, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True,
                          dynamic_axes={k: {0: "batch"} for k in (*names, *outputs)})
    return buf.getvalue()


def export_flow_ensemble(folder: str | Path, ensemble: Ensemble, cfg: FlowConfig, encoder_folder: str | Path | None,
                         name: str, *, execute: int | None = None, monitor: Mapping[str, Any] | None = None,
                         prov: Mapping[str, Any] | None = None, action_low: Sequence[float] = (-1,) * 4,
                         action_high: Sequence[float] = (1,) * 4, control_rate_hz: float = 80.0,
                         rtc: str | None = None, rtc_beta: float = 5.0, density: nn.Module | None = None) -> Manifest:
    """Write a `flow_ensemble` bundle to `folder`: policy.onnx (see the module docstring), manifest.json and
    the instruction encoder copied from `encoder_folder` into `folder/encoder`.

    cfg: the ensemble's config; its `vfd_pairs` picks the pair convention of the exported score (it may
    differ from ensemble.cfg's, nothing else that shapes the graph may).
    encoder_folder: None writes no encoder (the bundle's user feeds the instruction embedding itself; tests).
    execute: actions executed per chunk before replanning; default H // 2 (4 of 8 at 80 Hz: a fresh plan,
    and a fresh VFD score for the monitor, every 50 ms, for a plan that costs well under a millisecond).
    monitor: the manifest's `monitor` map, e.g. {"vfd": {"thresholds": {...}, "window": 3}}; a bare VFD
    block (a map with `thresholds`) is taken as monitor.vfd.
    prov: added to the provenance (cfg, member count, pair convention, parameter count are always there).
    rtc: real-time chunking (docs/rtc.md): None (a plain plan), "guided" (inference-time guidance towards the
    prefix, max guidance weight rtc_beta) or "trained" (needs cfg.rtc_max_delay > 0); the graph then takes
    `prefix` (B, H, m) and `prefix_weight` (B, H), described by manifest `extra.rtc`.
    density: the density heads on member 0's context (training/density.py): one more scalar output, `rnd`,
    reported to the monitors beside `vfd` (docs/failure.md; logpZO stays offline: it did not earn its cost).
    """
    for f in _STRUCTURE:
        if getattr(cfg, f) != getattr(ensemble.cfg, f):
            raise ValueError(f"cfg.{f} = {getattr(cfg, f)!r} but the ensemble was built with "
                             f"{getattr(ensemble.cfg, f)!r}")
    if rtc not in (None, *RTC_MODES):
        raise ValueError(f"rtc must be None or one of {RTC_MODES}, got {rtc!r}")
    if rtc == "trained" and cfg.rtc_max_delay < 1:
        raise ValueError("rtc='trained' needs an ensemble trained with RTC (cfg.rtc_max_delay > 0), got "
                         f"rtc_max_delay = {cfg.rtc_max_delay}")
    if rtc == "guided" and not 0 < rtc_beta < float("inf"):
        raise ValueError(f"rtc_beta must be a finite number > 0, got {rtc_beta!r}")
    H, m = cfg.horizon, cfg.action_dim
    if len(action_low) != m or len(action_high) != m:
        raise ValueError(f"action_low/high must have {m} numbers each, got {len(action_low)} and {len(action_high)}")
    execute = max(1, H // 2) if execute is None else int(execute)
    if not 1 <= execute <= H:
        raise ValueError(f"execute must be in 1..{H}, got {execute}")
    if monitor and "thresholds" in monitor:
        monitor = {"vfd": dict(monitor)}

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    enc_dst = folder / ENCODER_DIR
    if enc_dst.exists():
        shutil.rmtree(enc_dst)
    if encoder_folder is not None:
        from vigil.policies.instructions import InstructionEncoder

        shutil.copytree(encoder_folder, enc_dst)
        enc = InstructionEncoder.load(enc_dst)  # verifies the copy (sha256s) and its width
        if enc.dim != cfg.instr_dim:
            raise ValueError(f"the encoder embeds into {enc.dim} dimensions, the ensemble expects {cfg.instr_dim}")

    if density is not None and density.cfg.dim != cfg.hidden:
        raise ValueError(f"the density heads take contexts of width {density.cfg.dim}, the ensemble's are {cfg.hidden}")
    onnx_bytes = export_onnx(ensemble, cfg, rtc, rtc_beta, density)
    n_params = sum(p.numel() for p in ensemble.parameters())
    observation = [ArraySpec(STATE, "float32", (cfg.obs_dim,))]
    if cfg.vision:  # the camera frame goes to the graph as the robot sends it: uint8, no normalisation
        observation.append(ArraySpec(IMAGE, "uint8", (cfg.image_size, cfg.image_size, 3)))
    base = {"method": "flow_matching_ensemble", "config": dataclasses.asdict(cfg), "members": cfg.members,
            "shared_encoder": cfg.shared_encoder, "vfd_pairs": cfg.vfd_pairs, "parameters": n_params,
            "torch": torch.__version__, "chunk_from": "member 0, noise sample 0 (training.flow.plan)"}
    extra: dict[str, Any] = {"instruction_input": "instruction", "noise_input": "noise",
                             "noise_shape": [cfg.vfd_samples, H, m], "encoder": ENCODER_DIR,
                             "members": cfg.members, "vfd_pairs": cfg.vfd_pairs, "euler_steps": cfg.euler_steps}
    if encoder_folder is None:
        del extra["encoder"]
    if rtc is not None:
        extra["rtc"] = rtc_manifest(rtc, cfg, rtc_beta)
    manifest: dict[str, Any] = {
        "name": name, "kind": "flow_ensemble",
        "observation": [spec.to_dict() for spec in observation],
        "action": ArraySpec("action", "float32", (m,), _tup(action_low), _tup(action_high)).to_dict(),
        "safe_action": [0.0] * m, "control_rate_hz": float(control_rate_hz),
        "onnx": {"inputs": {spec.name: spec.name for spec in observation}, "action": "action",
                 "scores": ["vfd", *(DENSITY_SCORES if density is not None else ())]},
        "chunk": {"length": H, "execute": execute},
        "provenance": provenance(**{**base, **dict(prov or {})}),
        "monitor": dict(monitor or {}),
        "extra": extra,
    }
    return write_bundle(folder, onnx_bytes, manifest)


def rtc_manifest(rtc: str, cfg: FlowConfig, rtc_beta: float = 5.0) -> dict[str, Any]:
    """Manifest `extra.rtc` of an RTC bundle: the mode, the graph's input names, and the mode's parameter
    (the max guidance weight for "guided", the largest delay trained on for "trained")."""
    block: dict[str, Any] = {"mode": rtc, "prefix_input": PREFIX, "weight_input": PREFIX_WEIGHT}
    if rtc == "guided":
        block["max_guidance"] = float(rtc_beta)
    else:
        block["max_delay"] = int(cfg.rtc_max_delay)
    return block
