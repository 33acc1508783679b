"""semcache's benchmarks: semcache against RedisVL's ``SemanticCache``, side by side, and a scaling run.

Run them with ``semcache bench`` (see ``docs/performance.md``). They are not part of the test suite (pytest only
collects ``tests/``): a benchmark measures, a test asserts behaviour.

Modules: :mod:`~benchmarks.workload` (the seeded CLINC150 workload), :mod:`~benchmarks.timing` (percentiles and
threaded runs), :mod:`~benchmarks.memory` (bytes per entry), :mod:`~benchmarks.systems` (the two caches behind one
interface), :mod:`~benchmarks.worker_store` (writes through a real ``semcache worker``), :mod:`~benchmarks.compare`
(the side-by-side run), :mod:`~benchmarks.scaling` (10k, 100k, ... entries and HNSW recall),
:mod:`~benchmarks.memory_options` (what each memory option saves and costs in quality) and
:mod:`~benchmarks.report` (the table and the plots).
"""
