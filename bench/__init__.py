"""
llmproxy's benchmark harness: ``python -m bench setup`` installs what it needs,
``python -m bench run`` measures llmproxy side by side with a mock upstream reached
directly, nginx as the reference reverse proxy and LiteLLM (when installed), and
writes a Markdown report and a JSON file of every figure to ``bench/results/``.

The modules:

- :mod:`bench.procs`: child processes pinned to CPUs, their CPU time and memory from /proc;
- :mod:`bench.upstream`: the fast mock upstreams (nginx + Lua, uvloop + httptools);
- :mod:`bench.targets`: the proxies under test and their generated configs;
- :mod:`bench.load`: the load generators (wrk with a Lua script, an asyncio stream client);
- :mod:`bench.harness`: the cells, run target by target, interleaved;
- :mod:`bench.report`: the Markdown report, the goals and the JSON file.
"""
