"""Operations: metrics, logs, the status API and the daemon's lifecycle state."""
