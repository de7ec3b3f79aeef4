"""Honest memory: probes of GPUs (NVML), host RAM, cgroup limits and each child's use
(``probe``), the pure fit and placement rules (``fit``), and the accountant that tracks what
every runner really holds (``accountant``). May import models and ``ollamad.settings`` only;
never runner, sched, service or api."""
