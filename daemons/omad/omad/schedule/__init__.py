"""Schedules (cron in an IANA time zone), machine groups and their VMs, and the scheduler that turns them into jobs."""
