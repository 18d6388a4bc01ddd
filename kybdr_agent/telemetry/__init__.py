"""What SREs see: log lines (``logs``), Prometheus metrics (``metrics``), CloudWatch (``cloudwatch``) and
OpenTelemetry traces (``tracing``). Every module of the agent logs through ``get_logger``; metrics, CloudWatch
and traces are subscribers of the event hub, wired by the composition root, so no component knows of them."""

from kybdr_agent.telemetry.logs import configure_logging, get_logger

__all__ = ["configure_logging", "get_logger"]
