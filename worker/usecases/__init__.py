"""The use cases: each module one job, each over a `Context` (worker.usecases.context).

intake (take a producer's message in), deliver (send an attempt to kod.mobi),
callbacks (apply kod.mobi's delivery callbacks), sweep (the clock's chores),
reads (views and the code check), limits (per-recipient abuse limits), and
transitions (every state change on the rows, each written once). Only these
modules open transactions on messages and attempts."""
