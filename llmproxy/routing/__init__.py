"""
Routing: which target serves a request, in which order targets are tried, and
what the proxy knows about each target.

* :mod:`~llmproxy.routing.router`: models and their targets, plans, in-flight
  counts and latency, and the status of every target;
* :mod:`~llmproxy.routing.plan`: one request's attempts, each releasing what it
  holds exactly once;
* :mod:`~llmproxy.routing.balancing`: the strategies;
* :mod:`~llmproxy.routing.breaker`: a target's circuit breaker, a pure state
  machine;
* :mod:`~llmproxy.routing.health`: every breaker, kept in step with the store
  a fleet shares (memory or Redis);
* :mod:`~llmproxy.routing.checks`: the optional active health checks;
* :mod:`~llmproxy.routing.affinity`: which target made a response id.
"""
