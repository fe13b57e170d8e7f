"""The chaos bench's scenarios: for each, the overrides its `longtrace up` run needs (`scenario_up`) and the injector
the launcher's tick drives (`injector`), which also checks what only that scenario can show (`check`). Every
scenario's groups are accounted for the same way afterwards (experiments/chaos_accounting.py).

    kills               SIGKILL and respawn each process kind in turn (experiments/chaos_monkey.py)
    judge_outage        the reward worker's judge (an in-process OpenAI-compatible stub) refuses every call with 503
                        for `judge_outage_s`, longer than the judge's and the group's retries: the groups judged
                        meanwhile are dead-lettered (cause `judge`), their admission slots released, the run finishes
    long_generations    2 rollout workers with free slots, a task lease (`claim_idle_s`) shorter than a group's
                        generation: leases are renewed before they expire, so no task is claimed by the other
                        worker (no "claimed ... idle entries of tasks", no group published twice)
    oversized_output    the reward worker's `broker.max_entry_mb` below the size of some scored groups (larger than
                        the rollout groups they come from, which it reads): those go to `dead` with their size
                        (cause `judge`: the reward worker gave them up), the worker goes on
    reject_task         a task the engines reject (HTTP 400: a prompt token outside the vocabulary) published under
                        the group ids of every other one of the next rows the feeder will publish (its own publish of
                        those ids is then refused by the dedup key, as a republish after a crash would be): the
                        rollout worker dead-letters each (cause `rollout`), the learner releases the admission slot
                        of each it admits, the run finishes
    learner_crash_loop  `crash_loop_restarts` learner kills inside one checkpoint interval (each once the restarted
                        learner trained a step): nothing is lost or trained twice. Each restart re-reads the
                        `scored` entries held since the checkpoint, which counts a delivery: past the learner's
                        `broker.max_deliveries` (5) they are buried (they may be what kills it: a batch that runs
                        it out of memory), released as `max_deliveries`, and replaced by the feeder
    regex_bomb          `regex_bomb_mb` of repeated `<useful_chunks>` tags posted to the reward API's /evaluate while
                        training: it answers (200, or 504 past its deadline), /health answers meanwhile
"""

from __future__ import annotations

import re
import time
from typing import Any

from broker.schemas import DeadLetter
from common.config import merge_tables
from deploy.launcher.config import UpConfig
from experiments.chaos_accounting import Accounting
from experiments.chaos_config import ChaosConfig, ChaosFailed, Fault, Scenario
from experiments.chaos_monkey import ChaosMonkey
from experiments.chaos_probe import ProbeHandle

# Sizes the scenarios set (measured on the bench's tiny system: configs/bench/chaos.toml, docs/reliability.md).
CRASH_LOOP_INTERVAL_STEPS = 16  # the checkpoint interval the crash loop's kills stay inside
LEASE_S = 0.5  # long_generations: the rollout workers' claim_idle_s
LONG_RESPONSE_TOKENS = 128  # long_generations: tokens per sample (the base config's 16 take ~0.2 s per group)
# judge_outage: the judge is asked only for a sample with an answer after </think>, which the random base model
# never writes: a short SFT warm start teaches it the format first (its loss plateau, where the format is learned).
JUDGE_SFT_STEPS = 60
# reject_task: of the next REJECT_NEXT rows the feeder will publish (in its epoch order), every other is poisoned.
# The next ones, not every n-th row of the dataset: those the run never reaches would test nothing (a CI run of
# 12 steps admitted none of every 5th row once).
REJECT_NEXT = 8
# oversized_output: the reward worker's broker.max_entry_mb. Scored groups are 2.55-2.67 KB (median 2.65 KB), the
# rollout groups it reads 1.9-2.1 KB: about half the scored groups are too large to publish.
OVERSIZED_ENTRY_MB = 0.00253


def scenario_up(cfg: ChaosConfig, name: Scenario, extra: dict[str, Any] | None = None) -> UpConfig:
    """The base `[up]` with the scenario's overrides, in its own run directory and namespace."""
    phase = cfg.target_phase
    base = cfg.up_config().model_dump(exclude_unset=True)
    over: dict[str, Any] = {"run_dir": f"{cfg.up.run_dir}/{name}", "run_id": f"{cfg.up.run_id}-{name}"}
    if name != "kills":
        over["phases"] = {phase: {"steps": cfg.scenario_steps}}
    if name == "learner_crash_loop":
        # Every restart resumes from the checkpoint at CRASH_LOOP_INTERVAL_STEPS; the next one is at twice that.
        over["phases"] = {phase: {"steps": 2 * CRASH_LOOP_INTERVAL_STEPS}}
        over["learner"] = {"config": {"checkpoint": {"interval_steps": CRASH_LOOP_INTERVAL_STEPS}}}
    elif name == "long_generations":
        over["rollout"] = {
            "num_workers": 2,
            "config": {"broker": {"claim_idle_s": LEASE_S}, "sampling": {"max_response_len": LONG_RESPONSE_TOKENS}},
        }
        over["learner"] = {"config": {"data": {"max_new_tokens": LONG_RESPONSE_TOKENS}}}
        # One engine taking one request at a time: a group's 4 samples wait for each other, well past the lease.
        over["engines"] = {"num_engines": 1, "config": {"max_running_requests": 1}}
    elif name == "oversized_output":
        over["reward"] = {"config": {"broker": {"max_entry_mb": OVERSIZED_ENTRY_MB}}}
    elif name == "regex_bomb":
        over["reward"] = {"serve": True}
    merged = merge_tables(merge_tables(base, over), extra or {})
    if name == "judge_outage":  # the SFT phase first (dict order is phase order), then RL from its weights
        sft = {"kind": "sft", "steps": JUDGE_SFT_STEPS, "init": "base", "eval_before": False, "eval_after": False,
               "learner": {"data": {"groups_per_step": 32}, "optim": {"lr": 3e-3}}}  # fmt: skip
        merged["phases"] = {"sft": sft, **{k: {**v, "init": "previous"} for k, v in merged["phases"].items()}}
    return UpConfig.model_validate(merged)


class Injector:
    """What a scenario does while its run goes on (`tick`, from the launcher) and checks at the end."""

    def __init__(self, cfg: ChaosConfig, launcher: Any) -> None:
        self.cfg = cfg
        self.launcher = launcher
        self.phase = cfg.target_phase

    def in_phase(self) -> bool:
        view = self.launcher.dashboard.phase
        return view is not None and view.name == self.phase

    def steps(self) -> int:
        return len(self.launcher.run.metrics(self.phase))

    def tick(self) -> None:
        pass

    def pending(self) -> list[str]:
        """Injections not yet done and recovered from (the run must not end before them)."""
        return []

    def report(self) -> dict[str, Any]:
        return {}

    def check(self, acc: Accounting, letters: list[DeadLetter]) -> list[str]:
        """What this scenario must show beyond the common accounting (`letters`: the dead stream at the end); each
        failure as a sentence."""
        return []


class Kills(Injector):
    """kills and learner_crash_loop: the ChaosMonkey's SIGKILL-and-respawn of whole processes."""

    def __init__(self, cfg: ChaosConfig, launcher: Any, probes: ProbeHandle, crash_loop: bool) -> None:
        super().__init__(cfg, launcher)
        self.crash_loop = crash_loop
        if crash_loop:  # the first kill after the first checkpoint, then each once the restart logged a step
            faults: list[Fault] = ["learner"] * cfg.crash_loop_restarts
            self.monkey = ChaosMonkey(
                cfg, launcher, probes, faults, warmup_steps=CRASH_LOOP_INTERVAL_STEPS + 1, steps_between=0
            )
        else:
            self.monkey = ChaosMonkey(cfg, launcher, probes)

    def tick(self) -> None:
        self.monkey.tick()

    def pending(self) -> list[str]:
        m = self.monkey
        return [str(f) for f in ([m.current.fault] if m.current else []) + m.todo]

    def records(self) -> list[dict[str, Any]]:
        m = self.monkey
        return [r.to_json() for r in m.done + ([m.current] if m.current else [])]

    def report(self) -> dict[str, Any]:
        faults = self.records()
        return {"kills": len(faults), "faults": faults}

    def check(self, acc: Accounting, letters: list[DeadLetter]) -> list[str]:
        faults = self.records()
        out = [f"{f['fault']} (step {f['step_at_kill']}): not recovered" for f in faults if f["recovery_s"] is None]
        if len(faults) != self.monkey.num_faults:
            out.append(f"{len(faults)} of {self.monkey.num_faults} kills injected")
        if self.crash_loop:
            steps = {f["step_at_kill"] for f in faults}
            n = CRASH_LOOP_INTERVAL_STEPS
            if any(not n < s < 2 * n for s in steps):
                out.append(f"kills at steps {sorted(steps)}: not all inside one checkpoint interval")
            # A group held through max_deliveries learner crashes is buried: it may be what kills the learner (a
            # batch that runs it out of memory). Anything else dead-lettered here would be a new failure path.
            other = {c: n for c, n in acc.groups_released_by_cause.items() if c != "max_deliveries"}
            if other:
                out.append(f"groups released for causes other than the learner's crashes: {other}")
            buried = acc.groups_released_by_cause.get("max_deliveries", 0)
            if buried != acc.groups_dead_lettered:
                out.append(f"{acc.groups_dead_lettered} dead letters, {buried} released by the learner as buried")
        elif faults and faults[-1]["fault"] == "engine" and faults[-1].get("caught_up_s") is None:
            out.append("the respawned engine never served the current policy version")
        return out


class JudgeOutage(Injector):
    """The judge stub refuses every call for `judge_outage_s`, once `warmup_steps` steps are logged."""

    def __init__(self, cfg: ChaosConfig, launcher: Any, stub: Any) -> None:
        super().__init__(cfg, launcher)
        self.stub = stub
        self.started_s: float | None = None
        self.ended_s: float | None = None
        self.steps_at_end = 0
        self.recovery_s: float | None = None

    def tick(self) -> None:
        if not self.in_phase():
            return
        now = time.monotonic()
        if self.started_s is None:
            if self.steps() >= self.cfg.warmup_steps:
                self.stub.refusing, self.started_s = True, now
        elif self.ended_s is None:
            if now - self.started_s >= self.cfg.judge_outage_s:
                self.stub.refusing, self.ended_s, self.steps_at_end = False, now, self.steps()
        elif self.recovery_s is None:
            if self.steps() > self.steps_at_end:
                self.recovery_s = now - self.ended_s
            elif now - self.ended_s > self.cfg.recovery_timeout_s:
                raise ChaosFailed(f"judge_outage: no step {self.cfg.recovery_timeout_s:.0f}s after the judge came back")

    def pending(self) -> list[str]:
        return [] if self.recovery_s is not None else ["judge_outage"]

    def report(self) -> dict[str, Any]:
        return {"outage_s": self.cfg.judge_outage_s, "judge_calls_refused": self.stub.refused,
                "recovery_s": _round(self.recovery_s)}  # fmt: skip

    def check(self, acc: Accounting, letters: list[DeadLetter]) -> list[str]:
        if not acc.groups_dead_lettered:
            return ["no group was dead-lettered: the outage did not outlast the retries (the scenario tested nothing)"]
        return []


class RejectTask(Injector):
    """Once `warmup_steps` steps are logged, publishes poisoned copies of the feeder's tasks for every other one of
    the REJECT_NEXT rows that come next in the feeder's epoch order and that it has not published yet. The copies'
    template is the first task seen in the stream, taken from the phase's start (the stream is empty whenever the
    workers have caught up, which after warm-up can be at every tick: a CI run injected nothing that way)."""

    def __init__(self, cfg: ChaosConfig, launcher: Any) -> None:
        super().__init__(cfg, launcher)
        self.poisoned: list[str] = []
        self.done = False
        self.found: dict[str, Any] = {}
        self.template: Any = None  # a Task of this phase

    def tick(self) -> None:
        if self.done or not self.in_phase():
            return
        import msgspec

        from broker.base import TASKS
        from broker.factory import connect
        from broker.schemas import Task, pack_ids
        from deploy.launcher.config import PLACEHOLDER_REDIS_URL
        from experiments.side_reads import side_reads_config
        from learner.feeder import epoch_order

        run_id = self.launcher.cfg.phase_run_id(self.phase)
        broker = connect(side_reads_config(self.launcher.redis_url, run_id, connect_timeout_s=2.0))
        try:
            if self.template is None:
                entries = broker.view(TASKS).peek(Task, count=1).entries
                self.template = entries[0].msg if entries else None
            if self.template is None or self.steps() < self.cfg.warmup_steps:
                return  # no task seen yet, or still warming up: the next tick
            task = self.template
            published = broker.view(TASKS).dedup_keys()
            # Group ids are RUN/eEPOCH/iROW: the epoch the feeder is in is the newest one it has published in.
            run = task.group_id.rsplit("/e", 1)[0]
            epoch = max(int(k.rsplit("/i", 1)[0].rsplit("/e", 1)[1]) for k in published if k.startswith(f"{run}/e"))
            prefix = f"{run}/e{epoch}"
            data = self.launcher.cfg.train_config(PLACEHOLDER_REDIS_URL, self.phase, "m", "d.jsonl", "p").data
            order = epoch_order(self.launcher.cfg.prepare.num_train, data.seed, epoch, data.shuffle)
            upcoming = [int(i) for i in order if f"{prefix}/i{i}" not in published][:REJECT_NEXT]
            bad = pack_ids([10**6] * 8)  # far outside any vocabulary: the engine answers 400
            msgs = [
                msgspec.structs.replace(task, group_id=f"{prefix}/i{i}", dataset_index=i, prompt_ids=bad)
                for i in upcoming[1::2]  # not the very next: the feeder may be publishing it now
            ]
            ids = broker.producer(TASKS, Task).publish(msgs, dedup_key=lambda t: t.group_id)
            self.poisoned = [m.group_id for m, i in zip(msgs, ids, strict=True) if i is not None]
            self.done = True
        finally:
            broker.close()

    def pending(self) -> list[str]:
        return [] if self.done else ["reject_task"]

    def report(self) -> dict[str, Any]:
        return {"tasks_poisoned": len(self.poisoned), **self.found}

    def check(self, acc: Accounting, letters: list[DeadLetter]) -> list[str]:
        poisoned = set(self.poisoned)
        mine = [x for x in letters if x.group_id in poisoned]
        released = acc.groups_released_by_cause.get("rollout", 0)
        self.found = {"poisoned_dead_lettered": len(mine), "released_rollout": released,
                      "example": mine[0].reason[:160] if mine else ""}  # fmt: skip
        out = []
        if len(mine) != len(self.poisoned):
            out.append(f"{len(mine)} of the {len(self.poisoned)} poisoned tasks were dead-lettered")
        if not released:
            out.append("the learner released no slot of a rejected task (the feeder admitted none: raise the steps)")
        return out


class OversizedCheck(Injector):
    """oversized_output: nothing to inject (its override is the fault); the dead letters must show it."""

    def __init__(self, cfg: ChaosConfig, launcher: Any) -> None:
        super().__init__(cfg, launcher)
        self.found: dict[str, Any] = {}

    def report(self) -> dict[str, Any]:
        return self.found

    def check(self, acc: Accounting, letters: list[DeadLetter]) -> list[str]:
        mine = [x for x in letters if x.stream == "rollouts" and "over the limit" in x.reason]
        self.found = {"dead_letters": len(letters), "too_large": len(mine), "example": mine[0].reason if mine else ""}
        if not mine:
            return ["no scored group was too large to publish: the scenario tested nothing"]
        return []


class LeaseCheck(Injector):
    """long_generations: nothing to inject (its overrides are the fault); the rollout workers' logs must show no
    task claimed from a live worker and no group generated twice, with groups longer than the lease."""

    def __init__(self, cfg: ChaosConfig, launcher: Any) -> None:
        super().__init__(cfg, launcher)
        self.found: dict[str, Any] = {}

    def report(self) -> dict[str, Any]:
        return self.found

    def check(self, acc: Accounting, letters: list[DeadLetter]) -> list[str]:
        logs = [c.read_log() for c in self.launcher.sup.children if "-rollout-" in c.name]
        claims = sum(len(re.findall(r"claimed \d+ idle entries of tasks", text)) for text in logs)
        twice = sum(text.count("was already published") for text in logs)
        times = [float(t) for text in logs for t in re.findall(r"group \S+ done in ([0-9.]+)s", text)]
        self.found = {
            "rollout_workers": len(logs),
            "claim_idle_s": LEASE_S,
            "groups_done": len(times),
            "group_seconds_median": round(sorted(times)[len(times) // 2], 2) if times else None,
            "groups_longer_than_lease": sum(t > LEASE_S for t in times),
            "tasks_claimed_from_a_live_worker": claims,
            "groups_generated_twice": twice,
        }
        out = []
        if len(logs) < 2 or not self.found["groups_longer_than_lease"]:
            out.append(
                f"no group took longer than the lease with 2 workers (the scenario tested nothing): {self.found}"
            )
        if claims or twice:
            out.append(f"{claims} task claims and {twice} groups generated twice while their holder was alive")
        return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)
