"""Flow-matching action-chunk policy ensemble and the VFD uncertainty score, in torch.

The method: docs/algorithms.md#vfd-velocity-field-disagreement.

One file, CleanRL style: the hyperparameters are `FlowConfig`, the model is `Ensemble`, training is
`train_ensemble`, and every score is a plain function of (ensemble, obs, instr, noise) -> (B,) tensor.
Noise is always an explicit argument, so tests and the ONNX export (which takes noise as an input) are
deterministic.

Flow matching (conditional-OT path, sigma_min = 0). Time runs from t = 0 (noise) to t = 1 (action chunk):
    x_t = (1 - t) x0 + t a,   x0 ~ N(0, I),   target velocity  a - x0,   loss = MSE(v(x_t, t | o), a - x0),
t ~ Uniform[0, 1) during training. Sampling: Euler from t = 0 to 1 with step 1 / euler_steps.

Model. Each member is a full model (no shared trunk) with its own seed; parameters of all members are
stacked along a leading member axis (`StackedLinear`: weight (M, in, out)), so one batched matmul runs
every member at once — the ONNX export integrates all members in one graph the same way. A member is
split in two so the work that depends only on the observation and instruction runs once per plan:
    context = encode(obs, instr)        (M, B, hidden)   once per plan, outside the integration loop
    v       = velocity(context, x_t, t) (M, ..., H*m)    every integration step
`encode` = MLP over [normalised obs, instruction embedding] followed by a per-member linear projection
that is the velocity head's context input; the head's first layer adds it to linear maps of x_t and of
Fourier features of t. `shared_encoder=True` is the method's cheaper variant: one encoder MLP
(leading axis 1, broadcast) and M velocity heads (each with its own context projection).

Vision configuration (cfg.image_size > 0). The observation is then a mapping {"state": (B, obs_dim) float,
"image": (B, S, S, 3) uint8} (S = image_size; the Meta-World corner camera, 64 x 64). A small CNN per
member (`ImageEncoder`: conv 8x8 stride 4 -> conv 4x4 stride 2 -> linear to image_features, SiLU) turns
the image into features that join the normalised state and the instruction at the input of the encoder
MLP. It is part of `encode`, so it runs once per plan, never inside the integration loop. Members' CNNs
are stacked like the linear layers (`StackedConv`: conv groups, one op for every member) and each is
initialised from its member's seed; with shared_encoder one CNN serves all heads. Pixels are converted
to float / 255 inside the model (and inside the exported graph), so images stay uint8 in memory.

Real-time chunking (docs/rtc.md). `plan_rtc` plans a chunk that agrees with a prefix Y of the executing chunk:
"guided" steers any ensemble's Euler steps towards Y (pseudo-inverse guidance, a VJP per step); "trained" is
for ensembles trained with cfg.rtc_max_delay > 0, whose training gives the head the first d actions clean
(`rtc_example`) and tells it which through a prefix mask (`Ensemble.with_prefix`).

Shapes: obs (B, obs_dim), instr (B, instr_dim), chunks (B, H, action_dim); internally a chunk is
flattened to D = H * action_dim. Member-major tensors are (M, S, B, ...) with S a noise-sample axis.
Everywhere `obs` is taken it may also be a mapping {"state": ..., "image": ...} (`Observation`); a
state-only ensemble uses its "state" and ignores the rest.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vigil.policies.rtc import guidance_weight

PAIR_CONVENTIONS = ("lower", "anchor", "ordered")
STATE, IMAGE = "state", "image"  # observation names (sim/metaworld_env.py, training/demos.py, the bundle)
# (kernel, stride) of the image encoder's two convolutions (Atari-DQN-like, scaled to 64 x 64 frames)
IMAGE_CONVS = ((8, 4), (4, 2))
MIN_IMAGE_SIZE = 20  # the smallest square image both convolutions fit on (gives a 1 x 1 map)

Observation = Union[Tensor, np.ndarray, Mapping[str, Tensor | np.ndarray]]  # noqa: UP007 (a runtime alias)


@dataclass(frozen=True)
class FlowConfig:
    """Hyperparameters of the flow ensemble and its training.

    horizon = 8: Meta-World steps at 80 Hz (MuJoCo dt 2.5 ms x frame_skip 5), so a chunk covers 0.1 s.
    The scripted experts are reactive state-feedback controllers, so a short chunk loses nothing in
    expressiveness, keeps the output small (8 x 4 = 32 numbers) and the velocity head cheap, and lets the
    runtime replan often (every k <= 8 steps). 16 (Diffusion Policy's default) is the alternative to
    measure if closed-loop success suffers from jitter between chunks.
    members = 5 is a placeholder: the default will be chosen by measurement (VFD quality vs plan cost,
    issue 4 item 7); the reference setting is M = 2 (docs/algorithms.md#vfd-velocity-field-disagreement).
    """

    obs_dim: int = 39
    instr_dim: int = 384
    action_dim: int = 4
    horizon: int = 8
    hidden: int = 256
    depth: int = 3                 # hidden layers of the encoder MLP and of the velocity head
    time_features: int = 16        # Fourier features of t (sin and cos of time_features // 2 frequencies)
    members: int = 5
    shared_encoder: bool = False   # True: one encoder, M velocity heads (the cheaper variant)
    euler_steps: int = 10
    vfd_samples: int = 1           # N noise samples per VFD score (1 scores as well as 5: decision 71)
    vfd_pairs: str = "anchor"      # which members integrate for one-way VFD, see member_pairs() (decision 71)
    lr: float = 3e-4
    weight_decay: float = 1e-4
    batch_size: int = 256          # per member
    steps: int = 20_000            # optimiser steps; each member reshuffles the data every epoch
    min_obs_std: float = 1e-2      # floor of the per-dimension observation std used to normalise
    seed: int = 0
    image_size: int = 0            # 0: state only; S > 0: also an (S, S, 3) uint8 camera image (vision)
    image_channels: int = 16       # channels of the first conv; the second has twice as many
    image_features: int = 64       # width of the image features joining state and instruction
    rtc_max_delay: int = 0         # training-time RTC: d ~ U{0..rtc_max_delay} committed positions; 0 = off
    density_steps: int = 2000      # the RND (and logpZO) heads of the failure monitor (training/density.py); 0: none

    @property
    def chunk_dim(self) -> int:
        return self.horizon * self.action_dim

    @property
    def vision(self) -> bool:
        return self.image_size > 0


# ----------------------------------------------------------------------------------------------- model


def member_seeds(seed: int, members: int) -> list[tuple[int, int]]:
    """(init seed, data seed) per member, independent streams derived from one seed. Member i's seeds do
    not depend on the ensemble size, so the first two members of an M = 5 ensemble are an M = 2 one."""
    out = []
    for child in np.random.SeedSequence(seed).spawn(members):
        init, data = child.spawn(2)
        out.append((int(init.generate_state(1)[0]), int(data.generate_state(1)[0])))
    return out


class StackedLinear(nn.Module):
    """K independent linear layers: y[k] = x[k] @ W[k] + b[k], weight (K, in, out), bias (K, 1, out).

    x is (L, *rest, in) with L == K or either of them 1 (broadcast): a shared layer (K = 1) runs on every
    member's inputs, and member layers run on inputs shared by all members (L = 1). `members` picks a
    subset of a K > 1 layer (shared layers ignore it)."""

    def __init__(self, k: int, d_in: int, d_out: int, bias: bool = True, shared: bool = False):
        super().__init__()
        self.shared = shared
        self.weight = nn.Parameter(torch.empty(k, d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(k, 1, d_out)) if bias else None

    def forward(self, x: Tensor, members: Sequence[int] | None = None) -> Tensor:
        w, b = self.weight, self.bias
        if members is not None and w.shape[0] > 1:
            w = w[list(members)]
            b = b[list(members)] if b is not None else None
        rest = x.shape[1:-1]
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        k = max(x3.shape[0], w.shape[0])
        if k == 1:  # one member: a plain 2-D matmul is cheaper than a batch of one
            y = torch.mm(x3[0], w[0]) if b is None else torch.addmm(b[0], x3[0], w[0])
            return y.reshape(1, *rest, w.shape[-1])
        x3, w = x3.expand(k, *x3.shape[1:]), w.expand(k, *w.shape[1:])
        y = torch.bmm(x3, w) if b is None else torch.baddbmm(b.expand(k, *b.shape[1:]), x3, w)
        return y.reshape(k, *rest, w.shape[-1])


def time_features(t: Tensor, freqs: Tensor) -> Tensor:
    """Fourier features of t in [0, 1]: [sin(f t), cos(f t)] for each angular frequency f; (..., 2F)."""
    ft = t[..., None] * freqs
    return torch.cat([torch.sin(ft), torch.cos(ft)], dim=-1)


def conv_out(size: int) -> int:
    """Side of the image encoder's last feature map for a square image of side `size`."""
    for kernel, stride in IMAGE_CONVS:
        size = (size - kernel) // stride + 1
    return size


class StackedConv(nn.Module):
    """K independent 2-D convolutions (no padding), weight (K, out, in, k, k), bias (K, out), run as ONE
    conv op. Activations are channel-stacked, x (B, L * in, H, W): stack l's channels are the l-th block
    of `in`, so member stacks ride along the channel axis and a grouped conv (groups = K) runs each
    member's filters on its own stack only.
      L == K  -- groups = K (member-major inputs: training, where each member has its own minibatch);
      L == 1  -- shared input (a plan's one camera frame): the K filter banks concatenated, groups = 1, so
                 the frame is not copied K times;
      K == 1  -- shared weights (shared_encoder): the L stacks fold into the batch axis, no copy.
    Returns (y (B, max(K, L) * out, H', W'), max(K, L)). `members` picks a subset of a K > 1 conv."""

    def __init__(self, k: int, d_in: int, d_out: int, kernel: int, stride: int, shared: bool = False):
        super().__init__()
        self.shared, self.stride = shared, stride
        self.weight = nn.Parameter(torch.empty(k, d_out, d_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(k, d_out))

    def forward(self, x: Tensor, stacks: int, members: Sequence[int] | None = None) -> tuple[Tensor, int]:
        w, b = self.weight, self.bias
        if members is not None and w.shape[0] > 1:
            w, b = w[list(members)], b[list(members)]
        K, d_out, d_in = w.shape[:3]
        if K == 1 and stacks > 1:
            B, _, H, W = x.shape
            y = F.conv2d(x.reshape(B * stacks, d_in, H, W), w[0], b[0], self.stride)
            return y.reshape(B, stacks * d_out, *y.shape[-2:]), stacks
        if stacks not in (1, K):
            raise ValueError(f"{stacks} input stacks for a conv of {K} members")
        groups = K if stacks == K else 1
        return F.conv2d(x, w.reshape(K * d_out, d_in, *w.shape[-2:]), b.reshape(-1), self.stride, 0, 1, groups), K


def image_to_stacks(image: Tensor) -> tuple[Tensor, int]:
    """uint8 images (B, S, S, 3) or member-major (L, B, S, S, 3) -> float (B, L * 3, S, S) in [0, 1]
    channel-stacked for StackedConv, and L (1 for shared images). The /255 is here, in the model (and in
    the exported graph), so images stay uint8 in memory and on the wire."""
    x = image.to(torch.float32) / 255.0
    if x.dim() == 4:
        return x.permute(0, 3, 1, 2), 1
    L, B, S1, S2, C = x.shape
    return x.permute(1, 0, 4, 2, 3).reshape(B, L * C, S1, S2), L


class ImageEncoder(nn.Module):
    """Per-member CNN over the camera frame: conv 8x8/4 (c) -> SiLU -> conv 4x4/2 (2c) -> SiLU -> flatten
    -> linear (image_features) -> SiLU. For 64 x 64 frames the maps are 15 x 15 and 6 x 6: ~1 ms for all
    members per plan on one core, cheap enough to train on CPU."""

    def __init__(self, k: int, cfg: FlowConfig, shared: bool = False):
        super().__init__()
        c = cfg.image_channels
        (k1, s1), (k2, s2) = IMAGE_CONVS
        self.conv1 = StackedConv(k, 3, c, k1, s1, shared=shared)
        self.conv2 = StackedConv(k, c, 2 * c, k2, s2, shared=shared)
        self.flat = 2 * c * conv_out(cfg.image_size) ** 2
        self.proj = StackedLinear(k, self.flat, cfg.image_features, shared=shared)

    def conv_features(self, image: Tensor, members: Sequence[int] | None = None) -> Tensor:
        """uint8 image(s) -> flattened conv features, member-major (K', B, 2c * s * s)."""
        x, stacks = image_to_stacks(image)
        x, stacks = self.conv1(x, stacks, members)
        x, stacks = self.conv2(F.silu(x), stacks, members)
        return F.silu(x).reshape(-1, stacks, self.flat).transpose(0, 1)

    def forward(self, image: Tensor, members: Sequence[int] | None = None) -> Tensor:
        """(B, S, S, 3) or (L, B, S, S, 3) uint8 -> (K', B, image_features)."""
        return F.silu(self.proj(self.conv_features(image, members), members))


class Ensemble(nn.Module):
    """M flow-matching members with stacked parameters; see the module docstring for the split."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        if cfg.vfd_pairs not in PAIR_CONVENTIONS:
            raise ValueError(f"vfd_pairs must be one of {PAIR_CONVENTIONS}, not {cfg.vfd_pairs!r}")
        self.cfg = cfg
        M, h, D = cfg.members, cfg.hidden, cfg.chunk_dim
        k_enc = 1 if cfg.shared_encoder else M
        if cfg.vision and cfg.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be 0 or >= {MIN_IMAGE_SIZE}, not {cfg.image_size}")
        self.image_encoder = ImageEncoder(k_enc, cfg, shared=cfg.shared_encoder) if cfg.vision else None
        enc_in = [cfg.obs_dim + cfg.instr_dim + (cfg.image_features if cfg.vision else 0)] + [h] * (cfg.depth - 1)
        self.encoder = nn.ModuleList([StackedLinear(k_enc, d, h, shared=cfg.shared_encoder) for d in enc_in])
        self.context_proj = StackedLinear(M, h, h)
        self.x_in = StackedLinear(M, D, h)
        self.t_in = StackedLinear(M, cfg.time_features, h, bias=False)
        self.head = nn.ModuleList([StackedLinear(M, h, h) for _ in range(cfg.depth - 1)])
        self.out = StackedLinear(M, h, D)
        # training-time RTC: the prefix mask's columns of the head's first layer (registered last, so the other
        # layers draw the same initial values with RTC on or off; absent when off, so old checkpoints load)
        self.prefix_in = StackedLinear(M, cfg.horizon, h, bias=False) if cfg.rtc_max_delay > 0 else None
        n_freq = cfg.time_features // 2
        self.register_buffer("freqs", math.pi * 2.0 ** torch.linspace(0.0, 5.0, n_freq))
        self.register_buffer("obs_mean", torch.zeros(cfg.obs_dim))
        self.register_buffer("obs_std", torch.ones(cfg.obs_dim))
        self.reset_parameters()

    @property
    def members(self) -> int:
        return self.cfg.members

    def reset_parameters(self) -> None:
        """nn.Linear's default init (U(+-1/sqrt(fan_in))), drawn member by member from each member's own
        seed; the shared encoder, if any, from a seed of its own."""
        gens = [torch.Generator().manual_seed(s) for s, _ in member_seeds(self.cfg.seed, self.members)]
        shared_gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.cfg.seed, 1]).generate_state(1)[0]))
        with torch.no_grad():
            for mod in self.modules():
                if not isinstance(mod, (StackedLinear, StackedConv)):
                    continue
                # fan_in: StackedLinear (K, in, out); StackedConv (K, out, in, k, k) as nn.Conv2d's default
                fan_in = mod.weight.shape[1] if isinstance(mod, StackedLinear) else mod.weight[0, 0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                for j in range(mod.weight.shape[0]):
                    g = shared_gen if mod.shared else gens[j]
                    mod.weight[j].copy_((torch.rand(mod.weight.shape[1:], generator=g) * 2 - 1) * bound)
                    if mod.bias is not None:
                        mod.bias[j].copy_((torch.rand(mod.bias.shape[1:], generator=g) * 2 - 1) * bound)

    def split_obs(self, obs: Observation) -> tuple[Tensor, Tensor | None]:
        """(state, image or None) from an observation: a state tensor/array, or a mapping with "state"
        (and "image", required when cfg.image_size > 0). A state-only ensemble ignores an image; an image
        ensemble refuses a bare state, loudly, rather than plan blind. Tensors pass unchanged."""
        image = None
        if isinstance(obs, Mapping):
            if STATE not in obs:
                raise ValueError(f"the observation mapping has no {STATE!r} (it has {sorted(obs)})")
            state = obs[STATE]
            if self.cfg.vision:
                if IMAGE not in obs:
                    raise ValueError(f"this ensemble is image-conditioned (image_size={self.cfg.image_size}): "
                                     f"the observation mapping needs an {IMAGE!r} (it has {sorted(obs)})")
                image = torch.as_tensor(obs[IMAGE])
                S = self.cfg.image_size
                if image.dtype != torch.uint8 or image.shape[-3:] != (S, S, 3) or image.dim() not in (4, 5):
                    raise ValueError(f"{IMAGE!r} must be uint8 (B, {S}, {S}, 3) or (M, B, {S}, {S}, 3), got "
                                     f"{image.dtype} {tuple(image.shape)}")
        elif self.cfg.vision:
            raise ValueError(f"this ensemble is image-conditioned (image_size={self.cfg.image_size}): pass obs "
                             f"as a mapping {{{STATE!r}: (B, {self.cfg.obs_dim}) float, {IMAGE!r}: (B, "
                             f"{self.cfg.image_size}, {self.cfg.image_size}, 3) uint8}}, not a bare state")
        else:
            state = obs
        if not isinstance(state, Tensor):
            state = torch.as_tensor(np.asarray(state), dtype=torch.float32)
        return state, image

    def set_normalisation(self, obs: Observation) -> None:
        """Per-dimension mean and std of the training states (std floored at cfg.min_obs_std, so
        dimensions that never vary do not divide by zero). Images are not normalised (pixels / 255)."""
        obs = obs[STATE] if isinstance(obs, Mapping) else obs
        obs = torch.as_tensor(obs, dtype=torch.float32).reshape(-1, self.cfg.obs_dim)
        self.obs_mean.copy_(obs.mean(0))
        self.obs_std.copy_(obs.std(0, correction=0).clamp_min(self.cfg.min_obs_std))

    def encode(self, obs: Observation, instr: Tensor, members: Sequence[int] | None = None) -> Tensor:
        """Context of each member: obs (B, obs_dim) or member-major (M, B, obs_dim), instr likewise ->
        (M, B, hidden) (or (len(members), B, hidden)). Depends on obs and instr only: once per plan.
        Vision: obs a mapping whose image is (B, S, S, 3) or member-major (M, B, S, S, 3) uint8; the image
        features join the state and the instruction at the encoder MLP's input."""
        state, image = self.split_obs(obs)
        if not isinstance(instr, Tensor):
            instr = torch.as_tensor(np.asarray(instr), dtype=torch.float32)
        z = torch.cat([(state - self.obs_mean) / self.obs_std, instr], dim=-1)
        if z.dim() == 2:
            z = z[None]
        if image is not None:
            f = self.image_encoder(image, members)  # (K', B, image_features)
            k = max(z.shape[0], f.shape[0])
            z = torch.cat([z.expand(k, *z.shape[1:]), f.expand(k, *f.shape[1:])], dim=-1)
        for layer in self.encoder:
            z = F.silu(layer(z, members))
        return self.context_proj(z, members)  # a shared encoder's (1, B, h) broadcasts to M heads here

    def condition(self, context: Tensor, t: float | Tensor, members: Sequence[int] | None = None) -> Tensor:
        """The part of the velocity head's first layer that does not depend on x_t: context plus the time
        embedding. context (K, B, hidden); t a float or a tensor broadcastable to (K, S, B) -> (K, S, B,
        hidden) (S = 1 for a float). The sampling grid is fixed, so a plan computes it for every grid
        time at once, before the integration loop (t of shape (1, G, 1) -> (K, G, B, hidden))."""
        t = torch.as_tensor(t, dtype=context.dtype)
        if t.dim() == 0:
            t = t.reshape(1, 1, 1)
        return self.t_in(time_features(t, self.freqs), members) + context[:, None]

    def with_prefix(self, context: Tensor, mask: Tensor, members: Sequence[int] | None = None) -> Tensor:
        """Training-time RTC: the context plus the embedding of the prefix mask, mask (K or 1, B, H) with 1 on
        the given (committed) positions. Equivalent to concatenating the mask to x_t at the head's input
        (`prefix_in` holds those extra columns of x_in), but the mask is the same at every Euler step, so
        its term is added once per plan, here, instead of at every step."""
        if self.prefix_in is None:
            raise ValueError("this ensemble was not trained with RTC (cfg.rtc_max_delay = 0)")
        return context + self.prefix_in(mask.to(context.dtype), members)

    def velocity_from(self, cond: Tensor, x: Tensor, members: Sequence[int] | None = None) -> Tensor:
        """v from a precomputed `condition` (K, S or 1, B, hidden) and states x (K or 1, S, B, D)
        (leading 1 = the same states for every member) -> (K, S, B, D). The only per-step work."""
        h = F.silu(self.x_in(x, members) + cond)
        for layer in self.head:
            h = F.silu(layer(h, members))
        return self.out(h, members)

    def velocity(self, context: Tensor, x: Tensor, t: float | Tensor,
                 members: Sequence[int] | None = None) -> Tensor:
        """v(x, t | context): context (K, B, hidden) from `encode`, x (K or 1, S, B, D) flattened chunks,
        t a float or a tensor broadcastable to (K, S, B). Returns (K, S, B, D)."""
        return self.velocity_from(self.condition(context, t, members), x, members)

    def subset(self, members: int) -> Ensemble:
        """The ensemble of the first `members` members, as a new Ensemble (eval mode). Member i's seeds do
        not depend on M (`member_seeds`), so this is the M = members ensemble the same seed would have
        trained: VFD quality against M is measured on one trained ensemble, and a bundle can ship fewer
        members than were trained."""
        if not 1 <= members <= self.members:
            raise ValueError(f"members must be in 1..{self.members}, got {members}")
        sub = Ensemble(dataclasses.replace(self.cfg, members=members))
        state = self.state_dict()
        for name, mod in self.named_modules():
            if isinstance(mod, (StackedLinear, StackedConv)) and not mod.shared:
                for part in ("weight", "bias"):
                    if getattr(mod, part) is not None:
                        state[f"{name}.{part}"] = state[f"{name}.{part}"][:members]
        sub.load_state_dict(state)
        return sub.eval()

    def copy_member(self, src: int, dst: int) -> None:
        """Make member dst's parameters a copy of member src's (tests: identical members)."""
        with torch.no_grad():
            for mod in self.modules():
                if isinstance(mod, (StackedLinear, StackedConv)) and not mod.shared:
                    mod.weight[dst] = mod.weight[src]
                    if mod.bias is not None:
                        mod.bias[dst] = mod.bias[src]


# ------------------------------------------------------------------------------------- flow matching


def ot_path(x0: Tensor, a: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Conditional-OT path with sigma_min = 0: (x_t, target velocity) = ((1 - t) x0 + t a, a - x0).
    t broadcasts against x0 (give it trailing singleton axes)."""
    return (1 - t) * x0 + t * a, a - x0


def euler(field: Callable[[Tensor, float], Tensor], x0: Tensor, steps: int) -> Tensor:
    """Integrate dx/dt = field(x, t) from t = 0 to 1 with `steps` Euler steps of 1 / steps."""
    x = x0
    for k in range(steps):
        x = x + field(x, k / steps) / steps
    return x


def make_chunks(actions: Tensor | np.ndarray, horizon: int) -> Tensor | np.ndarray:
    """Training targets from one episode: actions (T, m) -> chunks (T, H, m), chunk[t, h] = actions[t + h].
    Past the end of the episode the last action is repeated (the expert would keep doing what it did)."""
    T = actions.shape[0]
    idx = np.minimum(np.arange(T)[:, None] + np.arange(horizon)[None, :], T - 1)
    if isinstance(actions, Tensor):
        return actions[torch.from_numpy(idx)]
    return np.asarray(actions)[idx]


# -------------------------------------------------------------------------------------------- scores


def _flat(noise: Tensor, cfg: FlowConfig) -> Tensor:
    return noise.reshape(*noise.shape[:-2], cfg.chunk_dim)


def _chunk(x: Tensor, cfg: FlowConfig) -> Tensor:
    return x.reshape(*x.shape[:-1], cfg.horizon, cfg.action_dim)


def _grid_times(times: Sequence[float]) -> Tensor:
    return torch.tensor(times, dtype=torch.float32).reshape(1, -1, 1)


def _sample_flat(ens: Ensemble, ctx: Tensor, x0: Tensor, members: Sequence[int] | None = None) -> Tensor:
    """Euler samples from x0 (K or 1, S, B, D), the time conditioning computed once for all steps."""
    n = ens.cfg.euler_steps
    conds = ens.condition(ctx, _grid_times([k / n for k in range(n)]), members)  # (K, n, B, h)
    return euler(lambda x, t: ens.velocity_from(conds[:, round(t * n)][:, None], x, members), x0, n)


@torch.no_grad()
def sample_members(ens: Ensemble, obs: Observation, instr: Tensor, noise: Tensor) -> Tensor:
    """Every member's Euler sample (cfg.euler_steps steps), batched over members. noise (N, B, H, m) is
    shared by all members, (M, N, B, H, m) gives each member its own. Returns (M, N, B, H, m)."""
    cfg = ens.cfg
    ctx = ens.encode(obs, instr)
    x0 = _flat(noise, cfg)
    if x0.dim() == 3:
        x0 = x0[None]
    return _chunk(_sample_flat(ens, ctx, x0), cfg)


@torch.no_grad()
def sample(ens: Ensemble, obs: Observation, instr: Tensor, noise: Tensor, member: int = 0) -> Tensor:
    """One member's action chunks: noise (B, H, m) -> (B, H, m), or (N, B, H, m) -> (N, B, H, m)."""
    cfg = ens.cfg
    ctx = ens.encode(obs, instr, members=[member])
    x0 = _flat(noise, cfg)
    x0 = x0[None] if noise.dim() == 3 else x0
    x = _sample_flat(ens, ctx, x0[None], members=[member])[0]
    return _chunk(x[0] if noise.dim() == 3 else x, cfg)


def vfd_grid(euler_steps: int = 10) -> tuple[list[float], list[float], list[float]]:
    """(t_k, dt_k, w(t_k)) of the VFD grid: t_k = k / n for k < n plus 1 - 1/(2n) (n = 10: 0, 0.1, ...,
    0.9, 0.95); dt_k the gap to the next grid time, 1 - t_k for the last; w(t) = t / (1 - t).
    The first n points are exactly the states of the n-step Euler sampler; the extra point splits the
    last step in two, so VFD needs one velocity evaluation more than sampling (n + 1 in all)."""
    n = euler_steps
    ts = [k / n for k in range(n)] + [1 - 1 / (2 * n)]
    dts = [1 / n] * (n - 1) + [1 / (2 * n)] * 2
    return ts, dts, [t / (1 - t) for t in ts]


def member_pairs(members: int, convention: str = "lower") -> list[tuple[int, int]]:
    """(A, B) pairs for one-way VFD with M members: A integrates, B is evaluated on A's states.
      lower   -- every unordered pair once, the lower index integrates: (a, b), a < b (default; M - 1
                 members integrate). For M = 2 every convention but `ordered` is the reference's (0, 1).
      anchor  -- member 0 integrates, compared with every other member: (0, b). Cheapest: one trajectory.
      ordered -- every ordered pair (a, b), a != b: every member integrates. Symmetric in members.
    The score averages the pairs equally."""
    if convention == "lower":
        return [(a, b) for a in range(members) for b in range(a + 1, members)]
    if convention == "anchor":
        return [(0, b) for b in range(1, members)]
    if convention == "ordered":
        return [(a, b) for a in range(members) for b in range(members) if a != b]
    raise ValueError(f"unknown pair convention {convention!r}; one of {PAIR_CONVENTIONS}")


def disagreement(ens: Ensemble, context: Tensor, x0: Tensor, integrators: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Weighted velocity disagreement along the integrators' trajectories on the VFD grid.

    x0 (I, S, B, D): start states of members `integrators` (I of them). Integrator i moves along its own
    velocity; at each grid point every member is evaluated on every integrator's states (one batched
    call). Returns
      acc     (M, I, S, B): sum_k w(t_k) ||v_b(x^i_{t_k}) - v_{a_i}(x^i_{t_k})||^2 dt_k,
      samples (I, S, B, D): each integrator's ordinary Euler sample, x_{0.9} + 0.1 v(x_{0.9}) for n = 10
                            (a free by-product: the grid's first n points are the sampler's states)."""
    n = ens.cfg.euler_steps
    ts, dts, ws = vfd_grid(n)
    I, S, B, D = x0.shape
    own = (torch.as_tensor(list(integrators)), torch.arange(I))
    conds = ens.condition(context, _grid_times(ts))  # (M, n + 1, B, h): once, before the loop
    x, acc, samples = x0, x0.new_zeros(ens.members, I, S, B), None
    for k, (dt, w) in enumerate(zip(dts, ws)):
        v = ens.velocity_from(conds[:, k][:, None], x.reshape(1, I * S, B, D)).reshape(ens.members, I, S, B, D)
        v_own = v[own]
        if w > 0:  # w(0) = 0: the first point only moves the integrators
            acc = acc + (w * dt) * (v - v_own[None]).square().sum(-1)
        if k == n - 1:
            samples = x + v_own / n
        if k < n:
            x = x + dt * v_own
    return acc, samples


@torch.no_grad()
def plan(ens: Ensemble, obs: Observation, instr: Tensor, noise: Tensor,
         pairs: str | None = None) -> tuple[Tensor, Tensor]:
    """What a flow_ensemble bundle computes per plan: encode once, integrate, one-way VFD.
    noise (N, B, H, m). Returns (member 0's chunk from noise[0] (B, H, m), one-way VFD (B,)).
    With M = 1 the score is zero (no pairs)."""
    cfg = ens.cfg
    pair_list = member_pairs(ens.members, pairs or cfg.vfd_pairs)
    integrators = sorted({a for a, _ in pair_list} | {0})
    x0 = _flat(noise, cfg)
    ctx = ens.encode(obs, instr)
    acc, samples = disagreement(ens, ctx, x0[None].expand(len(integrators), *x0.shape), integrators)
    if pair_list:
        pos = {a: i for i, a in enumerate(integrators)}
        score = torch.stack([acc[b, pos[a]] for a, b in pair_list]).mean(0).mean(0)
    else:
        score = acc.new_zeros(acc.shape[-1])
    return _chunk(samples[integrators.index(0), 0], cfg), score


RTC_MODES = ("guided", "trained")


def spread_positions(weight: Tensor, action_dim: int) -> Tensor:
    """Per-position weights (B, H) -> per-element (B, H * m), each repeated over the m action dims."""
    return (weight[..., None] * weight.new_ones(action_dim)).flatten(-2)


def plan_rtc(ens: Ensemble, obs: Observation, instr: Tensor, noise: Tensor, prefix: Tensor, weight: Tensor,
             mode: str, beta: float = 5.0, pairs: str | None = None) -> tuple[Tensor, Tensor]:
    """`plan` with real-time chunking (docs/rtc.md), the torch reference of the RTC bundle graphs.
    prefix Y (B, H, m): the executing chunk's remaining actions on the new chunk's indices; weight W (B, H).

    guided  -- each integrator steps with v + c(tau) J^T (W * (Y - A1)), A1 = x + (1 - tau) v(x),
               J = dA1/dx, c = policies/rtc.py `guidance_weight(tau, beta)`; the VJP by torch.autograd.
    trained -- (an ensemble with cfg.rtc_max_delay > 0) positions with W >= 0.5 are Y at every step and in
               the chunk, and the mask conditions every member (`Ensemble.with_prefix`); their squared
               disagreement is left out of the score (no member was trained to predict them).
    VFD: every member's raw velocity on the anchor's RTC trajectory (the guidance is not a member's opinion).
    Returns (chunk (B, H, m), one-way VFD (B,)) as `plan`."""
    if mode not in RTC_MODES:
        raise ValueError(f"mode must be one of {RTC_MODES}, got {mode!r}")
    cfg = ens.cfg
    n, M, m = cfg.euler_steps, ens.members, cfg.action_dim
    pair_list = member_pairs(M, pairs or cfg.vfd_pairs)
    integrators = sorted({a for a, _ in pair_list} | {0})
    I = len(integrators)
    x0 = _flat(noise, cfg)
    S, B, D = x0.shape
    y = _flat(torch.as_tensor(prefix, dtype=torch.float32), cfg)     # (B, D)
    w = spread_positions(torch.as_tensor(weight, dtype=torch.float32), m)      # (B, D)
    with torch.no_grad():
        ctx = ens.encode(obs, instr)
        keep = None
        if mode == "trained":
            mask = (torch.as_tensor(weight, dtype=torch.float32) >= 0.5).to(torch.float32)  # (B, H)
            ctx = ens.with_prefix(ctx, mask[None])
            keep = spread_positions(mask, m) > 0
        ts, dts, ws = vfd_grid(n)
        conds = ens.condition(ctx, _grid_times(ts))
    own = (torch.as_tensor(integrators), torch.arange(I))
    x = x0[None].expand(I, S, B, D)
    acc, sample = x0.new_zeros(M, I, S, B), None
    for k, (t, dt, wk) in enumerate(zip(ts, dts, ws)):
        if keep is not None:
            x = torch.where(keep, y, x)
        guide = mode == "guided" and k < n
        with torch.set_grad_enabled(guide):
            xg = x.detach().requires_grad_(guide)
            v = ens.velocity_from(conds[:, k][:, None], xg.reshape(1, I * S, B, D)).reshape(M, I, S, B, D)
            v_own = v[own]
            step = v_own
            if guide:
                a1 = xg + (1 - t) * v_own
                e = (w * (y - a1)).detach()
                (g,) = torch.autograd.grad(a1, xg, grad_outputs=e)
                step = v_own + guidance_weight(t, beta) * g
        v, v_own, step = v.detach(), v_own.detach(), step.detach()
        if wk > 0:
            d = (v - v_own[None]).square()
            acc = acc + (wk * dt) * (d if keep is None else d * ~keep).sum(-1)
        if k == n - 1:
            sample = x[integrators.index(0), 0] + step[integrators.index(0), 0] / n
            if keep is not None:
                sample = torch.where(keep, y, sample)
        if k < n:
            x = x.detach() + dt * step
    if pair_list:
        pos = {a: i for i, a in enumerate(integrators)}
        score = torch.stack([acc[b, pos[a]] for a, b in pair_list]).mean(0).mean(0)
    else:
        score = acc.new_zeros(B)
    return _chunk(sample, cfg), score


def plan_guided(ens: Ensemble, obs: Observation, instr: Tensor, noise: Tensor, prefix: Tensor, weight: Tensor,
                beta: float = 5.0, pairs: str | None = None) -> tuple[Tensor, Tensor]:
    """Guided (inference-time) RTC plan, `plan_rtc(..., mode="guided")`."""
    return plan_rtc(ens, obs, instr, noise, prefix, weight, "guided", beta, pairs)


def plan_trained(ens: Ensemble, obs: Observation, instr: Tensor, noise: Tensor, prefix: Tensor, weight: Tensor,
                 pairs: str | None = None) -> tuple[Tensor, Tensor]:
    """Training-time RTC plan, `plan_rtc(..., mode="trained")`: W >= 0.5 marks the given prefix."""
    return plan_rtc(ens, obs, instr, noise, prefix, weight, "trained", pairs=pairs)


@torch.no_grad()
def vfd_one_way(ens: Ensemble, obs: Observation, instr: Tensor, noise: Tensor, pairs: str | None = None) -> Tensor:
    """One-way VFD, the acquisition score (docs/algorithms.md#vfd-velocity-field-disagreement).
    noise (N, B, H, m) -> (B,).

    For each pair (A, B) of `member_pairs(M, pairs or cfg.vfd_pairs)`: A integrates from each of the N
    noise samples on the grid of `vfd_grid`; score = mean over samples of
        sum_k w(t_k) ||v_A(x_{t_k}) - v_B(x_{t_k})||_F^2 dt_k      (Frobenius over horizon x action dims),
    then the mean over pairs. All integrators start from the same N noise samples."""
    if ens.members < 2:
        raise ValueError("VFD needs at least two members")
    return plan(ens, obs, instr, noise, pairs)[1]


@torch.no_grad()
def vfd_two_way(ens: Ensemble, obs: Observation, instr: Tensor, noise: Tensor) -> Tensor:
    """Two-way VFD (the calibration score): every member integrates its own trajectory from its own
    noise, noise (M, N, B, H, m); for each unordered pair the disagreement along A's and along B's
    trajectories are averaged, then the mean over pairs (= the mean over ordered pairs). -> (B,).
    Symmetric in members (permuting members and their noise leaves it unchanged)."""
    M = ens.members
    if M < 2:
        raise ValueError("VFD needs at least two members")
    acc, _ = disagreement(ens, ens.encode(obs, instr), _flat(noise, ens.cfg), list(range(M)))
    off = ~torch.eye(M, dtype=torch.bool)
    return acc[off].mean(0).mean(0)  # acc[b, a] over a != b, then over samples


@torch.no_grad()
def action_l2(ens: Ensemble, obs: Observation, instr: Tensor, noise: Tensor) -> Tensor:
    """Action-L2 baseline: mean over unordered member pairs (and the N samples) of the L2 (Frobenius)
    distance between two members' final chunks, each member from its own noise (M, N, B, H, m). -> (B,)"""
    a = sample_members(ens, obs, instr, noise).flatten(-2)  # (M, N, B, D)
    d = [(a[i] - a[j]).norm(dim=-1) for i, j in member_pairs(ens.members, "lower")]
    return torch.stack(d).mean(0).mean(0)


@torch.no_grad()
def gu(ens: Ensemble, obs: Observation, instr: Tensor, noise: Tensor, eps: float = 1e-8) -> Tensor:
    """GU baseline: all members sample from the same noise (N, B, H, m); per action element the variance
    across members (population, correction 0); score = sum over elements of log(var + eps), mean over
    the N samples. -> (B,)"""
    a = sample_members(ens, obs, instr, noise).flatten(-2)  # (M, N, B, D)
    return torch.log(a.var(0, correction=0) + eps).sum(-1).mean(0)


@torch.no_grad()
def sample_variance(ens: Ensemble, obs: Observation, instr: Tensor, noise: Tensor, member: int = 0) -> Tensor:
    """Single-member baseline: variance (unbiased) of one member's chunks over the N noise draws
    noise (N, B, H, m), summed over elements (trace of the sample covariance). -> (B,)"""
    return sample(ens, obs, instr, noise, member).flatten(-2).var(0).sum(-1)


# ------------------------------------------------------------------------------------------ training


def _as_float(x: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x, dtype=torch.float32)


def _training_obs(cfg: FlowConfig, obs: Observation) -> tuple[Tensor, Tensor | None]:
    """(states float32 (n, obs_dim), images uint8 (n, S, S, 3) or None) of a training set. Images stay
    uint8 (a 64 x 64 x 3 frame is 12 KiB, 48 KiB as float): each minibatch is converted in the model."""
    if not isinstance(obs, Mapping):
        if cfg.vision:
            raise ValueError(f"image_size={cfg.image_size}: training needs obs as a mapping "
                             f"{{{STATE!r}: states, {IMAGE!r}: uint8 images}}, not a bare state array")
        return _as_float(obs), None
    state = _as_float(obs[STATE])
    if not cfg.vision:
        return state, None
    if IMAGE not in obs:
        raise ValueError(f"image_size={cfg.image_size}: the training obs mapping has no {IMAGE!r}")
    image = torch.as_tensor(np.asarray(obs[IMAGE]) if not isinstance(obs[IMAGE], Tensor) else obs[IMAGE])
    S = cfg.image_size
    if image.dtype != torch.uint8 or tuple(image.shape) != (state.shape[0], S, S, 3):
        raise ValueError(f"training images must be uint8 ({state.shape[0]}, {S}, {S}, 3), got {image.dtype} "
                         f"{tuple(image.shape)}")
    return state, image


def minibatches(groups: Sequence[Tensor], batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless minibatches of example indices with an equal share of every group in each (SAVE's replay
    mixes old and acquired data half and half, however few acquired examples there are). groups: index
    tensors, one per group; the first batch_size % len(groups) groups get one index more.

    Each group is its own epoch stream: shuffled, taken in order, reshuffled when its next share no longer
    fits (the epoch's tail is dropped). With one group this is the plain epoch loop of `train_ensemble`,
    draw for draw. A group smaller than its share is repeated within the batch (whole shuffles of it)."""
    G = len(groups)
    shares = [batch_size // G + (g < batch_size % G) for g in range(G)]
    perms: list[Tensor | None] = [None] * G
    pos = [0] * G
    while True:
        parts = []
        for g, (idx, k) in enumerate(zip(groups, shares)):
            n = len(idx)
            if k > n:
                parts.append(torch.cat([idx[torch.randperm(n, generator=generator)] for _ in range(-(-k // n))])[:k])
                continue
            if perms[g] is None or pos[g] + k > n:
                perms[g], pos[g] = idx[torch.randperm(n, generator=generator)], 0
            parts.append(perms[g][pos[g]:pos[g] + k])
            pos[g] += k
        yield parts[0] if G == 1 else torch.cat(parts)


def _group_indices(groups: Tensor | np.ndarray | None, n: int) -> list[Tensor]:
    """Example indices per group label (in label order) of `train_ensemble`'s `groups`; [arange(n)] for None."""
    if groups is None:
        return [torch.arange(n)]
    labels = torch.as_tensor(np.asarray(groups) if not isinstance(groups, Tensor) else groups)
    if labels.shape != (n,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"groups must be integer labels, one per example ({n},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    return [torch.nonzero(labels == g).flatten() for g in torch.unique(labels)]


def rtc_example(ens: Ensemble, xt: Tensor, clean: Tensor, context: Tensor,
                gens: Sequence[torch.Generator]) -> tuple[Tensor, Tensor, Tensor]:
    """Training-time RTC on one minibatch (docs/rtc.md): each example draws its delay d ~ U{0..rtc_max_delay}
    from its member's generator; its first d positions of x_t become the clean actions (flow time 1 there)
    and the mask conditions the head (`Ensemble.with_prefix`). xt, clean (M, bs, D), context (M, bs, h).
    Returns (x_t, context, free (M, bs, D): 1 where the loss counts, 0 on the given prefix)."""
    cfg = ens.cfg
    M, bs, _ = xt.shape
    d = torch.stack([torch.randint(0, cfg.rtc_max_delay + 1, (bs,), generator=g) for g in gens])  # (M, bs)
    mask = (torch.arange(cfg.horizon) < d[..., None]).to(xt.dtype)                            # (M, bs, H)
    given = spread_positions(mask, cfg.action_dim)
    return xt * (1 - given) + clean * given, ens.with_prefix(context, mask), 1 - given


def train_ensemble(cfg: FlowConfig, obs: Observation, instr: Tensor | np.ndarray,
                   chunks: Tensor | np.ndarray, progress: bool = True,
                   ensemble: Ensemble | None = None,
                   groups: Tensor | np.ndarray | None = None,
                   weights: Tensor | np.ndarray | None = None) -> tuple[Ensemble, dict[str, np.ndarray]]:
    """Train every member by flow matching on in-memory data: obs (n, obs_dim) (or, for image configs, a
    mapping {"state": (n, obs_dim), "image": (n, S, S, 3) uint8}), instr (n, instr_dim),
    chunks (n, H, action_dim). Each member draws its own minibatches (its own shuffling each epoch), its
    own x0 and t ~ U[0, 1), from its own data seed; the loss is the sum of the members' MSEs, so with
    full members each member's update is the one it would get alone (AdamW is per-parameter).

    ensemble: warm start (SAVE fine-tunes each round from the previous one). It is copied, not changed,
    and keeps its observation normalisation; cfg supplies the optimisation settings. Otherwise a fresh
    Ensemble(cfg) normalised on `obs`. groups: an integer label per example (n,); every minibatch then
    holds an equal share of each label (`minibatches`): SAVE's replay, old data 0 and acquired data 1,
    half and half whatever the sizes. None: one group (plain epochs). weights: a non-negative weight per example
    (n,); minibatches are then drawn with replacement in proportion to them (reward-weighted flow matching,
    training/posttrain.py), instead of in epochs (not with groups). Returns (ensemble, history) with
    history["loss"] (steps,), the mean over members, and history["member_loss"] (steps, M)."""
    obs, images = _training_obs(cfg, obs)
    instr, chunks = _as_float(instr), _as_float(chunks)
    n = obs.shape[0]
    if ensemble is None:
        ens = Ensemble(cfg)
        ens.set_normalisation(obs)
    else:
        ens = copy.deepcopy(ensemble)
        for f in ("obs_dim", "instr_dim", "action_dim", "horizon", "members", "shared_encoder", "image_size",
                  "image_channels", "image_features"):
            if getattr(ens.cfg, f) != getattr(cfg, f):
                raise ValueError(f"warm start: ensemble has {f}={getattr(ens.cfg, f)}, config {getattr(cfg, f)}")
        if (ens.cfg.rtc_max_delay > 0) != (cfg.rtc_max_delay > 0):
            raise ValueError(f"warm start: ensemble has rtc_max_delay={ens.cfg.rtc_max_delay}, config "
                             f"{cfg.rtc_max_delay} (RTC on in one, off in the other)")
    if chunks.shape[1:] != (cfg.horizon, cfg.action_dim):
        raise ValueError(f"chunks must be (n, {cfg.horizon}, {cfg.action_dim}), got {tuple(chunks.shape)}")
    if not 0 <= cfg.rtc_max_delay <= cfg.horizon // 2:
        raise ValueError(f"rtc_max_delay must be in 0..{cfg.horizon // 2} (d <= s <= H - d), got {cfg.rtc_max_delay}")
    M, D, bs = cfg.members, cfg.chunk_dim, min(cfg.batch_size, n)
    targets = chunks.reshape(n, D)
    gens = [torch.Generator().manual_seed(d) for _, d in member_seeds(cfg.seed, M)]
    if weights is not None:
        if groups is not None:
            raise ValueError("train_ensemble takes groups or weights, not both")
        w = torch.as_tensor(np.asarray(weights, np.float64) if not isinstance(weights, Tensor) else weights,
                            dtype=torch.float64)
        if w.shape != (n,) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be ({n},) finite, non-negative and not all zero")
        streams = [iter(lambda g=g: torch.multinomial(w, bs, replacement=True, generator=g), None) for g in gens]
    else:
        streams = [minibatches(_group_indices(groups, n), bs, g) for g in gens]
    opt = torch.optim.AdamW(ens.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ens.train()
    losses = torch.empty(cfg.steps, M)
    try:
        from tqdm import tqdm
        bar = tqdm(range(cfg.steps), desc=f"flow M={M}", disable=not progress)
    except ImportError:  # tqdm comes with vigil[dev]
        bar = range(cfg.steps)
    for step in bar:
        idx = torch.stack([next(s) for s in streams])  # (M, bs)
        x0 = torch.stack([torch.randn(bs, D, generator=g) for g in gens])
        t = torch.stack([torch.rand(bs, generator=g) for g in gens])  # U[0, 1)
        xt, target = ot_path(x0, targets[idx], t[..., None])
        o = obs[idx] if images is None else {STATE: obs[idx], IMAGE: images[idx]}  # (M, bs, ...) uint8
        ctx = ens.encode(o, instr[idx])
        if cfg.rtc_max_delay > 0:  # training-time RTC: the first d positions are given (clean), not learnt
            xt, ctx, free = rtc_example(ens, xt, targets[idx], ctx, gens)
            err = (ens.velocity(ctx, xt[:, None], t[:, None])[:, 0] - target).square() * free
            member_loss = err.sum(dim=(1, 2)) / free.sum(dim=(1, 2)).clamp_min(1.0)
        else:
            v = ens.velocity(ctx, xt[:, None], t[:, None])[:, 0]
            member_loss = (v - target).square().mean(dim=(1, 2))
        opt.zero_grad(set_to_none=True)
        member_loss.sum().backward()
        opt.step()
        losses[step] = member_loss.detach()
        if progress and hasattr(bar, "set_postfix") and step % 100 == 0:
            bar.set_postfix(loss=f"{losses[step].mean():.4f}")
    ens.eval()
    member = losses.numpy()
    return ens, {"loss": member.mean(1), "member_loss": member}
