"""``python -m services.gateway``: the HTTP gateway, configured by DF_GATEWAY_* (and DF_NATS_URL)."""

import logging

import uvicorn

from services.gateway.app import create_app
from services.gateway.config import GatewaySettings

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = GatewaySettings()
    uvicorn.run(create_app(settings), host=settings.gateway_host, port=settings.gateway_port, log_level="info")
