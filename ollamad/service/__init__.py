"""Living as a service: sd_notify (READY, STATUS, WATCHDOG), logging set-up, Prometheus
metrics over the scheduler's state, and the environment file an admin edits. May import
sched and everything below it, and ``ollamad.settings``; never ``api``."""
