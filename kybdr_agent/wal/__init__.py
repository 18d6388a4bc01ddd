"""PURE. Point-in-time recovery's core: WAL names, timelines, recovery windows, WAL retention, recovery settings
and the per-segment record — decisions only; archiving, fetching and restoring are the shell's.
"""
