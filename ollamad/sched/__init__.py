"""Scheduling: ``core`` is the pure decision function (queue, runners, memory, now ->
start, stop, dispatch, reject), ``scheduler`` the async driver that carries those decisions
out with runners and the memory accountant. May import runner, memory, models and
``ollamad.settings``/``ollamad.durations``; never api or service."""
