"""Chaos testing of the whole loop: kill services (each running as a pair) and the broker under load, then audit
that no accepted report was lost and no transition of an incident happened twice (``make chaos``).

``python -m services.chaos run`` starts a broker of its own (``infra/kafka/kafka.sh`` with its own var dir and
port, so the shared broker is never touched), two instances of every service in one consumer group over the
service's database, and drives reports, departments and verifiers through the public APIs while SIGKILLing each
service several times and the broker at least once. It then reads the lifecycle log from offset 0 and every
service's database and prints a summary whose last line is JSON::

    {"incidents":2000,"terminal":2000,"lost":0,"duplicate_transitions":0,"kills":16,"max_recovery_s":31.2}
"""
