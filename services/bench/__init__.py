"""Benchmark of gridloop on this machine (``python -m services.bench run``, behind ``make bench``).

One run measures:

1. the raw limit: Kafka produce → consume hops per second with the pipeline's client library and settings
   (aiokafka, acks=all, idempotent producer) and the pipeline's message size, one 6-partition topic;
2. the closed loop (report → file → dispatch → accept → handle → verify → close) driven through the public HTTP
   APIs at increasing offered rates, to find the highest rate sustained without the backlog growing;
3. per-stage and end-to-end latency (from the lifecycle topic, read by an independent consumer), CPU and RSS of
   every service and of the broker.

Results go to ``var/bench/<timestamp>/`` (summary JSON, per-step JSON, a PNG plot); the last line printed is the
summary as one JSON object. ``soak`` runs at half the maximum rate for a long time and reports RSS growth.

``read`` measures the read side instead (:mod:`.read`): a synthetic history of the town (:mod:`.history`) rebuilt
into the operations center's read model, every read endpoint timed on it, and the live fold's lag under a
dashboard.
"""
