"""Swapping the served model while it serves: reload, refuse a bad version, drain the old one.

One reload path for every trigger (SIGHUP, `systemctl reload`, `appliance
reload`, the KServe v2 repository API, the bucket poll): pick the version
directory to serve (highest, or `model.pin_version`), and if it is not the one
serving, load, verify, warm up and self-check it on a background thread while
the current version keeps answering. Only a version that passed every check
replaces the current one, in one step on the event loop; a request already
running finishes on the version it started on (the scheduler keeps each job's
runtime), and the old runtime is closed once the scheduler says nobody needs
it. At most two models are in memory, and only during a swap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import ApplianceError
from ..modeldir import MANIFEST
from .model import LoadedModel
from .proof import Proof
from .scheduler import Scheduler

log = logging.getLogger(__name__)

Result = Literal["ok", "refused", "unchanged"]
POLL = "poll"  # the trigger name of model.poll_interval_s's reloads
PROVEN = "proven on this CPU"  # the trigger name of the reload that follows a version's proof (inference/proof.py)
FALLBACK = "live parity watch"  # the trigger name of the reload onto the reference path (proof.ParityWatch)
SAME_VERSION = (PROVEN, FALLBACK)  # triggers that load the version serving again
CLOSE_WAIT_S = 10.0  # at shutdown, how long a swapped-out version may take to close


class ModelConflict(ApplianceError):
    """The request conflicts with what is served (unloading the only model)."""

    status = 409


@dataclass(frozen=True)
class ReloadOutcome:
    """What the last reload did: when, which version, ok / refused / unchanged, and why."""

    at: float  # Unix time
    trigger: str  # "SIGHUP", "repository API", "poll", ...
    version: str  # the version directory picked ("" when none could be picked)
    result: Result
    reason: str

    def describe(self) -> dict[str, Any]:
        """`model.last_reload` in /v1/info and on the status page."""
        return {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)), "trigger": self.trigger,
                "version": self.version, "result": self.result, "reason": self.reason}


class ModelLifecycle:
    """The served model and the one way to replace it (`reload`)."""

    def __init__(self, model: LoadedModel, scheduler: Scheduler, *, pick: Callable[[], Path],
                 load: Callable[[Path], LoadedModel], close_executor: Executor,
                 on_swap: Callable[[LoadedModel], None] = lambda model: None,
                 commit: Callable[[Path], None] = lambda directory: None,
                 prove: Callable[[LoadedModel, Callable[[], bool]], Proof] | None = None,
                 load_reference: Callable[[Path], LoadedModel] | None = None) -> None:
        self.current = model
        self.scheduler = scheduler
        self._pick = pick  # blocking: re-read the settings, fetch if needed, name the version directory
        self._load = load  # blocking: load, verify, warm up, self-check (ModelError on any failure)
        self._close_executor = close_executor  # the inference thread: a runtime closes between its batches
        self._on_swap = on_swap
        self._commit = commit  # blocking: a version that passed becomes the one a restart loads (model.url's cache)
        self._prove = prove  # blocking: run a pending proof on this machine and cache it
        self._load_reference = load_reference or load  # blocking: load a version on its reference path (FALLBACK)
        self._proving: asyncio.Task[None] | None = None
        self._proven: set[Path] = set()  # proven in this process: an uncacheable proof is not run in a loop
        self._stopping = False
        self._refused: set[Path] = set()  # the poll does not load these again; an operator's reload does
        # Told every outcome (metrics, systemd's STATUS=); a listener's failure never fails a reload.
        self.listeners: list[Callable[[ReloadOutcome], None]] = []
        self.beginning: list[Callable[[str], None]] = []  # told the trigger when a reload begins (not a poll's)
        self._lock = asyncio.Lock()  # one reload at a time; a second trigger waits and re-reads
        self._retiring: set[asyncio.Task[None]] = set()
        self.last_reload: ReloadOutcome | None = None
        self.available = ""  # the newest version known to exist (the bucket's, with model.url)

    def describe(self) -> dict[str, Any]:
        """What /v1/info and the status page add to the model's description: the last reload, the version available."""
        last = self.last_reload
        return {"last_reload": None if last is None else last.describe(),
                "available_version": self.available or self.current.manifest.version}

    @property
    def version_dir(self) -> Path:
        """The directory of the version serving now."""
        return self.current.manifest.directory

    def prove_soon(self) -> None:
        """If the version serving has not been proven on this machine, prove it in the background, then reload it.

        Safe first, fast once proven: the FP32 path it was loaded on serves meanwhile, and
        the reload (trigger PROVEN) swaps in the fastest path that passed here as any
        reload swaps, so no request fails.
        """
        model = self.current
        if self._prove is None or model.proof.state != "pending" or self._stopping:
            return
        if self.version_dir in self._proven:
            log.warning("%s was proven on this machine but its proof could not be cached (%s): FP32 serves on",
                        self.version_dir, model.proof.file)
            return
        if self._proving is not None:
            self._proving.cancel()  # a proof of a version no longer served
        self._proving = asyncio.get_running_loop().create_task(self._prove_then_reload(model), name="model-proof")

    async def _prove_then_reload(self, model: LoadedModel) -> None:
        assert self._prove is not None
        prove = self._prove
        try:
            proof = await asyncio.to_thread(prove, model, lambda: self._stopping or self.current is not model)
        except Exception as exc:  # a photo that no longer decodes, a runtime's own error: FP32 serves on
            log.error("proving %s v%s on this machine failed (%s: %s); the FP32 path serves on until a reload",
                      model.manifest.name, model.manifest.version, type(exc).__name__, exc)
            return
        if proof.state == "proven" and self.current is model and not self._stopping:
            # Shown at once; if no path passes here the reload is refused and this one serves on, its answers
            # flagged degraded when it failed here too.
            model.proof = proof
            self._on_swap(model)  # the answers' `model` field is computed once per swap
            self._proven.add(model.manifest.directory)
            await self.reload(PROVEN)

    async def reload(self, trigger: str) -> ReloadOutcome:
        """Re-read the model directory and serve the version it names, if it passes every check; never raises.

        Trigger "poll" (the bucket poll) is quiet when nothing changed, or when it is refused for the reason
        the last reload was: no log line, no record, no count. Trigger PROVEN loads the version serving
        again, its proof now cached.
        """
        async with self._lock:
            if trigger != POLL:
                for begin in self.beginning:
                    begin(trigger)
            outcome = await self._reload(trigger)
        last = self.last_reload
        if trigger == POLL and (outcome.result == "unchanged" or (
                outcome.result == "refused" and last is not None and last.reason == outcome.reason)):
            log.debug("model poll: %s %s", outcome.result, outcome.reason)  # said once already, or nothing to say
            return outcome
        self.last_reload = outcome
        line = f"model reload ({trigger}): {outcome.result} v{outcome.version or '?'}: {outcome.reason}"
        (log.warning if outcome.result == "refused" else log.info)("%s", line)
        for listener in self.listeners:
            try:
                listener(outcome)
            except Exception:
                log.exception("a reload listener failed")
        return outcome

    async def _reload(self, trigger: str) -> ReloadOutcome:
        def outcome(version: str, result: Result, reason: str) -> ReloadOutcome:
            return ReloadOutcome(time.time(), trigger, version, result, reason)

        if self._retiring:
            # Two models in memory at most: a version swapped out must be closed before another one loads.
            await asyncio.gather(*self._retiring, return_exceptions=True)
        try:
            directory = (self.version_dir.resolve() if trigger in SAME_VERSION
                         else (await asyncio.to_thread(self._pick)).resolve())
        except ApplianceError as exc:
            return outcome("", "refused", exc.detail)
        except Exception as exc:  # an unreadable directory, a bucket client's own error: nothing to load
            log.exception("picking the version to serve failed")
            return outcome("", "refused", f"{type(exc).__name__}: {exc}")
        self.available = _version_of(directory) or self.available
        # An operator's reload of the version serving ends a fallback onto its reference path; nothing else.
        if directory == self.version_dir.resolve() and trigger not in SAME_VERSION and not self.current.on_reference:
            return outcome(self.current.manifest.version, "unchanged", f"already serving {directory}")
        if trigger == POLL and directory in self._refused:
            return outcome(self.available, "unchanged", f"{directory} was refused before; not loaded again")
        started = time.monotonic()
        try:
            # Not on the inference thread: serving goes on while the new version loads and checks itself.
            model = await asyncio.to_thread(self._load_reference if trigger == FALLBACK else self._load, directory)
        except ApplianceError as exc:
            self._refused.add(directory)
            return outcome(self.available, "refused", f"{exc.detail}; still serving v{self.current.manifest.version}")
        except Exception as exc:  # a runtime's own error: refused all the same, never served
            log.exception("loading %s failed", directory)
            self._refused.add(directory)
            return outcome(self.available, "refused",
                           f"{type(exc).__name__}: {exc}; still serving v{self.current.manifest.version}")
        try:
            await asyncio.to_thread(self._commit, directory)
        except Exception:  # the cache keeps naming the old copy: a restart would serve that one, still verified
            log.exception("cannot record %s as the verified copy", directory)
        old = self.current
        self.current = model  # the swap: requests from now on start on the new version
        self._on_swap(model)
        task = asyncio.get_running_loop().create_task(self._retire(old), name="model-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        self.prove_soon()
        return outcome(model.manifest.version, "ok",
                       f"serving {model.served.key} from {directory} (ready in {time.monotonic() - started:.1f} s; "
                       f"self-check max |dp| {model.selfcheck_max_abs_dp:.2g}); v{old.manifest.version} retired")

    async def _retire(self, old: LoadedModel) -> None:
        """Close `old` once the requests that started on it are answered."""
        await self.scheduler.drained(old.runtime)
        await asyncio.get_running_loop().run_in_executor(self._close_executor, old.runtime.close)
        log.info("model v%s closed: its last request was answered", old.manifest.version)

    async def poll(self, interval_s: float) -> None:
        """Reload every `interval_s` seconds (the bucket rollout, `model.poll_interval_s`) until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            await self.reload(POLL)

    async def close(self) -> None:
        """Stop a proof, wait for retiring versions to close (each waits only for requests already running), then
        the current."""
        self._stopping = True
        if self._proving is not None:
            await asyncio.gather(self._proving, return_exceptions=True)  # its thread stops within one batch
        if self._retiring:
            # The scheduler has stopped by now (its jobs answered 503), so each retiring version drains at once;
            # the bound only guards against a request that never ended.
            await asyncio.wait(self._retiring, timeout=CLOSE_WAIT_S)
        await asyncio.get_running_loop().run_in_executor(self._close_executor, self.current.runtime.close)


def _version_of(directory: Path) -> str:
    """The manifest's version of a version directory, read without checking anything ("" if unreadable)."""
    try:
        return str(json.loads((directory / MANIFEST).read_bytes())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""
