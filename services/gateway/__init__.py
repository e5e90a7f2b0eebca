"""The HTTP gateway: OpenAI's images and videos APIs in front of the NATS pipeline."""
