"""Process concerns: serve and drain, systemd notification, memory, log lines, metrics."""
