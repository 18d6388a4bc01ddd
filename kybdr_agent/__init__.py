"""kybdr-agent: backup and disaster recovery for PostgreSQL hosts."""

# The single source of the version (pyproject.toml reads it): a literal, because importlib.metadata costs
# start-up time on every one-shot command.
__version__ = "0.1.0"
