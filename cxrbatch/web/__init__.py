"""The results web app (`cxrbatch serve`): worklist, study pages with lung overlays,
operations, health and Prometheus metrics. It reads results; its only writes are the
audit trail (audit_events) and the overlay cache."""
