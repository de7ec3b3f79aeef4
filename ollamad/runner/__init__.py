"""One llama-server child: argv, spawn in its own process group, health, stop (``child``);
the HTTP session the daemon talks to its runners with (``upstream``) and how their replies
are read (``events``); finding the binary (``binary``); records of children a killed daemon
left behind (``leftovers``). Knows nothing of other runners or of memory. May import models
and ``ollamad.settings`` only."""
