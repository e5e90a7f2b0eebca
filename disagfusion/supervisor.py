"""The embedded stack's supervisor: what ``restart: unless-stopped`` is to docker compose.

``disagfusion up`` starts it beside the services (``python -m disagfusion.supervisor DATA_DIR``);
``down`` stops it first. Every half second it looks at the processes in the stack's state and
restarts the dead ones their service's compose ``restart`` policy covers (nats and redis too, on
the same port and store), after a delay that doubles with each crash in a row. A replica that
crashes ``DF_RESTART_MAX_CRASHES`` times within ``DF_RESTART_WINDOW_S`` is given up on, loudly:
an error in ``logs/supervisor.log`` and ``gave_up`` in the state, which ``disagfusion scale``
(which replaces dead replicas) and ``wait_healthy`` read. Processes that ``scale`` or ``down``
stop are taken out of the state before their SIGTERM, so they are never restarted.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from disagfusion.launcher import COMPOSE_FILE, Launcher, Proc, alive

log = logging.getLogger("disagfusion.supervisor")

TICK_S = 0.5


@dataclass(frozen=True)
class RestartRule:
    """When a dead replica is restarted, and when it is given up on."""

    first_delay_s: float = 1.0
    most_delay_s: float = 30.0
    max_crashes: int = 5
    window_s: float = 60.0

    @classmethod
    def from_env(cls) -> RestartRule:
        env = os.environ
        return cls(
            first_delay_s=float(env.get("DF_RESTART_DELAY_S", cls.first_delay_s)),
            most_delay_s=float(env.get("DF_RESTART_MAX_DELAY_S", cls.most_delay_s)),
            max_crashes=int(env.get("DF_RESTART_MAX_CRASHES", cls.max_crashes)),
            window_s=float(env.get("DF_RESTART_WINDOW_S", cls.window_s)),
        )

    def recent(self, crashes: list[float], now: float) -> list[float]:
        return [t for t in crashes if now - t < self.window_s]

    def delay(self, recent_crashes: int) -> float:
        """Before the restart after the ``recent_crashes``-th crash in the window: 1, 2, 4, ... s."""
        return min(self.most_delay_s, self.first_delay_s * 2 ** max(0, recent_crashes - 1))


def restarts(policy: str) -> bool:
    """Whether compose's restart ``policy`` restarts a process that died on its own. The exit
    code of a process the supervisor did not start is unknown, so ``on-failure`` restarts every
    death: a stage exits 0 only when stopped, and a stopped one has left the state already."""
    return policy in ("always", "on-failure", "unless-stopped")


class Supervisor:
    def __init__(self, launcher: Launcher, rule: RestartRule):
        self.launcher = launcher
        self.rule = rule

    def tick(self, now: float | None = None) -> bool:
        """One look at every process; False once the stack is gone (``down`` ran)."""
        now = time.time() if now is None else now
        with self.launcher.locked():
            state = self.launcher.state()
            if state is None:
                return False
            changed = False
            for name in ("nats", "redis"):
                proc = getattr(state, name)
                replacement = self._check(f"{name}", proc, "unless-stopped", now,
                                          lambda p=proc, n=name: self._respawn_infrastructure(n, p))
                if replacement is not proc:
                    setattr(state, name, replacement)
                    changed = True
            for service, procs in state.services.items():
                policy = self.launcher.services[service].restart if service in self.launcher.services else "no"
                for index, proc in enumerate(procs):
                    replacement = self._check(f"{service} (replica {index})", proc, policy, now,
                                              lambda s=service, i=index, st=state: self.launcher.respawn(st, s, i))
                    if replacement is not proc:
                        procs[index] = replacement
                        changed = True
            if changed:
                self.launcher.save(state)
        return True

    def _check(self, what: str, proc: Proc, policy: str, now: float, respawn) -> Proc:
        """``proc`` as it is, marked dead (with its restart time or the reason it is given up on),
        or the process that replaced it."""
        if proc.gave_up or alive(proc.pid) or not restarts(policy):
            return proc
        if proc.restart_at is None:
            recent = [*self.rule.recent(proc.crashes, now), now]
            if len(recent) >= self.rule.max_crashes:
                reason = (f"crashed {len(recent)} times within {self.rule.window_s:g} s; not restarted any more "
                          f"(see {proc.log}); `disagfusion scale` starts a fresh one")
                log.error("GIVING UP on %s: %s", what, reason)
                return proc.model_copy(update={"crashes": recent, "gave_up": reason})
            delay = self.rule.delay(len(recent))
            log.warning("%s (pid %d) died; restarting it in %.0f s (crash %d within %g s)", what, proc.pid, delay,
                        len(recent), self.rule.window_s)
            return proc.model_copy(update={"crashes": recent, "restart_at": now + delay})
        if now < proc.restart_at:
            return proc
        new = respawn()
        log.warning("restarted %s: pid %d (restart %d)", what, new.pid, proc.restarts + 1)
        return new.model_copy(update={"crashes": proc.crashes, "restarts": proc.restarts + 1})

    def _respawn_infrastructure(self, name: str, proc: Proc) -> Proc:
        """nats or redis again, with the command, port and store it had."""
        with open(proc.log, "ab") as out:
            popen = subprocess.Popen(proc.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        return proc.model_copy(update={"pid": popen.pid, "restart_at": None})

    def run(self) -> None:
        log.info("supervising the stack in %s", self.launcher.data_dir)
        while self.tick():
            time.sleep(TICK_S)
        log.info("the stack is gone; supervisor exits")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--compose-file", type=Path, default=COMPOSE_FILE)
    parser.add_argument("--models-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    launcher = Launcher(args.data_dir, compose_file=args.compose_file, models_dir=args.models_dir)
    Supervisor(launcher, RestartRule.from_env()).run()


if __name__ == "__main__":
    main()

