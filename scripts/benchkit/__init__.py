"""`make bench`: the real processes (web, worker, clock, sandbox) on real Postgres and Redis.

Prints one table: each figure's median over --runs, every run's value, the target and
whether it is met. Postgres and Redis are the machine's when DATABASE_URL / REDIS_URL are
set (then every run gets a fresh database on that server and a Dramatiq namespace of its
own, both removed after), embedded servers in a temporary directory otherwise.

Figures (see --help for the flags):
  limit          a no-op actor on the same broker, 2 processes x 16 threads (msg/s)
  e2e            N raw `send_code` messages from intake to `delivered`, sandbox at once
  e2e-notify     e2e with `notify` (a webhook of the final event to a fast local receiver):
                 done when each code is delivered and its webhook taken; a figure, no target
  latency-bound  the same as e2e with the sandbox answering after 200 ms
  latency        20 codes/s: POST /v1/messages or raw enqueue -> sandbox got manual/send
  callbacks      callbacks/s the receiver applies, vs a bare endpoint on the same stack
  memory         peak RSS of each worker process during the e2e and latency-bound runs
"""
