"""ViZDoom plumbing: a small map generated as UDMF text (no binary asset shipped) and a batch of games stepped in
worker processes.

The map (south to north, Doom units, y grows north; 512 wide): the start room with a green armor and a radiation
suit, a band of lava floor across the whole width (`LAVA_Y`, 20 damage every 32 tics), the item room with a plasma
gun and two cell packs, a door (`DOOR_Y`, opens when the player walks into it), the boss room with a Baron of Hell.
The armor can be reached without touching the lava; the weapon cannot.

    wad = write_wad("/tmp/psl_map.wad")
    env = DoomVecEnv(16, wad, seed=1, frame_skip=4, episode_tics=4200, stack=2, num_workers=2)  # 2 processes
    obs, gv = env.reset()                            # (16, 3 * stack, 60, 80) uint8, game variables (16, 6)
    obs, gv, done, dead, start_gv = env.step(actions)   # done: death or timeout
    obs, start_gv = env.reset(mask)                  # end some episodes early (a safeguard violation)

`step` returns the game variables of the state each action reached, also on the last step of an episode (death or
timeout, read with `get_game_variable` after the episode finished), so a caller can label and reward that step.
A finished game starts a new episode at once: `obs` is then its first observation and `start_gv` its game
variables. `reset(mask)` starts new episodes for some games only (a caller ending an episode early).
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import struct

import numpy as np

LAVA_Y, DOOR_Y, MAP_WIDTH = (384, 512), (896, 912), 512
SECTORS = [  # (clockwise polygon, floor flat, sector properties); the door sector comes last
    ([(0, 0), (0, 384), (512, 384), (512, 0)], "FLOOR0_1", {}),
    ([(0, 384), (0, 512), (512, 512), (512, 384)], "LAVA1", {"damageamount": 20, "damageinterval": 32}),
    ([(0, 512), (0, 896), (192, 896), (320, 896), (512, 896), (512, 512)], "FLOOR0_1", {}),
    ([(0, 912), (0, 1280), (512, 1280), (512, 912), (320, 912), (192, 912)], "FLOOR7_2", {}),
    ([(192, 896), (192, 912), (320, 912), (320, 896)], "FLAT20", {"heightceiling": 0}),  # the closed door
]
THINGS = [  # (x, y, angle, type): player start, green armor, radiation suit, plasma gun, 2 cell packs, baron
    (128, 64, 90, 1), (416, 160, 90, 2018), (416, 256, 90, 2025), (256, 704, 90, 2004),
    (192, 704, 90, 17), (320, 704, 90, 17), (256, 1152, 270, 3003),
]
GAME_VARIABLES = ["POSITION_X", "POSITION_Y", "ARMOR", "WEAPON6", "HEALTH", "DAMAGECOUNT"]
BUTTONS = ["TURN_LEFT", "TURN_RIGHT", "MOVE_FORWARD", "MOVE_BACKWARD", "MOVE_LEFT", "MOVE_RIGHT", "ATTACK"]
# The authors' action space (sample-factory's doom_action_space_extended): {noop, turn left, turn right} x
# {noop, forward, backward} x {noop, strafe left, strafe right} x {noop, attack}, here as 54 flat actions.
ACTIONS = [
    [turn == 1, turn == 2, move == 1, move == 2, strafe == 1, strafe == 2, attack == 1]
    for turn, move, strafe, attack in itertools.product(range(3), range(3), range(3), range(2))
]


def action_index(turn: int = 0, move: int = 0, strafe: int = 0, attack: int = 0) -> int:
    """The flat action for (turn: 0 none, 1 left, 2 right; move: 0 none, 1 forward, 2 backward; strafe: 0 none,
    1 left, 2 right; attack: 0/1)."""
    return ((turn * 3 + move) * 3 + strafe) * 2 + attack


def udmf_textmap() -> str:
    """The map as UDMF text (ZDoom namespace). Each polygon edge becomes a linedef; an edge shared by two
    sectors (walked in opposite directions) becomes one two-sided linedef whose front is the first sector."""

    def block(kind, props):
        def fmt(v):
            return ("true" if v else "false") if isinstance(v, bool) else f'"{v}"' if isinstance(v, str) else v

        return kind + "\n{\n" + "".join(f"  {k} = {fmt(v)};\n" for k, v in props.items()) + "}"

    door, edges, verts, sides, out = len(SECTORS) - 1, {}, [], [], ['namespace = "zdoom";']
    for s, (poly, _, _) in enumerate(SECTORS):
        for a, b in zip(poly, poly[1:] + poly[:1]):
            if (b, a) in edges:
                edges[(b, a)]["back"] = s
            else:
                edges[(a, b)] = {"front": s}
    for (a, b), e in edges.items():
        verts += [p for p in (a, b) if p not in verts]
        line = {"v1": verts.index(a), "v2": verts.index(b), "sidefront": len(sides)}
        if "back" in e:  # two-sided; a line onto the door sector raises the door when the player walks into it
            is_door = door == e["back"]
            tex = {"texturetop": "BIGDOOR2"} if is_door else {}
            line.update(sideback=len(sides) + 1, twosided=True)
            if is_door:  # Door_Raise (special 12): tag 0 = the sector behind the line, speed 32, delay 105 tics
                line.update(special=12, arg0=0, arg1=32, arg2=105, playerpush=True, playeruse=True,
                            repeatspecial=True)  # fmt: skip
            sides += [{"sector": e["front"], **tex}, {"sector": e["back"], **tex}]
        else:
            line["blocking"] = True
            sides.append({"sector": e["front"], "texturemiddle": "DOORTRAK" if e["front"] == door else "STARTAN2"})
        out.append(block("linedef", line))
    out += [block("vertex", {"x": float(x), "y": float(y)}) for x, y in verts]
    out += [block("sidedef", sd) for sd in sides]
    for _, flat, extra in SECTORS:
        base = {"heightfloor": 0, "heightceiling": 128, "texturefloor": flat, "textureceiling": "CEIL3_5",
                "lightlevel": 208}
        out.append(block("sector", {**base, **extra}))
    skills = {f"skill{i}": True for i in range(1, 6)}
    for x, y, angle, kind in THINGS:
        out.append(block("thing", {"x": float(x), "y": float(y), "angle": angle, "type": kind, **skills,
                                   "single": True}))  # fmt: skip
    return "\n".join(out) + "\n"


def write_wad(path: str) -> str:
    """A PWAD with the lumps MAP01 (empty marker), TEXTMAP (the UDMF text) and ENDMAP; ZDoom builds the nodes."""
    lumps = [("MAP01", b""), ("TEXTMAP", udmf_textmap().encode()), ("ENDMAP", b"")]
    data, directory, offset = b"", b"", 12
    for name, payload in lumps:
        directory += struct.pack("<ii8s", offset, len(payload), name.encode())
        data, offset = data + payload, offset + len(payload)
    with open(path, "wb") as f:
        f.write(b"PWAD" + struct.pack("<ii", len(lumps), offset) + data + directory)
    return path


# ------------------------------------------------------------------------------------------------------
# A group of games, stepped one after the other: the body of a worker process (or of the main one)
# ------------------------------------------------------------------------------------------------------
class GameGroup:
    def __init__(self, wad: str, seeds: list[int], frame_skip: int, episode_tics: int, cheats: bool = False):
        import vizdoom as vzd

        self.vzd, self.skip, self.games = vzd, frame_skip, []
        self.variables = [getattr(vzd.GameVariable, v) for v in GAME_VARIABLES]
        for seed in seeds:
            g = vzd.DoomGame()
            g.set_doom_scenario_path(wad)
            g.set_doom_map("map01")
            g.set_doom_config_path(os.path.join(os.path.dirname(os.path.abspath(wad)), "_vizdoom.ini"))  # not in cwd
            g.set_doom_skill(3)  # the authors' safe_rl.cfg
            g.set_screen_resolution(vzd.ScreenResolution.RES_160X120)
            g.set_screen_format(vzd.ScreenFormat.CRCGCB)
            g.set_render_hud(False)
            g.set_window_visible(False)
            g.set_available_buttons([getattr(vzd.Button, b) for b in BUTTONS])
            g.set_available_game_variables(self.variables)
            g.set_episode_timeout(episode_tics)
            g.set_seed(seed)
            if cheats:  # tests place the player with the `warp` console command
                g.add_game_args("+sv_cheats 1")
            g.set_mode(vzd.Mode.PLAYER)
            g.init()
            self.games.append(g)

    def _observe(self, g):
        frame = g.get_state().screen_buffer[:, ::2, ::2]  # (3, 120, 160) -> (3, 60, 80)
        return frame, np.array([g.get_game_variable(v) for v in self.variables])

    def reset(self, mask=None):
        out = [self._new_episode(g) if mask is None or mask[i] else self._observe(g) for i, g in enumerate(self.games)]
        return np.stack([f for f, _ in out]), np.stack([v for _, v in out])

    def _new_episode(self, g):
        g.new_episode()
        return self._observe(g)

    def step(self, actions):
        k = len(self.games)
        frames, gv = np.zeros((k, 3, 60, 80), np.uint8), np.zeros((k, len(GAME_VARIABLES)))
        start_gv, done, dead = np.zeros_like(gv), np.zeros(k, bool), np.zeros(k, bool)
        for i, g in enumerate(self.games):
            g.make_action(ACTIONS[int(actions[i])], self.skip)
            if g.is_episode_finished():  # death or timeout: the state reached is still readable as variables
                gv[i] = [g.get_game_variable(v) for v in self.variables]
                done[i], dead[i] = True, g.is_player_dead()
                frames[i], start_gv[i] = self._new_episode(g)
            else:
                frames[i], gv[i] = self._observe(g)
        return frames, gv, done, dead, start_gv

    def command(self, i: int, cmd: str) -> None:
        self.games[i].send_game_command(cmd)

    def close(self):
        for g in self.games:
            g.close()


def _worker(conn, args):
    group = GameGroup(*args)
    conn.send("ready")
    while True:
        name, data = conn.recv()
        if name == "close":
            group.close()
            conn.close()
            return
        conn.send(getattr(group, name)(*data))


class DoomVecEnv:
    """`num_envs` games split over `num_workers` worker processes (started with forkserver; each runs its own
    Doom instances), stepped in lock-step; `num_workers=0` steps them in this process. Frames are stacked here."""

    def __init__(self, num_envs: int, wad: str, seed: int, frame_skip: int, episode_tics: int, stack: int,
                 num_workers: int = 0, cheats: bool = False):
        self.n, self.stack = num_envs, stack
        seeds = [seed + i for i in range(num_envs)]
        num_workers = min(num_workers, num_envs)
        if num_workers == 0:
            self.local, self.conns, self.procs = GameGroup(wad, seeds, frame_skip, episode_tics, cheats), [], []
            self.slices = [slice(0, num_envs)]
        else:
            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
            bounds = np.linspace(0, num_envs, num_workers + 1).astype(int)
            self.slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
            self.local, self.conns, self.procs = None, [], []
            for sl in self.slices:
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(child, (wad, seeds[sl], frame_skip, episode_tics, cheats)),
                                daemon=True)  # fmt: skip
                p.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(p)
            for c in self.conns:
                c.recv()
        self.frames = np.zeros((num_envs, stack, 3, 60, 80), np.uint8)

    def _call(self, name, *per_env):
        """Call GameGroup.<name> on every group with its slice of each per-env argument; concatenate the results."""
        if self.local is not None:
            return getattr(self.local, name)(*per_env)
        for c, sl in zip(self.conns, self.slices):
            c.send((name, tuple(x[sl] for x in per_env)))
        parts = [c.recv() for c in self.conns]
        return tuple(np.concatenate(x) for x in zip(*parts))

    def obs(self) -> np.ndarray:
        return self.frames.reshape(self.n, -1, 60, 80)

    def reset(self, mask=None):
        """New episodes for all games, or for those where `mask` is True; returns the observations and the game
        variables of every game (the first ones of the new episodes)."""
        mask = np.ones(self.n, bool) if mask is None else np.asarray(mask, bool)
        frames, gv = self._call("reset", mask)
        self.frames[mask] = frames[mask, None]
        return self.obs(), gv

    def step(self, actions):
        frames, gv, done, dead, start_gv = self._call("step", np.asarray(actions))
        self.frames[:, :-1] = self.frames[:, 1:]
        self.frames[:, -1] = frames
        self.frames[done] = frames[done, None]  # a new episode: its first frame fills the stack
        return self.obs(), gv, done, dead, start_gv

    def command(self, i: int, cmd: str) -> None:
        """A console command to game i (tests: `warp x y` with cheats on)."""
        if self.local is not None:
            return self.local.command(i, cmd)
        w = next(k for k, sl in enumerate(self.slices) if sl.start <= i < sl.stop)
        self.conns[w].send(("command", (i - self.slices[w].start, cmd)))
        self.conns[w].recv()

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
        for c, p in zip(self.conns, self.procs):
            c.send(("close", None))
            p.join(timeout=10)
