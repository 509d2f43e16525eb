"""Meta-World tasks as vigil environments, with their scripted experts.

`MetaWorldEnv(task)` plays one Meta-World v3 task (package `metaworld`) the way a robot would on the link:
it declares a `state` observation (float32, 39: hand, gripper, two objects, the previous frame of those,
and the goal) and optionally an `image` observation (uint8, HxWx3 from the `corner` camera), and takes a
4-d action in [-1, 1] (hand xyz displacement, gripper effort).  `instruction` is the task's natural
language instruction; `expert_action(state)` is Meta-World's scripted expert for the task.

Task variants.  MT10 fixes 50 variants of each task (object and goal positions), drawn by
`metaworld.MT10(seed=0)` (cached on disk after the first build, see `_mt10_variants`); tasks outside MT10
(the held-out ones) use `metaworld.MT1(task, seed=0)`.
`reset(seed)` plays variant `seed % 50`: seeds 0..49 are the 50 distinct variants, seed 50 replays
variant 0 exactly (the simulation is otherwise deterministic), and `seed=None` draws a variant at random.
The variant is in `env.variant` and in every step's `info["variant"]`.

Episode end (the decision, and why).  Meta-World itself never terminates: `success` is a flag in `info`,
an episode counts as a success if the flag was ever 1 within the 500-step limit, and the simulation keeps
running after it.  A vigil user running episodes (demonstrations, evaluation under the runtime) expects an
episode to stop once the task is done, but a demonstration that stops on the very first success step
never shows the policy what to do next (hold still, keep the object in place).  So: `terminated` becomes
True once `info["success"]` has been 1 for `hold_steps` consecutive steps (default 10, 1/8 s at 80 Hz);
`hold_steps=1` ends on the first success (Meta-World's AutoTerminateOnSuccessWrapper), `hold_steps=0`
never terminates (plain Meta-World).  `truncated` is True at `max_steps`.  An episode is successful if
`info["success"]` was 1 at any step (the Meta-World rule), so an episode whose success flickers and that
runs to the time limit still counts.

Rendering: off-screen with `MUJOCO_GL=egl` (set here if unset, before mujoco is imported), without
shadows, reflections or multisampling (CPU rendering with Mesa llvmpipe is ~10x faster that way), and
flipped upright (the `corner` camera renders upside down).

Distribution shifts (`sim.shifts.Shift`: object and goal positions outside the training range, friction,
mass) are applied by `reset`; set `env.shift` (or pass `shift=`) and the next reset plays the shifted
variant.  Observation noise is a link fault (`sim.faults.Faults`), not a property of the world.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import platform
import warnings
import weakref
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

if platform.system() == "Linux":
    os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np

from vigil.sim.envs import Environment, StepResult
from vigil.sim.shifts import NO_SHIFT, Shift, shift_positions
from vigil.wire.protocol import ArraySpec

MT10_TASKS: tuple[str, ...] = (
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
    "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
)  # the order of metaworld.MT10(seed=0).train_classes (a test checks)

INSTRUCTIONS: dict[str, str] = {
    "reach-v3": "reach the goal position with the gripper",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from the top",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}

# Meta-World tasks outside MT10, for instruction and task shifts: siblings of MT10 tasks (same objects,
# another goal or motion) and a few unrelated ones.
HELDOUT_INSTRUCTIONS: dict[str, str] = {
    "button-press-v3": "press the button from the front",
    "door-close-v3": "close the door",
    "faucet-open-v3": "turn the faucet open",
    "faucet-close-v3": "turn the faucet closed",
    "reach-wall-v3": "reach the goal position over the wall",
    "push-back-v3": "push the puck back to the goal",
    "coffee-button-v3": "press the button on the coffee machine",
    "plate-slide-v3": "slide the plate into the goal",
    "handle-press-v3": "press the handle down",
}

ALL_INSTRUCTIONS: dict[str, str] = {**INSTRUCTIONS, **HELDOUT_INSTRUCTIONS}

STATE_DIM = 39
ACTION_DIM = 4
N_VARIANTS = 50


def is_metaworld_task(name: str) -> bool:
    """True for the Meta-World task names this module knows (MT10 and the held-out ones)."""
    return name in ALL_INSTRUCTIONS


def _cache_file() -> Path:
    from importlib.metadata import version

    root = os.environ.get("VIGIL_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "vigil")
    return Path(root).expanduser() / f"metaworld-{version('metaworld')}-mt10-seed0.json"


def _mt10_task(task: str, rand_vec: np.ndarray):
    """The metaworld.Task that metaworld.MT10 builds for `task` with this variant vector."""
    import metaworld
    from metaworld import env_dict

    kwargs = dict(env_dict.MT10_V3_ARGS_KWARGS[task]["kwargs"])
    del kwargs["task_id"]
    kwargs.update(rand_vec=np.asarray(rand_vec, np.float64), env_cls=env_dict.MT10_V3[task])
    kwargs.update(metaworld._MT_OVERRIDE)
    return metaworld.Task(env_name=task, data=pickle.dumps(kwargs))


@cache
def _mt10_variants() -> dict[str, list]:
    """MT10's variants per task, as metaworld.MT10(seed=0).train_tasks has them.

    Building MT10 takes 5-13 s (it resets every task 50 times), too slow to pay in every process, so its
    variant vectors are cached in a JSON file (~/.cache/vigil, or $VIGIL_CACHE), keyed by the metaworld
    version. The cache is checked when written: every task rebuilt from it equals MT10's own."""
    path = _cache_file()
    try:
        vecs = json.loads(path.read_text())
        if sorted(vecs) == sorted(MT10_TASKS) and all(len(v) == N_VARIANTS for v in vecs.values()):
            return {task: [_mt10_task(task, np.array(v)) for v in vecs[task]] for task in MT10_TASKS}
    except (OSError, ValueError):
        pass
    import metaworld

    tasks = metaworld.MT10(seed=0).train_tasks
    vecs = {}
    for t in tasks:
        data = pickle.loads(t.data)  # metaworld's own pickle, made in this process
        rebuilt = pickle.loads(_mt10_task(t.env_name, data["rand_vec"]).data)
        if sorted(rebuilt) != sorted(data) or any(
                not np.array_equal(rebuilt[k], data[k]) if k == "rand_vec" else rebuilt[k] != data[k] for k in data):
            raise RuntimeError(f"metaworld changed how MT10 encodes tasks ({t.env_name}); update sim/metaworld_env.py")
        vecs.setdefault(t.env_name, []).append(np.asarray(data["rand_vec"], np.float64).tolist())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(vecs))
        os.replace(tmp, path)
    except OSError:
        pass  # no cache: slower next time, nothing else
    return {task: [t for t in tasks if t.env_name == task] for task in MT10_TASKS}


def variants(task: str) -> list:
    """The benchmark's task variants (metaworld.Task) for `task`, in the benchmark's order: MT10 (seed 0)
    for its tasks, MT1 (seed 0) for the others."""
    if task in MT10_TASKS:
        return _mt10_variants()[task]
    import metaworld

    return [t for t in metaworld.MT1(task, seed=0).train_tasks if t.env_name == task]


_renderers: weakref.WeakSet[MetaWorldEnv] = weakref.WeakSet()
_atexit_registered = False


def _close_renderers() -> None:
    # Registered after mujoco's EGL module registers eglTerminate, so it runs first: a renderer freed after
    # EGL is gone raises (noisily, at interpreter exit).
    for env in list(_renderers):
        env._close_renderer()


def _prefer_egl_when_headless() -> None:
    """mujoco picks its OpenGL platform once, when first imported, from MUJOCO_GL. If something imported it
    before this module could set MUJOCO_GL=egl (metaworld, gymnasium), it picked GLFW, which cannot work
    without a display. In that case (Linux, MUJOCO_GL unset, no display) use EGL, as MUJOCO_GL=egl would."""
    from mujoco import gl_context

    if (platform.system() != "Linux" or getattr(gl_context, "_MUJOCO_GL", None) != ""
            or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return
    from mujoco.egl import GLContext

    gl_context.GLContext = GLContext


def _task_bodies(model) -> np.ndarray:
    """Ids of the bodies a task adds (objects, doors, drawers): those whose root is not the world, the
    table, the wall, the robot or the mocap target."""
    import mujoco

    fixed = {0}
    for name in ("tablelink", "RetainingWall", "base", "mocap"):
        i = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, name)
        if i >= 0:
            fixed.add(int(model.body_rootid[i]))
    return np.array([i for i in range(model.nbody) if int(model.body_rootid[i]) not in fixed], dtype=np.int64)


class MetaWorldEnv(Environment):
    """One Meta-World task, seen as a robot sees it (see the module docstring)."""

    def __init__(self, task: str, camera: bool = False, image_size: int = 64, max_steps: int = 500,
                 hold_steps: int = 10, shift: Shift = NO_SHIFT):
        if task not in ALL_INSTRUCTIONS:
            raise ValueError(f"unknown Meta-World task {task!r}; known: {', '.join(sorted(ALL_INSTRUCTIONS))}")
        if max_steps < 1 or hold_steps < 0 or image_size < 1:
            raise ValueError("max_steps and image_size must be >= 1, hold_steps >= 0")
        from metaworld.policies import ENV_POLICY_MAP

        self.name = self.task = task
        self.instruction = ALL_INSTRUCTIONS[task]
        self.camera, self.image_size = camera, image_size
        self.max_steps, self.hold_steps = max_steps, hold_steps
        self._variants = variants(task)
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        self.env = ALL_V3_ENVIRONMENTS[task]()
        self.env.max_path_length = max_steps  # Meta-World refuses to step past it
        self.env.set_task(self._variants[0])
        self._expert = ENV_POLICY_MAP[task]()
        self.observation_spec = (ArraySpec("state", "float32", (STATE_DIM,)),)
        if camera:
            self.observation_spec += (ArraySpec("image", "uint8", (image_size, image_size, 3)),)
        self.action_spec = ArraySpec("action", "float32", (ACTION_DIM,), (-1.0,) * ACTION_DIM, (1.0,) * ACTION_DIM)
        self.control_rate_hz = 1.0 / float(self.env.dt)
        self.variant = 0
        self.t = 0
        self._held = 0
        self._renderer = None
        self.shift = shift
        model = self.env.model
        self._friction = model.geom_friction.copy()
        self._mass, self._inertia = model.body_mass.copy(), model.body_inertia.copy()
        self._task_bodies = _task_bodies(model)
        self._pending: list[np.ndarray] = []

    # -- episodes ---------------------------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> Mapping[str, np.ndarray]:
        if seed is None:
            self.variant = int(np.random.default_rng().integers(len(self._variants)))
        else:
            self.variant = int(seed) % len(self._variants)
        self.env.set_task(self._variants[self.variant])
        self._apply_shift()
        obs, _ = self.env.reset()
        self.t, self._held = 0, 0
        self._pending = [np.zeros(ACTION_DIM, np.float32)] * self.shift.latency
        return self._observe(obs)

    def reset_recipe(self, seed: int) -> dict[str, Any]:
        """How to replay the reset `reset(seed)` exactly: what a robot sends as `sim` with its `reset`, so a
        data request can be answered from the same scene (sim/expert.py)."""
        recipe: dict[str, Any] = {"env": "metaworld", "task": self.task, "seed": int(seed),
                                  "variant": int(seed) % len(self._variants), "max_steps": self.max_steps}
        if not self.shift.none:
            recipe["shift"] = {"positions": self.shift.positions, "friction": self.shift.friction,
                               "mass": self.shift.mass, "gain": self.shift.gain, "latency": self.shift.latency}
        return recipe

    def step(self, action: np.ndarray) -> StepResult:
        a = np.asarray(action, np.float32).reshape(ACTION_DIM)
        if self.t >= self.max_steps:
            raise RuntimeError(f"{self.task}: step after the episode was truncated at {self.max_steps} steps; "
                               "reset first")
        if self.shift.gain != 1:  # weaker (or stronger) actuation
            a = a * np.float32(self.shift.gain)
        if self.shift.latency:  # the action waits; the one sent `latency` steps ago takes effect
            self._pending.append(a)
            a = self._pending.pop(0)
        obs, reward, _, _, info = self.env.step(a)
        self.t += 1
        success = float(info.get("success", 0.0))
        self._held = self._held + 1 if success >= 1.0 else 0
        terminated = self.hold_steps > 0 and self._held >= self.hold_steps
        out = {k: float(v) for k, v in info.items() if np.isscalar(v)}
        out.update(success=success, variant=float(self.variant))
        return StepResult(self._observe(obs), float(reward), bool(terminated), self.t >= self.max_steps, out)

    def _apply_shift(self) -> None:
        """Set the model's physics to nominal times the shift, and move the variant's positions."""
        model, shift = self.env.model, self.shift
        model.geom_friction[:] = self._friction
        model.geom_friction[:, 0] *= shift.friction
        model.body_mass[:], model.body_inertia[:] = self._mass, self._inertia
        model.body_mass[self._task_bodies] *= shift.mass
        model.body_inertia[self._task_bodies] *= shift.mass
        if shift.positions:
            space = self.env._random_reset_space
            self.env._last_rand_vec = shift_positions(self.env._last_rand_vec, space.low, space.high, shift.positions)

    def expert_action(self, state: np.ndarray) -> np.ndarray:
        """Meta-World's scripted expert for this task, clipped to the action bounds (the environment clips
        anyway; clipped, a recorded action is exactly what was applied)."""
        with warnings.catch_warnings():  # "Constant(s) may be too high...": the experts saturate by design
            warnings.simplefilter("ignore", UserWarning)
            a = self._expert.get_action(np.asarray(state, np.float64).reshape(STATE_DIM))
        return np.clip(np.asarray(a, np.float32), -1.0, 1.0)

    # -- observations -----------------------------------------------------------------------------------

    def _observe(self, state: np.ndarray) -> dict[str, np.ndarray]:
        obs = {"state": np.asarray(state, np.float32)}
        if self.camera:
            obs["image"] = self.render()
        return obs

    def render(self) -> np.ndarray:
        """The `corner` camera image, upright, uint8 (image_size, image_size, 3)."""
        if self._renderer is None:
            self._renderer = self._make_renderer()
        import mujoco

        r = self._renderer
        r.update_scene(self.env.data, camera="corner")
        r.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        r.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        return np.ascontiguousarray(np.flipud(r.render()))

    def _make_renderer(self):
        global _atexit_registered
        import mujoco

        model = self.env.model
        model.vis.quality.shadowsize = 0  # read when the GL context is made: set before
        model.vis.quality.offsamples = 0
        _prefer_egl_when_headless()
        try:
            renderer = mujoco.Renderer(model, self.image_size, self.image_size)
        except Exception as exc:
            raise RuntimeError(f"off-screen rendering failed (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}): {exc}. "
                               "On a headless Linux machine set MUJOCO_GL=egl (or osmesa) before mujoco is "
                               "imported.") from exc
        _renderers.add(self)
        if not _atexit_registered:
            atexit.register(_close_renderers)
            _atexit_registered = True
        return renderer

    def _close_renderer(self) -> None:
        if self._renderer is not None:
            renderer, self._renderer = self._renderer, None
            renderer.close()

    def close(self) -> None:
        self._close_renderer()
        self.env.close()

