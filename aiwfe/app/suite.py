"""Starts the four services in one event loop, wired to each other on free ports.

Used by the tests and benchmarks (real servers on port 0); `aiwfe up` runs the same
services as separate processes instead.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from aiwfe.runtime.config import Settings, load_settings
from aiwfe.runtime.server import RunningService, Service, start_service

SERVICE_ORDER = ("dataplatform", "cognitive", "taskproc", "gateway")


def service_classes() -> dict[str, type[Service]]:
    # Imported here, not for a cycle (services never import the app; import-linter checks),
    # but so that `aiwfe up`'s supervisor, which needs only SERVICE_ORDER, loads none of them.
    from cognitive.service import CognitiveService
    from dataplatform.service import DataPlatformService
    from gateway.service import GatewayService
    from taskproc.service import TaskProcService

    return {
        "dataplatform": DataPlatformService,
        "cognitive": CognitiveService,
        "taskproc": TaskProcService,
        "gateway": GatewayService,
    }


@dataclass
class Suite:
    """The running services, their settings and addresses."""

    settings: Settings
    running: dict[str, RunningService] = field(default_factory=dict)

    def address(self, name: str) -> str:
        return self.running[name].address

    async def stop(self) -> None:
        for name in reversed(SERVICE_ORDER):
            running = self.running.pop(name, None)
            if running is not None:
                await running.stop(grace=0.5)


async def start_suite(
    overrides: dict[str, Any], only: tuple[str, ...] = SERVICE_ORDER, env: dict | None = None
) -> Suite:
    """Starts `only` (in dependency order) on 127.0.0.1 with free ports."""
    overrides = copy.deepcopy(overrides)
    services = overrides.setdefault("services", {})
    classes = service_classes()
    suite = Suite(settings=load_settings(env=env or {}, overrides=overrides))
    try:
        for name in SERVICE_ORDER:
            if name not in only:
                continue
            settings = load_settings(env=env or {}, overrides=overrides)
            running = await start_service(classes[name](settings), host="127.0.0.1", port=0)
            suite.running[name] = running
            services.setdefault(name, {})["port"] = running.port
        suite.settings = load_settings(env=env or {}, overrides=overrides)
    except BaseException:
        await suite.stop()
        raise
    return suite
