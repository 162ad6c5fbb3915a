"""gil-exporter: measure CPython GIL contention from outside, serve it to Prometheus."""

__version__ = "0.1.0"
