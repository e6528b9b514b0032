"""The SaGui paper's Static and Semi-Dynamic environments as Safety-Gymnasium tasks (its Dynamic one is SafetyPointGoal1).

Yang et al., "Reinforcement Learning by Guided Safe Exploration" (ECAI 2023), appendix: three Safety Gym layouts.
The authors' code (`sagui-cs.py`, `train-guide.py`) gives their exact configs; the facts carried over:

| paper name   | robot | extents | hazards (size, keepout, where)                          | vases (size, keepout, where)                              | goal                  |
|--------------|-------|---------|---------------------------------------------------------|-----------------------------------------------------------|-----------------------|
| Static       | Point | 1.5     | 1 (0.7, 0.705) at (0, 0)                                | none                                                      | fixed at (1.1, 1.1)   |
| Semi-Dynamic | Car   | 2       | 4 (0.2, 0.18) at (1, 1), (1, -1), (-0.2, 0.2), (-1.4, -1.4) | 4 constrained (0.2, 0.18) at (-1, -1), (-1, 1), (0.2, -0.2), (1.4, 1.4) | random            |
| Dynamic      | Point | 1.5     | 8 (0.2, 0.18) random                                    | 1 unconstrained, random                                   | random  (= SafetyPointGoal1) |

Goals have size 0.3 and keepout 0.305 in all three; lidars have 16 bins and range 3 (Safety-Gymnasium's defaults).
The agent starts at a random place (the layouts fix only the objects). In Static, reaching the goal ends the
episode: a fixed goal cannot be resampled away from the robot standing on it, and Safety-Gymnasium (like Safety
Gym) then terminates ("terminate_resample_failure").

Each layout also has a *source* version for SaGui's guide: the same world without a goal (the authors' guide
environments have `task: none`), so its observation is the target's without `goal_lidar`, and no task reward.

Importing this module registers the ids below with Safety-Gymnasium, so `common.make_safety_env` and
`common.normalize_env_id` accept them:

    SafetyPointSaguiStatic-v0        SafetyPointSaguiStaticSource-v0
    SafetyCarSaguiSemiDynamic-v0     SafetyCarSaguiSemiDynamicSource-v0
"""

from __future__ import annotations

from common.envs import import_safety_gymnasium

sg = import_safety_gymnasium()

from safety_gymnasium.assets.free_geoms import Vases  # noqa: E402
from safety_gymnasium.assets.geoms import Goal, Hazards  # noqa: E402
from safety_gymnasium.bases.base_task import BaseTask  # noqa: E402
from safety_gymnasium.builder import Builder  # noqa: E402
from safety_gymnasium.tasks.safe_navigation.goal.goal_level0 import GoalLevel0  # noqa: E402

# the paper's layouts (facts from the authors' configs; see the table above)
STATIC = {
    "robot": "Point",
    "extents": [-1.5, -1.5, 1.5, 1.5],
    "hazards": {"num": 1, "size": 0.7, "keepout": 0.705, "locations": [(0.0, 0.0)]},
    "vases": None,
    "goal_locations": [(1.1, 1.1)],
    "cost_limit": 5.0,
}
SEMI_DYNAMIC = {
    "robot": "Car",
    "extents": [-2.0, -2.0, 2.0, 2.0],
    "hazards": {"num": 4, "size": 0.2, "keepout": 0.18, "locations": [(1.0, 1.0), (1.0, -1.0), (-0.2, 0.2), (-1.4, -1.4)]},
    "vases": {"num": 4, "size": 0.2, "keepout": 0.18, "locations": [(-1.0, -1.0), (-1.0, 1.0), (0.2, -0.2), (1.4, 1.4)]},
    "goal_locations": [],  # random
    "cost_limit": 8.0,
}
LAYOUTS = {"SaguiStatic": STATIC, "SaguiSemiDynamic": SEMI_DYNAMIC}
GOAL_SIZE, GOAL_KEEPOUT = 0.3, 0.305


def _add_layout_objects(task: BaseTask, layout: dict) -> None:
    task.placements_conf.extents = list(layout["extents"])
    task._add_geoms(Hazards(**layout["hazards"]))
    if layout["vases"] is not None:
        task._add_free_geoms(Vases(is_constrained=True, **layout["vases"]))


class SaguiGoalTask(GoalLevel0):
    """Target task: reach the goal (Safety-Gymnasium's goal reward) in one of the paper's layouts."""

    layout: dict = STATIC

    def __init__(self, config) -> None:
        super().__init__(config=config)  # adds Goal(keepout=0.305)
        self.goal.size = GOAL_SIZE
        self.goal.locations = list(self.layout["goal_locations"])
        _add_layout_objects(self, self.layout)


class SaguiSourceTask(BaseTask):
    """Source task of the guide: the same layout without a goal and without task reward."""

    layout: dict = STATIC

    def __init__(self, config) -> None:
        super().__init__(config=config)
        _add_layout_objects(self, self.layout)

    def calculate_reward(self):
        return 0.0

    def specific_reset(self):
        pass

    def specific_step(self):
        pass

    def update_world(self):
        pass

    @property
    def goal_achieved(self):
        return False


def _task_class(name: str, source: bool) -> type:
    base = SaguiSourceTask if source else SaguiGoalTask
    return type(f"{name}{'Source' if source else ''}", (base,), {"layout": LAYOUTS[name]})


class SaguiBuilder(Builder):
    """Safety-Gymnasium's Builder with one of the layouts above as its task (Builder looks tasks up by id)."""

    def __init__(self, task_id: str, layout: str, source: bool = False, config: dict | None = None, **kwargs):
        self._task_class = _task_class(layout, source)
        super().__init__(task_id=task_id, config=config, **kwargs)

    def _get_task(self):
        task = self._task_class(config=self.config)
        task.build_observation_space()
        return task


def env_ids() -> dict[str, tuple[str, bool]]:
    """Registered id -> (layout name, source?)."""
    ids = {}
    for name, layout in LAYOUTS.items():
        for source in (False, True):
            ids[f"Safety{layout['robot']}{name}{'Source' if source else ''}-v0"] = (name, source)
    return ids


def _register() -> None:
    from safety_gymnasium.utils.registration import safe_registry

    for env_id, (name, source) in env_ids().items():
        if env_id in safe_registry:
            continue
        sg.register(id=env_id, entry_point="common.sagui_tasks:SaguiBuilder", max_episode_steps=1000,
                    kwargs={"task_id": env_id, "layout": name, "source": source,
                            "config": {"agent_name": LAYOUTS[name]["robot"]}})


def source_id(env_id: str) -> str | None:
    """The goal-less source task of one of these layouts (e.g. for 'SafetyPointSaguiStatic'), else None."""
    base = env_id.split("-")[0]
    if base.endswith("Source"):
        return None
    return f"{base}Source-v0" if f"{base}Source-v0" in env_ids() else None


def paper_cost_limit(env_id: str) -> float | None:
    """The paper's cost limit d for one of these layouts (Static 5, Semi-Dynamic 8), else None."""
    base = env_id.split("-")[0]
    for full, (name, source) in env_ids().items():
        if full.split("-")[0] == base and not source:
            return LAYOUTS[name]["cost_limit"]
    return None


_register()
