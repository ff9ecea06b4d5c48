"""Operations the app uses: giving memory back (memory), log lines (logs), Prometheus metrics (metrics)."""
