"""Disaster recovery: probes, a pure failover state machine, the steps that execute it, and its history.

The DR component is the agent's second component (``component.Component``): it watches both regions,
decides with ``machine.decide`` and executes one step at a time, never cancelled by newer observations.
"""
