"""
The upstream side: how the proxy talks to its backends.

* :mod:`~llmproxy.upstream.client`: connections (endpoints, pools, a cookie jar
  that keeps nothing, the request body producer);
* :mod:`~llmproxy.upstream.exchange`: one response, its body read or relayed
  under the idle and total timeouts, with backpressure;
* :mod:`~llmproxy.upstream.forwarder`: sending a request to a target, the
  first-byte timeout, the connection slots, and what each failure means.
"""
