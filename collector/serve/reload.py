"""SIGHUP on the collector: take up the agents of collector.toml and agents.d again.

`systemctl reload backhaul-collector` (after `enrol-agent`, or an edit of ``[[agents]]``)
rereads the configuration and applies its agents, their keys and databases to the
connections and backups that start from then on. Connections already open keep the
policy they authenticated under, so running uploads are never dropped by a reload. A
configuration that no longer loads is refused as a whole (logged), and the agents in use
stay. Other settings (listen address, storage, metrics) need a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from collector.config import load_collector_config
from collector.report.outcomes import OutcomeSink
from collector.report.sinks import expectations_of, expected_databases
from collector.serve.server import CollectorServer, make_authenticator
from common.errors import ConfigError

log = logging.getLogger(__name__)


def reload_agents(server: CollectorServer, sinks: Sequence[OutcomeSink]) -> None:
    """Read the configuration again and apply its agents; keep the old ones on error."""
    from collector.report.sinks import MetricsSink  # metrics stack: loaded by `serve` only

    path = server.config.source
    try:
        config = load_collector_config(path)
        auth = make_authenticator(config)
    except ConfigError as exc:
        log.error("reload refused, the agents in use stay: %s", exc)
        return
    server.use_agents(config.agents, auth)
    for sink in sinks:
        if isinstance(sink, MetricsSink):
            sink.metrics.expect(expected_databases(config), expectations_of(config))
    log.info("reloaded %s: %d agent(s): %s", path, len(config.agents),
             ", ".join(a.name for a in config.agents) or "none")
