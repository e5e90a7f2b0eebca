"""The gateway's settings (``DF_GATEWAY_*``, ``DF_API_KEYS``), besides the bus every service shares."""

from __future__ import annotations

from pydantic import Field

from disagfusion.config import BusSettings, comma_list


class GatewaySettings(BusSettings):
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8000, ge=0, le=65535)
    api_keys: str = ""
    """Comma-separated bearer keys a request must carry (``Authorization: Bearer KEY``); empty:
    no key is asked for. /healthz never asks."""
    gateway_max_backlog: int = Field(default=0, ge=0)
    """Refuse (429) a request whose jobs would take the tasks queued or running in DF_WORK past
    this many; 0: no limit."""
    gateway_max_body_bytes: int = Field(default=1024 * 1024, ge=1)
    """Larger request bodies are refused (413) before they are read to the end."""
    gateway_timeout_s: float = Field(default=600.0, gt=0)
    """How long ``POST /v1/images/generations`` waits for its images before answering 504."""

    @property
    def api_key_list(self) -> list[str]:
        return comma_list(self.api_keys)
