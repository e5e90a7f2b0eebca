"""``python -m services.scheduler``: the live scheduler, configured by DF_SCHED_* (and DF_* for
NATS and the models served). SIGTERM or SIGINT stop it after the tick in progress."""

import asyncio
import logging
import signal

from disagfusion import metrics
from disagfusion.config import MetricsSettings
from services.scheduler.live import build


async def _main() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await build().run(stop)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    metrics.serve(MetricsSettings(), "scheduler")
    asyncio.run(_main())
