"""Operations: systemd integration, configuration reload, call records, log formats (issue 10)."""
