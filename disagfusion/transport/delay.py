"""A slow network, emulated: ``DelayedTransports`` waits before every handoff, uniform in
``DF_HANDOFF_DELAY_MS`` ± ``DF_HANDOFF_JITTER_MS``, so tests and benchmarks can show how
handoff latency hurts a pipeline (and how prefetching hides it). It lives apart from the
router so that a production worker's read path holds no delay step at all;
``open_transports`` picks it only when a delay is set."""

from __future__ import annotations

import random
import time

import torch

from disagfusion.protocol import TensorRef
from disagfusion.transport.router import Transports


class DelayedTransports(Transports):
    def get_all(self, refs: dict[str, TensorRef]) -> dict[str, torch.Tensor]:
        """One handoff, after the injected delay: once per stage output, however many tensors
        it holds, as one network round trip would be; none for an output without tensors."""
        if refs:
            mean, jitter = self.settings.handoff_delay_ms, self.settings.handoff_jitter_ms
            time.sleep(max(0.0, random.uniform(mean - jitter, mean + jitter)) / 1000)
        return super().get_all(refs)
